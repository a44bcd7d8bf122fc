"""S-LoRA mode vs stock vLLM on the GPU machine, tiny model: same outputs?

    python scripts/gpu_smoke.py [--eager] [--out DIR]

Runs one workload (mixed-rank adapters on all seven projections) through
stock vLLM and through the plugin, with the GPU runner's defaults
(torch.compile + CUDA graphs) unless --eager, prints agreement and the
plugin's counters, and exits 1 unless both ran and every greedy output is
identical to stock's or differs first at a near-tie (both top-2 margins <
0.05 nats, ``vllm_slora.testing.compare``), with at least 75% identical.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

from vllm_slora.testing.adapters import make_adapters
from vllm_slora.testing.compare import compare_runs
from vllm_slora.testing.models import make_tiny_llama
from vllm_slora.testing.runner import Workload, run_workload


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--adapters", type=int, default=12)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="slora-gpu-smoke-"))
    model = make_tiny_llama(work / "model", hidden=256, heads=4, kv_heads=2,
                            intermediate=512, layers=2, dtype="float16")
    ranks = [(4, 8, 16, 32)[i % 4] for i in range(args.adapters)]
    adapters = make_adapters(work / "adapters", model, ranks)
    rng = random.Random(0)
    reqs = [([rng.randrange(3, 512) for _ in range(rng.randint(4, 64))],
             None if i % 7 == 0 else str(adapters[i % len(adapters)]))
            for i in range(args.requests)]
    common = dict(model=str(model), requests=reqs, max_tokens=16, logprobs=2,
                  max_lora_rank=32, max_cpu_loras=args.adapters,
                  llm_kwargs={"enforce_eager": args.eager, "gpu_memory_utilization": 0.3})
    results = {}
    for name, plugin, max_loras in [("stock", "none", args.adapters), ("slora", "on", 1)]:
        try:
            results[name] = run_workload(Workload(plugin=plugin, max_loras=max_loras, **common))
        except Exception as e:  # report and go on: the other system's numbers still count
            print(f"{name}: FAILED\n{str(e)[-5000:]}")
            results[name] = None
    stock, slora = results["stock"], results["slora"]
    ok = False
    if stock and slora:
        got = compare_runs(slora["outputs"], stock["outputs"])
        ok = got["clear"] == 0 and got["identical"] >= 0.75 * got["requests"]
        print(f"eager={args.eager}: {got['identical']}/{got['requests']} identical greedy "
              f"outputs, {got['clear']} clear differences, max |logprob diff| "
              f"{got['max_logprob_diff']:.2e}: {'OK' if ok else 'FAILED'}")
        if got["clear"]:
            print("divergences:", got["divergences"])
        print("slora stats:", json.dumps(slora["stats"])[:2000])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, r in results.items():
            if r:
                (args.out / f"{name}{'-eager' if args.eager else ''}.log").write_text(r["log"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
