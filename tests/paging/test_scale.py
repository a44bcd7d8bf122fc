"""Scale: 2,000 adapters, one request each, ``max_loras=1`` passed. Hundreds
are resident over time (the pool evicts the oldest unreferenced ones when its
blocks are needed) and one batch mixes 96 distinct adapters; every
request finishes, and a sample equals Hugging Face transformers + PEFT."""

from __future__ import annotations

import pytest
from conftest import NUM_SCALE_ADAPTERS, prompts, run_engine
from peft_reference import PeftReference

pytestmark = pytest.mark.slow

MAX_TOKENS = 4
SAMPLE = range(0, NUM_SCALE_ADAPTERS, 97)
LOGPROB_TOL = 2e-3


@pytest.fixture(scope="module")
def scale_run(tiny_model, scale_adapters):
    reqs = list(zip(prompts(NUM_SCALE_ADAPTERS, seed=7, lo=6, hi=12), scale_adapters))
    phase = {"name": "scale", "requests": reqs, "max_tokens": MAX_TOKENS}
    # 512 KV blocks: fewer than the 2,000 adapters need together (one each);
    # at most 96 running requests, so requests wait and their adapters can be
    # paged in ahead of admission.
    kwargs = {"dtype": "float32", "max_loras": 1, "max_lora_rank": 8, "max_num_seqs": 96,
              "num_gpu_blocks_override": 512, "max_model_len": 256}
    result = run_engine({"model": str(tiny_model), "mode": "slora", "phases": [phase],
                         "llm_kwargs": kwargs})
    return reqs, result["phases"][0]


def test_every_request_finishes(scale_run, record_property):
    reqs, phase = scale_run
    assert len(phase["outputs"]) == len(reqs)
    assert all(len(o["token_ids"]) == MAX_TOKENS for o in phase["outputs"])
    sched = phase["report"]["stats"]["scheduler"]
    record_property("scale_counters", sched)
    print(f"\nscale: {sched['distinct_adapters_seen']} adapters, peak resident "
          f"{sched['peak_adapters']}, max distinct in one step {sched['max_distinct_in_step']}, "
          f"loads {sched['loads']} ({sched['loaded_ahead']} ahead of admission), "
          f"evictions {sched['evictions']}, "
          f"generate {phase['elapsed_s']:.1f} s")
    assert sched["distinct_adapters_seen"] == NUM_SCALE_ADAPTERS
    assert sched["max_distinct_in_step"] >= 64
    assert sched["peak_adapters"] >= 200  # hundreds resident at once
    assert sched["evictions"] > 0
    assert sched["loaded_ahead"] > 0  # prefetch: pages filled before admission


def test_sample_equals_peft(scale_run, tiny_model):
    reqs, phase = scale_run
    ref = PeftReference(str(tiny_model))
    for i in SAMPLE:
        prompt, adapter = reqs[i]
        tokens, lps = ref.greedy(prompt, adapter, MAX_TOKENS)
        got = phase["outputs"][i]
        assert got["token_ids"] == tokens, f"request {i} ({adapter})"
        assert max(abs(a - b) for a, b in zip(got["logprobs"], lps)) <= LOGPROB_TOL
