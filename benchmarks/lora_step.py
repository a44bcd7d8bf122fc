"""LoRA kernel time of one decode step as the engine's CUDA graphs run it, under knob variants.

    python -m benchmarks.lora_step [--batches 64,256] [--adapters 5,64] [--variants all]
                                   [--pages random,blocks] [--kernels]
    python -m benchmarks.lora_step --dry-run      # CPU: interpreter, tiny shapes, no timing

The engine's decode step (``benchmarks.step_time --profile``) showed the
plugin's LoRA kernels taking 1.6-6 ms per step of a 7B model where the
adapters' bytes need 0.07-0.8 ms. Engine runs cost minutes each; this
script times the same kernels in seconds, set up as a step of the engine:
``max_num_seqs`` = 256 adapter slots (the graphs' static L), ranks 8/16/32/64
on q,k,v,o (the headline workload), gate_up and down called with rank 0 (as
the engine calls every LoRA'd module of every layer), one
``group_by_adapter`` per step, token i on adapter i mod n. Per module:
``benchmarks.kernels.graph_us`` (the call captured REPS times in a CUDA
graph, L2 evicted before each call, as the base model's GEMMs evict it
between two LoRA calls; the eviction alone subtracted). A step is 32 layers
of the four modules. Variants set the grouped kernels' knobs
(``kernels/knobs.py``); every variant's output is checked against the
PyTorch reference first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

LAYERS = 32
HIDDEN, INTER = 4096, 11008
MODULES = {"qkv": (HIDDEN, [HIDDEN] * 3), "o": (HIDDEN, [HIDDEN]),
           "gate_up": (HIDDEN, [INTER] * 2), "down": (INTER, [HIDDEN])}
LORA_MODULES = ("qkv", "o")  # the headline adapters' targets; the others run at rank 0
RANKS = [8, 16, 32, 64]
VARIANTS = {
    "default": {},
    "resident4-fuse8k": {"RESIDENT_PROGRAMS_PER_SM": 4, "FUSED_PARTIALS_BYTES": 8 << 10},
    "resident8": {"RESIDENT_PROGRAMS_PER_SM": 8},
    "few16": {"FEW_GROUPS": 16},
    "few32": {"FEW_GROUPS": 32},
    "resident32-few32": {"RESIDENT_PROGRAMS_PER_SM": 32, "FEW_GROUPS": 32},
    "nosplit": {"MAX_SPLIT": 1},
    # Before the tile list: each work item scans the group bounds; before the
    # any-rank check: rank-0 modules run every item to find no rank.
    "scan": {"TILE_LIST": False},
    "norankcheck": {"ANY_RANK_CHECK": False},
    "before": {"TILE_LIST": False, "ANY_RANK_CHECK": False},
    "br32": {"SMALL_TILE_SHRINK": (32, 256)},  # BR 32 (64 for q,k,v)
    "br16": {"SMALL_TILE_SHRINK": (8, 256)},  # BR 8 (16 for q,k,v: before 2026-12-02 pm)
    # One token per adapter (2,000 adapters: ~210 distinct in a decode step
    # of ~215): split-K and column streaming planned for every slot in use,
    # or no grouping at all (each token its own tile).
    "few256": {"FEW_GROUPS": 256},
    "pertoken": {"PER_TOKEN_MAX_T": 512},
    # The shrink's split chosen on the device from the step's tiles, or
    # planned on the host (the default before 2026-12-07; "hostsplit" and
    # "devsplit" in the results of that day ran with 16 programs an SM).
    "devsplit": {"DEVICE_SPLIT": True},
    "hostsplit": {"DEVICE_SPLIT": False},
    "devsplit-r8": {"DEVICE_SPLIT": True, "RESIDENT_PROGRAMS_PER_SM": 8},
    "hostsplit-r8": {"DEVICE_SPLIT": False, "RESIDENT_PROGRAMS_PER_SM": 8},
    # The defaults up to 2026-12-07 (the device split off, 16 programs an SM).
    "stop42": {"DEVICE_SPLIT": False, "RESIDENT_PROGRAMS_PER_SM": 16},
    # The split rule aimed at 16 items an SM instead of 4 (PROGRAMS_PER_SM;
    # the host's plan follows it too): at 216 one-token adapters q,k,v and o
    # split in two instead of not at all (mixed steps lost 5% unsplit), and
    # a step of 5 popular adapters splits q,k,v 8 ways instead of 4.
    "devsplit-pps16": {"DEVICE_SPLIT": True, "PROGRAMS_PER_SM": 16},
    "devsplit-bk128": {"DEVICE_SPLIT": True, "SMALL_TILE_SHRINK": (16, 128)},
    # The expand's column blocks per item as few256 plans them (16, not 8):
    # longer items, one header chain for twice the B bytes.
    "devsplit-e1": {"DEVICE_SPLIT": True, "EXPAND_PROGRAMS_PER_SM": 1},
    # Rank blocks of 16 for q,k,v (8 elsewhere): with no split at 216
    # one-token adapters, items of up to 128 KB instead of 256.
    "devsplit-br16": {"DEVICE_SPLIT": True, "SMALL_TILE_SHRINK": (8, 256)},
    # Persistent grids sized near what an SM holds (3-4 programs): fewer
    # programs that find no rank and exit in the rank-0 calls (gate_up, down).
    "resident4": {"RESIDENT_PROGRAMS_PER_SM": 4},
    # Shared memory a program (the shrink's pipeline buffers, BK) against
    # programs per SM: 3 q,k,v shrink programs fit an SM by default.
    "stages3": {"SHRINK_STAGES": 3},
    "stages2": {"SHRINK_STAGES": 2, "EXPAND_STAGES": 2},
    "bk128": {"SMALL_TILE_SHRINK": (16, 128)},
    "few256-bk128": {"FEW_GROUPS": 256, "SMALL_TILE_SHRINK": (16, 128)},
    "few256-stages3": {"FEW_GROUPS": 256, "SHRINK_STAGES": 3},
    # Registers a thread capped (ptxas .maxnreg: shrink, expand): 8% slower at
    # 216 adapters on an H100 (shared memory bounds the programs an SM holds).
    "reg96": {"SMALL_TILE_MAXNREG": (96, 96)},
}


def setup(batch: int, n: int, slots: int, d: int, widths: dict, device: str, dtype,
          prefill: int = 0, pages: str = "random"):  # fmt: skip
    """Per module: adapters, static slot tensors (slots past n: rank 0), x, y.

    ``prefill`` > 0: a mixed step, the batch's decode tokens followed by one
    prompt chunk of that many tokens on adapter 0 (as a step that admits a
    request while the batch decodes). ``pages``: "random" scatters every
    page (512 bytes at D = 256) over the pool; "blocks" packs each adapter
    into whole KV blocks, a vector's pages consecutive, as the engine does
    (``benchmarks.kernels.cases.page_tables``).
    """
    import torch

    from vllm_slora.kernels import batch_meta
    from vllm_slora.testing.synthetic import make_paged_adapters

    token_lora = torch.cat([torch.arange(batch, dtype=torch.int32) % n,
                            torch.zeros(prefill, dtype=torch.int32)]).to(device)
    batch += prefill
    meta = batch_meta(token_lora, slots)  # as the engine: None for per-token batches
    out = {}
    for i, (name, (k, ns)) in enumerate(widths.items()):
        ranks = [RANKS[j % len(RANKS)] for j in range(n)]
        used = name in LORA_MODULES
        if pages == "random":
            ad = make_paged_adapters(ranks if used else [1], k, ns, d, dtype, device=device, seed=i)
        else:
            from benchmarks.kernels.cases import build_adapters

            gen = torch.Generator(device=device).manual_seed(i)
            ad = build_adapters(torch, k, ns, ranks if used else [1], d, dtype, device, gen, pages)
        start = torch.zeros(slots, dtype=torch.int32, device=device)
        rank = torch.zeros(slots, dtype=torch.int32, device=device)
        scale = torch.ones(slots, dtype=torch.float32, device=device)
        if used:
            start[:n], rank[:n], scale[:n] = ad.lora_start, ad.lora_rank, ad.lora_scale
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(batch, k, generator=gen).to(dtype).to(device)
        y = torch.randn(batch, sum(ns), generator=gen).to(dtype).to(device)
        out[name] = (ad, start, rank, scale, x, y)
    return token_lora, meta, out


def adapter_bytes(batch: int, n: int, widths: dict, elem: int) -> dict:
    """Bytes of adapter pages a step's call of each module must read: every
    distinct adapter's A and B once (modules outside LORA_MODULES: none)."""
    ranks = sum(RANKS[j % len(RANKS)] for j in range(min(n, batch)))
    return {m: ranks * (k * len(ns) + sum(ns)) * elem if m in LORA_MODULES else 0
            for m, (k, ns) in widths.items()}


def call(module, token_lora, meta, max_rank: int):
    from vllm_slora.kernels import paged_lora

    ad, start, rank, scale, x, y = module
    a_rows = ad.a_rows if len(ad.a_rows) > 1 else ad.a_rows[0]
    b_rows = ad.b_rows if len(ad.b_rows) > 1 else ad.b_rows[0]
    paged_lora(x, y, ad.pool, a_rows, b_rows, start, rank, scale, token_lora,
               max_rank=max_rank, meta=meta, dispatch=False)


def check(module, token_lora, meta, max_rank: int) -> float:
    """Relative error of one call against the PyTorch reference."""
    from vllm_slora.kernels import reference

    ad, start, rank, scale, x, y = module
    a_rows = ad.a_rows if len(ad.a_rows) > 1 else ad.a_rows[0]
    b_rows = ad.b_rows if len(ad.b_rows) > 1 else ad.b_rows[0]
    y0 = y.clone()
    want = y.clone()
    reference.paged_lora(x, want, ad.pool, a_rows, b_rows, start, rank, scale, token_lora)
    call(module, token_lora, meta, max_rank)
    err = ((y.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12)).item()
    y.copy_(y0)
    return err


def apply_variant(values: dict) -> dict:
    """Set knobs (``vllm_slora/kernels/knobs.py``); returns their old values.
    Plans are cached per knob values, so nothing else needs clearing."""
    from vllm_slora.kernels import knobs

    old = {k: getattr(knobs, k) for k in values}
    for k, v in values.items():
        setattr(knobs, k, v)
    return old


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="64,256")
    p.add_argument("--adapters", default="5,64")
    p.add_argument("--prefill", default="0",
                   help="prompt tokens (of adapter 0) added to each batch, e.g. 0,256: mixed steps")
    p.add_argument("--slots", type=int, default=256)
    p.add_argument("--pages", default="random",
                   help="page placements, comma-separated: random rows (worst case, the "
                        "results before 2026-12-07) and/or blocks (the engine's: an "
                        "adapter's whole blocks)")
    p.add_argument("--variants", default="all")
    p.add_argument("--kernels", action="store_true",
                   help="also each kernel's time per module call (torch.profiler, eager, "
                        "programmatic dependent launch off): the shrink against the expand")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    placements = args.pages.split(",")
    if set(placements) - {"random", "blocks"}:
        p.error(f"--pages: random and/or blocks, not {args.pages!r}")
    import os

    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    import vllm_slora.kernels as kernels

    kernels.BACKEND_OVERRIDE = "triton"
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    if args.dry_run:
        device, dtype, d, slots = "cpu", torch.float32, 32, 8
        widths = {"qkv": (64, [64, 32, 32]), "o": (64, [64]), "gate_up": (64, [96, 96]),
                  "down": (96, [64])}
        batches, ns, names, prefills = [40], [3], names[:2], [0, 24]
    else:
        device, dtype, d, slots = "cuda", torch.float16, 256, args.slots
        widths, batches, ns = MODULES, ints(args.batches), ints(args.adapters)
        prefills = ints(args.prefill)
    max_rank = max(RANKS)
    results = {"command": "python -m benchmarks.lora_step " + " ".join(argv or sys.argv[1:]),
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "slots": slots, "pages": placements, "cases": []}
    # Evicts L2 (50 MB) before each timed call.
    flush = (torch.empty(96 << 20, dtype=torch.uint8, device=device).zero_ if device == "cuda"
             else None)
    for pages, batch, n, prefill in itertools.product(placements, batches, ns, prefills):
        token_lora, meta, mods = setup(batch, n, slots, d, widths, device, dtype, prefill, pages)
        for name in names:
            old = apply_variant(VARIANTS[name])
            try:
                errs = {m: check(mod, token_lora, meta, max_rank) for m, mod in mods.items()}
                row = {"pages": pages, "batch": batch, "adapters": n, "prefill": prefill,
                       "variant": name, "max_rel_err": max(errs.values())}
                if device == "cuda":
                    from benchmarks.kernels.timing import graph_us

                    per = {m: graph_us(lambda mod=mod: call(mod, token_lora, meta, max_rank),
                                       flush)
                           for m, mod in mods.items()}
                    row["us_per_module"] = per
                    row["step_ms"] = LAYERS * sum(per.values()) / 1e3
                    # The adapter modules' rate: their pages' bytes over their time
                    # (HBM: ~3.35 TB/s on an H100, ~4.8 on an H200).
                    need = adapter_bytes(batch, n, widths, dtype.itemsize)
                    used = sum(per[m] for m in need if need[m])
                    row["adapter_tb_s"] = sum(need.values()) / max(used, 1e-9) / 1e6
                    if args.kernels:
                        row["kernel_us"] = kernel_times(mods, token_lora, meta, max_rank, flush)
                results["cases"].append(row)
                print(json.dumps(row), flush=True)
            finally:
                apply_variant(old)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    print(table(results["cases"]))
    if args.kernels:
        print(kernel_table(results["cases"]))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    bad = [r for r in results["cases"] if r["max_rel_err"] > (1e-4 if device == "cpu" else 1e-2)]
    return 1 if bad else 0


def kernel_times(mods: dict, token_lora, meta, max_rank: int, flush) -> dict:
    """Per module, each kernel's GPU us per call (``timing.kernel_us``), PDL off."""
    from benchmarks.kernels.timing import kernel_us

    old = apply_variant({"PDL": False})
    try:
        return {m: kernel_us(lambda mod=mod: call(mod, token_lora, meta, max_rank), flush)
                for m, mod in mods.items()}
    finally:
        apply_variant(old)


def kernel_table(rows: list[dict]) -> str:
    """The kernels' us per module call, for the rows that have them."""
    lines = ["| pages | batch | adapters | variant | module | kernel us (PDL off) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        for m, per in r.get("kernel_us", {}).items():
            ks = ", ".join(f"{name.strip('_')[:24]} {us:.1f}" for name, us in per.items())
            lines.append(f"| {r.get('pages', 'random')} | {r['batch']} | {r['adapters']} | "
                         f"{r['variant']} | {m} | {ks} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| pages | batch | adapters | prefill | variant | step LoRA ms | qkv us | o us "
             "| gate_up us | down us | adapters' TB/s | err |", "|---" * 12 + "|"]
    for r in rows:
        per = r.get("us_per_module", {})
        lines.append(f"| {r.get('pages', 'random')} | {r['batch']} | {r['adapters']} | "
                     f"{r.get('prefill', 0)} | {r['variant']} | "
                     f"{r.get('step_ms', float('nan')):.2f} | "
                     + " | ".join(f"{per.get(m, float('nan')):.1f}" for m in MODULES)
                     + f" | {r.get('adapter_tb_s', float('nan')):.2f} | {r['max_rel_err']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = main()
    print(f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    sys.exit(rc)
