"""The main job on an embedded default: stock vLLM LoRA vs S-LoRA mode.

Makes a tiny random GQA Llama and a few dozen random PEFT adapters of mixed
ranks on the fly, runs the same token-id workload through stock vLLM
multi-LoRA and through the plugin, and prints a side-by-side table.
Runs on CPU when there is no GPU.

    python -m vllm_slora.demo [--adapters 32] [--requests 64] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

from vllm_slora.testing.adapters import make_adapters
from vllm_slora.testing.models import make_tiny_llama
from vllm_slora.testing.runner import Workload, run_workload

RANKS = (4, 8, 16, 32)


def build_workload(model: Path, adapters: list[Path], n_requests: int, seed: int):
    rng = random.Random(seed)
    vocab = 512
    requests = []
    for _ in range(n_requests):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(8, 48))]
        requests.append((prompt, str(rng.choice(adapters))))
    return requests


def plugin_available() -> bool:
    from vllm_slora.patches import MODE_PATCHES

    return bool(MODE_PATCHES)


def demo_dtype() -> str:
    """float32 on CPU: vLLM's dtype "auto" would run the float32 checkpoint in
    16 bits, where near-ties flip greedy tokens. On a GPU float16, the
    smallest dtype that stock vLLM's LoRA kernels take (both systems then
    round alike but not bit-identically: a near-tie may still flip)."""
    import torch

    return "float16" if torch.cuda.is_available() else "float32"


def row(name: str, result: dict | None, n_requests: int, adapters: int, note: str) -> list[str]:
    if result is None:
        return [name, str(n_requests), "-", "-", note]
    tps = result["output_tokens"] / result["elapsed_s"]
    return [name, str(n_requests), f"{tps:,.0f}", str(adapters), note]


def print_table(rows: list[list[str]]) -> None:
    header = ["system", "requests", "output tok/s", "adapters served", "outputs agree with stock"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths]] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--stock-max-loras", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="slora-demo-"))
    print(f"tiny model and {args.adapters} adapters of ranks {RANKS} in {workdir} "
          f"({demo_dtype()})")
    model = make_tiny_llama(workdir / "model")
    ranks = [RANKS[i % len(RANKS)] for i in range(args.adapters)]
    adapters = make_adapters(workdir / "adapters", model, ranks, seed=args.seed, progress=True)
    requests = build_workload(model, adapters, args.requests, args.seed)
    served = len({a for _, a in requests})
    common = dict(model=str(model), requests=requests, max_tokens=args.max_tokens,
                  max_lora_rank=max(RANKS), max_cpu_loras=args.adapters,
                  llm_kwargs={"enforce_eager": True, "dtype": demo_dtype()})

    print(f"stock vLLM, max_loras={args.stock_max_loras} ...", flush=True)
    stock = run_workload(Workload(plugin="none", max_loras=args.stock_max_loras, **common))
    rows = [row(f"stock (max_loras={args.stock_max_loras})", stock, args.requests, served, "-")]

    if plugin_available():
        print("vllm_slora ...", flush=True)
        slora = run_workload(Workload(plugin="on", max_loras=args.stock_max_loras, **common))
        agree = sum(a["token_ids"] == b["token_ids"]
                    for a, b in zip(stock["outputs"], slora["outputs"]))
        rows.append(row("vllm_slora", slora, args.requests, served,
                        f"{agree}/{args.requests} identical"))
    else:
        rows.append(row("vllm_slora", None, args.requests, served,
                        "not available yet (unified paging has not landed)"))
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
