"""Memory pressure on the GPU with async scheduling (GPU only): adapters
evicted and paged in again through the copy streams while the next step is
scheduled during this one, KV blocks reused by the next step, requests
preempted; every output must equal a run with room to spare, or differ first
at a near-tie (other batches, other kernel tiles: fp16 rounding).
"""

from __future__ import annotations

import random

import pytest
import torch

from vllm_slora.testing.compare import compare_runs
from vllm_slora.testing.runner import Workload, run_workload

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_pressure_with_async_scheduling_equals_a_roomy_run(tmp_path):
    from vllm_slora.testing.adapters import make_adapters
    from vllm_slora.testing.models import make_tiny_llama

    model = make_tiny_llama(tmp_path / "model", hidden=256, heads=4, kv_heads=2, intermediate=512,
                            layers=2, dtype="float16")
    # Rank r on all seven projections takes r KV blocks of 16 tokens here:
    # the 12 adapters take 180 blocks, 32 running requests up to ~250.
    adapters = make_adapters(tmp_path / "adapters", model, [(4, 8, 16, 32)[i % 4] for i in range(12)])
    rng = random.Random(1)
    reqs = [([rng.randrange(3, 512) for _ in range(rng.randint(8, 96))],
             None if i % 9 == 0 else str(adapters[(i * 5) % len(adapters)])) for i in range(96)]
    common = dict(model=str(model), requests=reqs, plugin="on", max_loras=1, max_tokens=24, logprobs=2,
                  max_lora_rank=32, max_cpu_loras=12)
    kw = {"gpu_memory_utilization": 0.3, "max_num_seqs": 32, "async_scheduling": True,
          "compilation_config": {"max_cudagraph_capture_size": 32}}
    roomy = run_workload(Workload(llm_kwargs=kw, **common))
    tight = run_workload(Workload(llm_kwargs=dict(kw, num_gpu_blocks_override=160), **common))
    sched = tight["stats"]["scheduler"]
    print(f"tight: scheduler {sched}; worker evictions {tight['stats']['evictions']}")
    assert sched["evictions"] > 0 and sched["reloads"] > 0  # pressure really happened
    assert roomy["stats"]["scheduler"]["evictions"] == 0
    got = compare_runs(tight["outputs"], roomy["outputs"])
    print(f"tight vs roomy: {got['identical']}/{got['requests']} identical, divergences {got['divergences']}")
    assert got["clear"] == 0, got["divergences"]
    assert got["identical"] >= 0.75 * got["requests"]
