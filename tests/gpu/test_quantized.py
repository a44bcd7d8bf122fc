"""A quantized base with 16-bit adapters (GPU only): the plugin's outputs
equal stock vLLM's LoRA on the same quantized model.

Llama 3 8B's layer shapes and vocabulary, 2 of its 32 layers (a short
start; the layers are what the quantization changes), seeded random fp16
weights (``testing/quantized.py``): FP8 (vLLM quantizes the checkpoint as it
loads) and AWQ 4-bit (vLLM picks its Marlin kernels on Hopper). Adapters of
mixed ranks on all seven projections in fp16. Every greedy output must
equal stock's or differ first at a near-tie. FP8 quantizes activations
too (3 mantissa bits) with one dynamic scale per tensor, from the largest
value of the whole batch: a one-ulp difference between two LoRA kernels'
fp16 sums, or another batching of the same requests, can flip activations'
FP8 roundings (6% steps) in every token of the step. So FP8 is held to
stock's own spread: stock run again with other batches (``max_num_seqs``
8) is the control, and the plugin may differ from stock no more than that
control does (``within_control``); a wrong, missing or mis-scaled adapter
moves logits by whole nats. Eager engines: this compares the quantized
base's LoRA path; the plugin inside CUDA graphs is compared with stock in
test_graphs_parity.py.
"""

from __future__ import annotations

import random

import pytest
import torch

from vllm_slora.testing.compare import compare_runs
from vllm_slora.testing.runner import Workload, run_workload

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# vLLM 0.26 names AWQ checkpoints' method "auto_awq" on CUDA (AutoAWQConfig,
# Marlin kernels on Hopper), "awq" on CPU.
EXPECTED_METHOD = {"fp8": {"fp8"}, "awq": {"auto_awq", "awq", "awq_marlin"}}
TIE = {"fp8": 0.2, "awq": 0.05}  # nats
IDENTICAL = {"fp8": 0.5, "awq": 0.75}


def margin(divergence: dict) -> float:
    """The larger margin (nats) by which either run preferred its token
    where the two first diverged."""
    return max(divergence["a_margin"], divergence["b_margin"])


def worst_margin(cmp: dict) -> float:
    """The largest ``margin`` of a comparison (0 when nothing diverged)."""
    return max([margin(d) for d in cmp["divergences"]] + [0.0])


# Room over the control's worst margin. Stock's own margin at one position
# moved by 0.125 nats (0.375 -> 0.5) between two runs of the same stock
# engine on the H200 (benchmarks/results/gpu-quantized-h200-2026-12-03.txt,
# request 6), more than the 25% (0.1 nats) first chosen here, which the
# plugin then missed by 0.012 nats (0.500 against 1.25 x 0.391).
CONTROL_ROOM = 1.5


def within_control(got: dict, control: dict) -> bool:
    """The plugin's spread from stock is no larger than stock's own under
    another batching: clear divergences explained as near-ties at the
    control's worst margin (with ``CONTROL_ROOM``), and at most 4 identical
    outputs fewer than the control has."""
    width = max(TIE["fp8"], CONTROL_ROOM * worst_margin(control))
    clear = sum(margin(d) > width for d in got["divergences"])
    return clear == 0 and got["identical"] >= control["identical"] - 4


@pytest.mark.parametrize("quantization", ["awq", "fp8"])
def test_quantized_base_same_outputs_as_stock(tmp_path, quantization):
    from vllm_slora.testing.adapters import make_adapters
    from vllm_slora.testing.quantized import make_quantized_llama

    model = make_quantized_llama(tmp_path / "model", quantization, layers=2, device="cuda")
    adapters = [str(p) for p in make_adapters(tmp_path / "adapters", model, [8, 16, 32, 16, 8, 32])]
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 128000) for _ in range(rng.randint(8, 64))] for _ in range(24)]
    # Every prompt with an adapter, and the first 8 once more without: in one
    # run, the adapters must change what the base model says.
    reqs = [(p, adapters[i % len(adapters)]) for i, p in enumerate(prompts)]
    reqs += [(p, None) for p in prompts[:8]]
    common = dict(model=str(model), requests=reqs, max_tokens=8, logprobs=2, max_lora_rank=32,
                  max_cpu_loras=len(adapters))
    kw = {"enforce_eager": True, "max_model_len": 512, "max_num_seqs": 32,
          "gpu_memory_utilization": 0.5}
    if quantization == "fp8":
        kw["quantization"] = "fp8"
    stock = run_workload(Workload(plugin="none", max_loras=len(adapters), llm_kwargs=kw, **common))
    slora = run_workload(Workload(plugin="on", max_loras=1, llm_kwargs=kw, **common))
    assert slora["quantization"] == stock["quantization"], (slora["quantization"], stock["quantization"])
    assert slora["quantization"] in EXPECTED_METHOD[quantization], slora["quantization"]
    assert slora["stats"]["loads"] >= len(adapters)
    got = compare_runs(slora["outputs"], stock["outputs"], threshold=TIE[quantization])
    print(f"{quantization}: plugin vs stock {got['identical']}/{got['requests']} identical, "
          f"max logprob diff {got['max_logprob_diff']:.2e}, divergences {got['divergences']}")
    if quantization == "fp8":
        rebatched = run_workload(Workload(plugin="none", max_loras=len(adapters),
                                          llm_kwargs=dict(kw, max_num_seqs=8), **common))
        control = compare_runs(rebatched["outputs"], stock["outputs"], threshold=TIE[quantization])
        print(f"fp8 control: stock (8 sequences) vs stock {control['identical']}/"
              f"{control['requests']} identical, max logprob diff "
              f"{control['max_logprob_diff']:.2e}, divergences {control['divergences']}")
        print(f"fp8 worst first-divergence margin: plugin vs stock {worst_margin(got):.3f}, "
              f"control {worst_margin(control):.3f}")
        assert within_control(got, control), (got["divergences"], control["divergences"])
    else:
        assert got["clear"] == 0, got["divergences"]
        assert got["identical"] >= IDENTICAL[quantization] * got["requests"]
    outs = slora["outputs"]
    changed = sum(outs[i]["token_ids"] != outs[24 + i]["token_ids"] for i in range(8))
    assert changed >= 6, f"adapters changed only {changed} of 8 outputs"
