"""The command line: the sweep (every case checked against the PyTorch
reference, then timed against stock and the baselines), the Nsight profile
mode (one untimed call per implementation) and the CLI that picks between
them, the knob variants and re-plotting an earlier run.
"""

import argparse
import json
import os
import sys
import time

from benchmarks import kernels as package
from benchmarks.kernels.cases import (
    DRY,
    FULL,
    MODELS,
    PAGE_LAYOUTS,
    PAGES,
    QUICK,
    RANK_SETS,
    TINY_MODULES,
    build_adapters,
    make_case,
    modules,
)
from benchmarks.kernels.plan import breakdown
from benchmarks.kernels.report import (
    HEADER,
    plot,
    print_row,
    ratios_and_bandwidth,
    summarize,
    write_json,
)
from benchmarks.kernels.stock import Stock, stock_emulated, stock_layout
from benchmarks.kernels.timing import graph_us, make_flush
from benchmarks.kernels.variants import run_variants

# The per-token padded bmm materialises [T, R_MAX, W] weights; skip beyond this.
BMM_MAX_BYTES = 4 << 30
# Per-kernel breakdown (JSON) for cases with at least this many tokens.
BREAKDOWN_MIN_TOKENS = 128
V1_MAX_TOKENS = 32
# Implementations also timed eagerly (host launch cost included).
EAGER_TIMED = ("ours", "stock")


def run(args) -> list[dict]:
    import torch

    import vllm_slora.kernels as kernels
    from vllm_slora.kernels import bmm, reference
    from vllm_slora.testing import mbgmv

    dry = args.dry_run
    sweep = DRY if dry else (QUICK if args.quick else FULL)
    device = "cpu" if dry else "cuda"
    # Triton path even on CPU (interpreter) for the dry run.
    kernels.BACKEND_OVERRIDE = "triton"
    stock_ok = False
    do_bench = flush = None
    if not dry:
        from triton.testing import do_bench

        flush = make_flush()

        try:
            import vllm.lora.ops.triton_ops  # noqa: F401

            stock_ok = True
        except ImportError as e:
            print(f"stock vLLM LoRA ops unavailable, not timed: {e}", file=sys.stderr)
    gen = torch.Generator(device=device).manual_seed(0)

    def rel_err(got, want):
        return ((got.float() - want.float()).norm() / want.float().norm()).item()

    rows = []
    for model, mods in sweep.models.items():
        geometry = modules(model) if model in MODELS else TINY_MODULES
        for mod in mods:
            k, ns = geometry[mod]
            for rset_name in sweep.rank_sets:
                rset = RANK_SETS[rset_name]
                ranks = [rset[i % len(rset)] for i in range(sweep.max_adapters)]
                ad_all = build_adapters(torch, k, ns, ranks, sweep.d, torch.float16, device, gen)
                batches = [("decode", t) for t in sweep.decode_t]
                batches += [("prefill", s) for s in sweep.prefill_segs]
                for mode, size in batches:
                    c = make_case(torch, model, mod, rset_name, mode, size, sweep, device, gen,
                                  ad_all)  # fmt: skip
                    ad, x, t, r_max = c.ad, c.x, c.token_lora.shape[0], c.r_max
                    meta = (ad.lora_start, ad.lora_rank)
                    v = torch.empty(len(ns), t, r_max, dtype=torch.float32, device=device)

                    def v1(y, v=v, ad=ad, meta=meta, x=x, token_lora=c.token_lora):
                        mbgmv.mbgmv_shrink(x, ad.pool, ad.a_rows, *meta, token_lora, v)
                        mbgmv.mbgmv_expand(
                            v, ad.pool, ad.b_rows, *meta, ad.lora_scale, token_lora, y
                        )

                    def padded_bmm(y, v=v if len(ns) > 1 else v[0], c=c, meta=meta):
                        bmm.paged_lora_shrink(c.x, c.ad.pool, c.a_rows, *meta, c.token_lora, v)
                        bmm.paged_lora_expand(
                            v, c.ad.pool, c.b_rows, *meta, c.ad.lora_scale, c.token_lora, y
                        )

                    want = c.y0.clone()
                    reference.paged_lora(
                        x, want, ad.pool, c.a_rows, c.b_rows, *meta, ad.lora_scale, c.token_lora
                    )
                    impls = {"ours": c.ours}
                    if mode == "decode" and t <= V1_MAX_TOKENS:
                        impls["v1"] = v1
                    bmm_bytes = t * r_max * max(k, max(ns)) * 2
                    if bmm_bytes <= BMM_MAX_BYTES:
                        impls["bmm"] = padded_bmm
                    if stock_ok:
                        impls["stock"] = Stock(torch, ad, r_max, c.token_lora, len(ns), x)
                    row = c.row
                    for name, fn in impls.items():
                        y = c.y0.clone()
                        fn(y)
                        row[f"err_{name}"] = rel_err(y, want)
                    if dry:
                        # Stock kernels need a GPU; check the layout we give them.
                        y = c.y0.clone()
                        stock_emulated(torch, *stock_layout(ad, r_max), x, y, c.token_lora)
                        row["err_stock_layout_emulated"] = rel_err(y, want)
                    else:
                        for name, fn in impls.items():
                            y = c.y0.clone()
                            row[f"us_{name}"] = graph_us(lambda fn=fn, y=y: fn(y), flush)
                            if name in EAGER_TIMED:
                                row[f"eager_us_{name}"] = 1e3 * do_bench(
                                    lambda fn=fn, y=y: fn(y), warmup=10, rep=30,
                                    return_mode="median",
                                )  # fmt: skip
                        row.update(ratios_and_bandwidth(row, ad, k, ns, x, c.token_lora, mode))
                        if t >= BREAKDOWN_MIN_TOKENS and not args.quick:
                            row.update(breakdown(flush, c))
                    rows.append(row)
                    print_row(row, dry)
                del ad_all
                if not dry:
                    torch.cuda.empty_cache()
    return rows


def profile_case(model, mod, rset, mode, size) -> None:
    """One case, each implementation called once (ours, then stock), no timing."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(2)
    c = make_case(torch, model, mod, rset, mode, int(size), FULL, "cuda", gen)
    stock = Stock(torch, c.ad, c.r_max, c.token_lora, len(c.ns), c.x)
    for fn in (c.ours, stock):
        fn(c.y0.clone())
    torch.cuda.synchronize()
    print(f"profiled {model} {mod} {rset} {mode} {size}: plan {c.row['plan']}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels",
                                description=package.__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sweep")
    p.add_argument("--dry-run", action="store_true", help="CPU smoke test: tiny shapes, no timing")
    p.add_argument("--out", default=None,
                   help="JSON output (default benchmarks/results/kernels.json; "
                   "none for --dry-run)")  # fmt: skip
    p.add_argument("--no-variants", action="store_true",
                   help="skip the knob variants timed after the full sweep")  # fmt: skip
    p.add_argument("--profile", nargs=5, metavar=("MODEL", "MODULE", "RANKS", "MODE", "SIZE"),
                   help="run one case once per implementation (ours, stock), untimed, for "
                   "a profiler: ncu --clock-control none python -m benchmarks.kernels "
                   "--profile 7b o r64 decode 512")  # fmt: skip
    p.add_argument("--pages", choices=PAGE_LAYOUTS, default="blocks",
                   help="page placement: whole KV blocks per adapter as the engine does "
                   "(default), or every page at a random row")  # fmt: skip
    p.add_argument("--variants-only", action="store_true",
                   help="only the knob variants (tuning), no sweep")  # fmt: skip
    p.add_argument("--plot-from", metavar="JSON",
                   help="only draw the plot (PNG next to the JSON) of an earlier run")  # fmt: skip
    args = p.parse_args(argv)
    PAGES["layout"] = args.pages
    if args.plot_from:
        with open(args.plot_from) as fh:
            rows = json.load(fh)["rows"]
        print(plot(rows, os.path.splitext(args.plot_from)[0] + ".png") or "no matplotlib")
        return
    if args.profile:
        profile_case(*args.profile)
        return
    if args.variants_only:
        run_variants(FULL)
        return
    if args.dry_run:
        # Before the kernels are first imported (triton.jit reads it then).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    out = args.out or (None if args.dry_run else "benchmarks/results/kernels.json")
    print(HEADER if not args.dry_run else "dry run: relative errors vs the PyTorch reference")
    t0 = time.time()
    rows = run(args)
    wall = time.time() - t0
    worst = max(v for r in rows for key, v in r.items() if key.startswith("err_"))
    print(f"{len(rows)} cases in {wall:.0f} s; worst relative error vs reference {worst:.1e}")
    if not args.dry_run:
        print("\n".join(summarize(rows)))
    if args.dry_run and worst > 2e-2:
        raise SystemExit(f"dry run: relative error {worst:.1e} > 2e-2")
    if out:
        write_json(out, args, rows, wall, variants=None)
        if not args.dry_run:
            print(f"plot: {plot(rows, os.path.splitext(out)[0] + '.png') or 'no matplotlib'}")
    if not (args.dry_run or args.quick or args.no_variants):
        variants = run_variants(FULL)
        if out:
            write_json(out, args, rows, wall, variants)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
