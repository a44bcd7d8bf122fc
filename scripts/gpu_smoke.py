"""S-LoRA mode vs stock vLLM on the GPU machine, tiny model: same outputs?

    python scripts/gpu_smoke.py [--eager] [--out DIR]

Runs one workload (mixed-rank adapters on all seven projections) through
stock vLLM and through the plugin, with the GPU runner's defaults
(torch.compile + CUDA graphs) unless --eager, and prints agreement and the
plugin's counters.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from vllm_slora.testing.adapters import make_adapters
from vllm_slora.testing.models import make_tiny_llama
from vllm_slora.testing.runner import Workload, run_workload


def main() -> None:
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
    common = dict(model=str(model), requests=reqs, max_tokens=16, logprobs=1,
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
    if stock and slora:
        same = sum(a["token_ids"] == b["token_ids"] for a, b in zip(stock["outputs"], slora["outputs"]))
        diff = max((abs(x - y) for a, b in zip(stock["outputs"], slora["outputs"])
                    if a["token_ids"] == b["token_ids"]
                    for x, y in zip(a["logprobs"], b["logprobs"])), default=0.0)
        print(f"eager={args.eager}: {same}/{len(reqs)} identical greedy outputs, "
              f"max |logprob diff| on identical ones {diff:.2e}")
        print("slora stats:", json.dumps(slora["stats"])[:2000])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, r in results.items():
            if r:
                (args.out / f"{name}{'-eager' if args.eager else ''}.log").write_text(r["log"])


if __name__ == "__main__":
    main()
