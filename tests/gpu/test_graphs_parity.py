"""The plugin inside vLLM's CUDA graphs (GPU only): the same outputs as stock.

A tiny fp16 Llama with mixed-rank adapters on all seven projections, run by
stock vLLM's LoRA, by the plugin with vLLM's default graph mode on the V2
runner and the op captured (``VLLM_SLORA_CUDAGRAPH=captured``,
FULL_AND_PIECEWISE: full graphs for decode steps, piecewise ones for mixed
steps, both holding the paged LoRA op), by the plugin with the op between
piecewise graphs (the default for now), and by the plugin eager. Every
greedy output must equal the other run's or differ first at a near-tie
(both top-2 margins < 0.05 nats, ``vllm_slora.testing.compare``): a LoRA op
captured without its adapters, or replaying a stale step, gives clear
differences.
"""

from __future__ import annotations

import random

import pytest
import torch

from vllm_slora.testing.compare import compare_runs
from vllm_slora.testing.runner import Workload, run_workload

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def workloads(work) -> dict:
    """The tiny fp16 model, its adapters and the three runs (also used by
    ``scripts/gpu_parity_diag.py``)."""
    from vllm_slora.testing.adapters import make_adapters
    from vllm_slora.testing.models import make_tiny_llama

    model = make_tiny_llama(work / "model", hidden=256, heads=4, kv_heads=2, intermediate=512,
                            layers=2, dtype="float16")
    adapters = make_adapters(work / "adapters", model, [(4, 8, 16, 32)[i % 4] for i in range(12)])
    rng = random.Random(0)
    # 96 requests, 1 in 7 without adapter: prefill and decode steps of many sizes.
    reqs = [([rng.randrange(3, 512) for _ in range(rng.randint(4, 96))],
             None if i % 7 == 0 else str(adapters[i % len(adapters)])) for i in range(96)]
    common = dict(model=str(model), requests=reqs, max_tokens=24, logprobs=2, max_lora_rank=32,
                  max_cpu_loras=12)
    # Graph sizes up to 64 (11 sizes, for a short start); a bigger
    # decode batch would run piecewise.
    kw = {"gpu_memory_utilization": 0.3, "max_num_seqs": 64,
          "compilation_config": {"max_cudagraph_capture_size": 64}}
    return {
        "stock": Workload(plugin="none", max_loras=12, llm_kwargs=kw, **common),
        "graphs": Workload(plugin="on", max_loras=1, llm_kwargs=kw,
                           env={"VLLM_SLORA_CUDAGRAPH": "captured"}, **common),
        "pieces": Workload(plugin="on", max_loras=1, llm_kwargs=kw,
                           env={"VLLM_SLORA_CUDAGRAPH": "between-pieces"}, **common),
        "eager": Workload(plugin="on", max_loras=1, llm_kwargs=dict(kw, enforce_eager=True),
                          **common),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs[name]``: the workload's result under stock, the plugin with
    the op captured, between pieces, or eager; each engine runs on first use."""
    loads = workloads(tmp_path_factory.mktemp("graphs"))

    class Runs(dict):
        def __missing__(self, name):
            self[name] = run_workload(loads[name])
            return self[name]

    return Runs()


@pytest.mark.parametrize("a,b", [("graphs", "stock"), ("graphs", "eager"), ("pieces", "eager")])
def test_outputs_equal_or_near_ties(runs, a, b):
    got = compare_runs(runs[a]["outputs"], runs[b]["outputs"])
    print(f"{a} vs {b}: {got['identical']}/{got['requests']} identical, "
          f"max logprob diff {got['max_logprob_diff']:.2e}, divergences {got['divergences']}")
    assert got["clear"] == 0, got["divergences"]
    assert got["identical"] >= 0.75 * got["requests"]


def test_plugin_ran_with_full_graphs(runs):
    assert "FULL_AND_PIECEWISE" in runs["graphs"]["cudagraph_mode"]
    assert runs["graphs"]["stats"]["loads"] >= 12
    # Steps over the largest capture size (64) ran eagerly, their LoRA
    # calls replaying the first layer's launches (kernels/replay.py).
    assert runs["graphs"]["stats"]["lora_replays"] > 0
