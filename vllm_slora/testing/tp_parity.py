"""Greedy outputs at --tensor-parallel-size 2 against 1, stock and plugin.

One workload (tiny GQA Llama, adapters of mixed ranks including 1 and 3, so
that the strided split of A leaves a rank with no vector of an adapter and
an odd rank splits unevenly) through ``vllm.LLM`` four times: stock and
plugin, TP 1 and 2. In float32 the plugin's TP 2 must give the same tokens
as its TP 1 and as stock's TP 2 (``tests/tp/test_engine_tp.py``); in 16 bits
the runs may differ at near-ties, as stock's TP 2 does from its TP 1.

    python -m vllm_slora.testing.tp_parity --out tp-parity.json   # GPU: 2 cards
    (CPU: VLLM_CPU_OMP_THREADS_BIND="0|1" gives each worker one core)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from vllm_slora.testing.adapters import ALL_SEVEN, FUSED, make_adapters
from vllm_slora.testing.compare import compare_runs
from vllm_slora.testing.models import ARCHITECTURES, make_tiny_llama
from vllm_slora.testing.runner import Workload, run_workload

RANKS = (1, 3, 8, 16)
RUNS = (("on", 2), ("on", 1), ("none", 2), ("none", 1))


def workload(root: Path, plugin: str, tp: int, *, requests: int = 8, max_tokens: int = 8,
             backend: str = "mp", eager: bool = True, dtype: str = "float32",
             arch: str = "llama") -> Workload:
    """``arch``: a tiny model of ``testing.models.ARCHITECTURES``; Phi-3's
    adapters target its checkpoint-fused modules (qkv_proj, gate_up_proj)."""
    model = make_tiny_llama(root / f"model-{arch}-{dtype}", dtype=dtype, arch=arch)
    targets = FUSED if ARCHITECTURES[arch].get("fused") else ALL_SEVEN
    adapters = make_adapters(root / f"adapters-{arch}-{dtype}", model, RANKS, seed=3,
                             target_modules=targets)
    reqs = [([1 + (7 * i + j) % 500 for j in range(10 + i)], str(adapters[i % len(adapters)]))
            for i in range(requests)]
    # dtype explicitly: vLLM's "auto" runs a float32 checkpoint in 16 bits.
    kwargs = dict(tensor_parallel_size=tp, distributed_executor_backend=backend,
                  enforce_eager=eager, dtype=dtype)
    return Workload(model=str(model), requests=reqs, plugin=plugin, max_tokens=max_tokens,
                    logprobs=2, max_loras=len(RANKS), max_lora_rank=max(RANKS),
                    llm_kwargs=kwargs)


def run_all(root: Path, runs=RUNS, done=None, **kw) -> dict:
    """Run each (plugin, tp) of ``runs``; ``done(results so far)`` after each."""
    out = {}
    for plugin, tp in runs:
        r = run_workload(workload(root, plugin, tp, **kw))
        out[f"{plugin}-tp{tp}"] = r
        if done is not None:
            done(out)
    return out


def report(results: dict) -> dict:
    pairs = {}
    for a, b in (("on-tp2", "on-tp1"), ("none-tp2", "none-tp1"), ("on-tp2", "none-tp2"),
                 ("on-tp1", "none-tp1")):
        if a in results and b in results:
            pairs[f"{a} vs {b}"] = compare_runs(results[a]["outputs"], results[b]["outputs"])
    return pairs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("tp-parity.json"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--arch", default="llama", help="a tiny model of testing.models.ARCHITECTURES")
    p.add_argument("--graphs", action="store_true", help="piecewise CUDA graphs (default eager)")
    args = p.parse_args(argv)

    def loads(results: dict) -> dict:
        return {k: v.get("stats", {}).get("scheduler", {}).get("loads") for k, v in results.items()}

    def save(results: dict) -> None:  # after every run: a cut-short run keeps what it has
        args.out.write_text(json.dumps({"pairs": report(results), "plugin_loads": loads(results),
                                        "outputs": {k: v["outputs"] for k, v in results.items()}},
                                       indent=1))
        print("done:", ", ".join(f"{k} ({v['elapsed_s']:.1f} s generate)" for k, v in results.items()),
              flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        results = run_all(Path(tmp), dtype=args.dtype, eager=not args.graphs, arch=args.arch,
                          done=save)
    for name, c in report(results).items():
        print(f"{name:22s} identical {c['identical']}/{c['requests']}  clear {c['clear']}  "
              f"max logprob diff on shared tokens {c['max_logprob_diff']:.2e}  "
              f"divergences {[(d['request'], d['position'], d['class'], d['a_margin']) for d in c['divergences']]}")
    print("plugin loads per run:", loads(results), "| CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES"))


if __name__ == "__main__":
    main()
