"""A quantized base on CPU: AWQ (4-bit, what vLLM's CPU backend serves, with
its CPU WNA16 kernel), adapters in float16; the plugin's outputs equal stock
vLLM's LoRA on the same quantized model. FP8 is GPU only: stock vLLM 0.26's
CPU engine does not start with ``quantization="fp8"`` (tests/gpu/test_quantized.py
covers FP8 and AWQ on the GPU).

float16, not bfloat16: AWQ on CPU takes no float32, and in bfloat16 two
correct LoRA paths that round at different places differ by up to 0.06
nats on CPUs with AMX (seen: a three-way near-tie flipped), too close to
a real error to tell apart; float16's finer mantissa leaves 0.006.
"""

from __future__ import annotations

import random

import pytest

from vllm_slora.testing.compare import compare_runs
from vllm_slora.testing.runner import IN_PROCESS_ENV, Workload, run_workload

pytestmark = pytest.mark.slow

TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)


def test_awq_base_same_outputs_as_stock(tmp_path):
    from vllm_slora.testing.adapters import make_adapters
    from vllm_slora.testing.quantized import make_quantized_llama

    # Logits of standard deviation 1: a 512-token vocabulary leaves clear
    # margins, and float16 resolves logprobs to ~0.005.
    model = make_quantized_llama(tmp_path / "model", "awq", shape=TINY, seed=3, logit_scale=1.0)
    adapters = [str(p) for p in make_adapters(tmp_path / "adapters", model, [8, 16, 4], seed=4)]
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(6, 24))] for _ in range(6)]
    # Stock's CPU LoRA gives a request without an adapter the last slot's
    # adapter (test_outputs.py): requests without one run on the plugin only,
    # to show that the adapters change the outputs.
    reqs = [(p, adapters[i % len(adapters)]) for i, p in enumerate(prompts)]
    common = dict(model=str(model), max_tokens=8, logprobs=2, max_lora_rank=16,
                  llm_kwargs={"enforce_eager": True, "dtype": "float16", "max_model_len": 256},
                  env=IN_PROCESS_ENV)
    stock = run_workload(Workload(plugin="none", requests=reqs, max_loras=3, **common))
    slora = run_workload(Workload(plugin="on", requests=reqs + [(p, None) for p in prompts],
                                  max_loras=1, **common))
    assert stock["quantization"] == slora["quantization"] == "awq"
    got = compare_runs(slora["outputs"][:len(reqs)], stock["outputs"])
    assert got["clear"] == 0, got["divergences"]
    assert got["identical"] >= len(reqs) - 1, got["divergences"]  # one near-tie at most
    assert got["max_logprob_diff"] < 0.02
    outs = slora["outputs"]
    assert sum(outs[i]["token_ids"] != outs[len(reqs) + i]["token_ids"] for i in range(len(reqs))) >= 5
    assert slora["stats"]["loads"] >= len(adapters)
