"""Kernel benchmark: our paged MBGMV/MBGMM vs stock vLLM 0.26 LoRA Triton ops
vs the padded gather + torch.bmm baseline, on Llama-2 7B/13B layer shapes.

Reproduce (H100, < 5 min including Triton compilation):

    python -m benchmarks.kernels [--quick] [--out benchmarks/results/kernels.json]

Smoke test on CPU (tiny shapes, Triton interpreter, correctness only, no
timing, writes nothing unless --out is given):

    python -m benchmarks.kernels --dry-run

Each case is one LoRA'd module (shrink + expand, fused slices in one call):
decode batches of T tokens use MBGMV, prefill batches of NSEG segments
(64-256 tokens each) use MBGMM. A batch uses min(T or NSEG, 64) distinct
adapters. Stock vLLM gets the same adapters laid out its way (stacked
[max_loras, 1, max_rank, K] / [max_loras, 1, N, max_rank], padded to the
largest rank, the scale folded into B as vLLM does) and is called as
``PunicaWrapperGPU.add_lora_linear`` calls it (lora_shrink then lora_expand
with LoRAKernelMeta.meta_args). Times are triton.testing.do_bench medians
with L2 flushed before every call. Every implementation's output is first
checked against the PyTorch reference (relative-norm error in the JSON).
"""

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass

H100_PEAK_BYTES_PER_S = 3.35e12
MAX_ADAPTERS = 64
MODELS = {"7b": (4096, 11008), "13b": (5120, 13824)}
RANK_SETS = {"r16": [16], "r64": [64], "mix8-64": [8, 16, 32, 64]}
DECODE_T = [1, 8, 32, 128, 512]
PREFILL_SEGS = [8, 32, 64]
# The per-token padded bmm materialises [T, R_MAX, W] weights; skip beyond this.
BMM_MAX_BYTES = 4 << 30


def modules(model: str) -> dict[str, tuple[int, list[int]]]:
    """Module name -> (K, [N_s per fused slice])."""
    h, i = MODELS[model]
    return {"qkv": (h, [h, h, h]), "o": (h, [h]), "gate_up": (h, [i, i]), "down": (i, [h])}


@dataclass
class Sweep:
    models: dict[str, list[str]]
    rank_sets: list[str]
    decode_t: list[int]
    prefill_segs: list[int]
    d: int
    seg_len: tuple[int, int]
    max_adapters: int


FULL = Sweep(
    {"7b": ["qkv", "o", "gate_up", "down"], "13b": ["qkv", "down"]},
    list(RANK_SETS), DECODE_T, PREFILL_SEGS, 256, (64, 256), MAX_ADAPTERS,
)  # fmt: skip
QUICK = Sweep(
    {"7b": ["qkv", "down"]}, ["r16", "mix8-64"], [1, 32, 512], [8, 64], 256, (64, 256),
    MAX_ADAPTERS,
)  # fmt: skip
DRY = Sweep({"tiny": ["qkv", "down"]}, ["mix8-64"], [1, 8], [2, 3], 32, (8, 40), 4)


def build_adapters(torch, k, ns, ranks, d, dtype, device, gen):
    """Adapters of the given ranks paged at random rows of a fresh pool.

    Returns a synthetic.PagedAdapters without dense copies (built on device).
    """
    from vllm_slora.kernels.synthetic import PagedAdapters

    v_total = sum(ranks)
    pages = sum(v_total * (k + n) // d for n in ns)
    num_rows = pages + pages // 8
    pool = (torch.randn(num_rows, d, device=device, generator=gen) * 0.05).to(dtype)
    perm = torch.randperm(num_rows, device=device, generator=gen).to(torch.int32)
    tables, at = [], 0
    for width in [k] * len(ns) + ns:
        n = v_total * width // d
        tables.append(perm[at : at + n].view(v_total, width // d))
        at += n
    starts = [sum(ranks[:i]) for i in range(len(ranks))]
    scale = torch.rand(len(ranks), device=device, generator=gen) + 0.5
    return PagedAdapters(
        pool=pool,
        a_rows=tables[: len(ns)],
        b_rows=tables[len(ns) :],
        lora_start=torch.tensor(starts, dtype=torch.int32, device=device),
        lora_rank=torch.tensor(ranks, dtype=torch.int32, device=device),
        lora_scale=scale,
        dense=[],
    )


def first_adapters(ad, n):
    """The same pool, restricted to adapters 0..n-1 (L = n)."""
    from dataclasses import replace

    return replace(
        ad, lora_start=ad.lora_start[:n], lora_rank=ad.lora_rank[:n],
        lora_scale=ad.lora_scale[:n],
    )  # fmt: skip


def stock_layout(ad, r_max):
    """The adapters as vLLM stacks them (LoRA layers' lora_a/b_stacked).

    Per slice A [L, 1, r_max, K] and B [L, 1, N, r_max], zero-padded to
    r_max; vLLM folds the LoRA scale into B when it loads an adapter.
    """
    from vllm_slora.kernels.bmm import _padded

    meta = (ad.lora_start, ad.lora_rank)
    a = tuple(_padded(ad.pool, t, *meta, r_max).unsqueeze(1).contiguous() for t in ad.a_rows)
    scale = ad.lora_scale.to(ad.pool.dtype)[:, None, None, None]
    b = tuple(
        (_padded(ad.pool, t, *meta, r_max).transpose(1, 2).unsqueeze(1) * scale).contiguous()
        for t in ad.b_rows
    )
    return a, b


class Stock:
    """vLLM 0.26's lora_shrink / lora_expand on the stock stacked layout."""

    def __init__(self, torch, ad, r_max, token_lora, num_slices, x):
        from vllm.lora.ops.triton_ops import LoRAKernelMeta, lora_expand, lora_shrink
        from vllm.lora.ops.triton_ops import utils as stock_utils

        # The stock ops cache weight pointers/strides by data_ptr only; a new
        # tensor at a freed address would reuse stale strides.
        stock_utils._LORA_A_PTR_DICT.clear()
        stock_utils._LORA_B_PTR_DICT.clear()
        self.shrink, self.expand = lora_shrink, lora_expand
        self.a, self.b = stock_layout(ad, r_max)
        t = token_lora.shape[0]
        self.meta = LoRAKernelMeta.make(ad.lora_rank.shape[0], t, device=token_lora.device)
        self.meta.prepare_tensors(token_lora)
        self.args = self.meta.meta_args(t, False)
        self.buf = torch.empty(num_slices, t, r_max, dtype=torch.float32, device=token_lora.device)
        self.x = x

    def __call__(self, y):
        self.shrink(self.x, self.a, self.buf, *self.args, 1.0)
        self.expand(self.buf, self.b, y, *self.args, offset_start=0, add_inputs=True)


def stock_emulated(torch, stock_a, stock_b, x, y, token_lora):
    """Torch version of the stock ops' math on the stacked layout (dry run)."""
    for i, lora in enumerate(token_lora.tolist()):
        if lora < 0:
            continue
        v = [x[i].float() @ a[lora, 0].float().t() for a in stock_a]
        delta = torch.cat([vv @ b[lora, 0].float().t() for vv, b in zip(v, stock_b)])
        y[i] = (y[i].float() + delta).to(y.dtype)


def run(args) -> list[dict]:
    import torch

    import vllm_slora.kernels as kernels
    from vllm_slora.kernels import bmm, reference
    from vllm_slora.kernels.synthetic import make_segments

    dry = args.dry_run
    sweep = DRY if dry else (QUICK if args.quick else FULL)
    device = "cpu" if dry else "cuda"
    dtype = torch.float16
    # Triton path even on CPU (interpreter) for the dry run.
    kernels._FORCED = "triton"
    stock_ok = False
    if not dry:
        from triton.testing import do_bench

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
        geometry = modules(model) if model in MODELS else {"qkv": (64, [64, 32, 32]), "down": (128, [64])}
        for mod in mods:
            k, ns = geometry[mod]
            for rset_name in sweep.rank_sets:
                rset = RANK_SETS[rset_name]
                ranks = [rset[i % len(rset)] for i in range(sweep.max_adapters)]
                ad_all = build_adapters(torch, k, ns, ranks, sweep.d, dtype, device, gen)
                batches = [("decode", t) for t in sweep.decode_t]
                batches += [("prefill", s) for s in sweep.prefill_segs]
                for mode, size in batches:
                    n = min(size, sweep.max_adapters)
                    ad = first_adapters(ad_all, n)
                    r_max = max(rset)
                    if mode == "decode":
                        order = torch.randperm(size, generator=torch.Generator().manual_seed(size))
                        token_lora = (order % n).to(torch.int32).to(device)
                        segments = None
                    else:
                        lens = torch.randint(
                            sweep.seg_len[0], sweep.seg_len[1] + 1, (size,),
                            generator=torch.Generator().manual_seed(size),
                        ).tolist()  # fmt: skip
                        token_lora, segments = make_segments(lens, [g % n for g in range(size)], device)
                    t = token_lora.shape[0]
                    fused = len(ns) > 1
                    a_rows = ad.a_rows if fused else ad.a_rows[0]
                    b_rows = ad.b_rows if fused else ad.b_rows[0]
                    meta = (ad.lora_start, ad.lora_rank)
                    x = (torch.randn(t, k, device=device, generator=gen)).to(dtype)
                    y0 = (torch.randn(t, sum(ns), device=device, generator=gen)).to(dtype)
                    v = torch.empty(len(ns), t, r_max, dtype=torch.float32, device=device)
                    v = v if fused else v[0]

                    def ours(y, v=v, a_rows=a_rows, b_rows=b_rows, segments=segments,
                             ad=ad, meta=meta, x=x, token_lora=token_lora):  # fmt: skip
                        kernels.paged_lora_shrink(x, ad.pool, a_rows, *meta, token_lora, v, segments)
                        kernels.paged_lora_expand(
                            v, ad.pool, b_rows, *meta, ad.lora_scale, token_lora, y, segments
                        )

                    def padded_bmm(y, v=v, a_rows=a_rows, b_rows=b_rows,
                                   ad=ad, meta=meta, x=x, token_lora=token_lora):  # fmt: skip
                        bmm.paged_lora_shrink(x, ad.pool, a_rows, *meta, token_lora, v)
                        bmm.paged_lora_expand(
                            v, ad.pool, b_rows, *meta, ad.lora_scale, token_lora, y
                        )

                    want = y0.clone()
                    reference.paged_lora(
                        x, want, ad.pool, a_rows, b_rows, *meta, ad.lora_scale, token_lora
                    )
                    impls = {"ours": ours}
                    bmm_bytes = t * r_max * max(k, max(ns)) * 2
                    if bmm_bytes <= BMM_MAX_BYTES:
                        impls["bmm"] = padded_bmm
                    if stock_ok:
                        impls["stock"] = Stock(torch, ad, r_max, token_lora, len(ns), x)
                    row = dict(
                        model=model, module=mod, K=k, N=ns, ranks=rset_name, mode=mode,
                        batch=size, tokens=t, adapters=n, d=sweep.d,
                    )  # fmt: skip
                    for name, fn in impls.items():
                        y = y0.clone()
                        fn(y)
                        row[f"err_{name}"] = rel_err(y, want)
                    if dry:
                        # Stock kernels need a GPU; check the layout we give them.
                        y = y0.clone()
                        stock_emulated(torch, *stock_layout(ad, r_max), x, y, token_lora)
                        row["err_stock_layout_emulated"] = rel_err(y, want)
                    else:
                        for name, fn in impls.items():
                            y = y0.clone()
                            row[f"us_{name}"] = 1e3 * do_bench(
                                lambda fn=fn, y=y: fn(y), warmup=10, rep=40, return_mode="median"
                            )
                        row.update(ratios_and_bandwidth(row, ad, k, ns, x, token_lora, mode))
                    rows.append(row)
                    print_row(row, dry)
                del ad_all
                if not dry:
                    torch.cuda.empty_cache()
    return rows


def ratios_and_bandwidth(row, ad, k, ns, x, token_lora, mode):
    out = {}
    for other in ("stock", "bmm"):
        if f"us_{other}" in row:
            out[f"ours/{other}"] = row["us_ours"] / row[f"us_{other}"]
    if mode == "decode":
        # Bytes the op must move: x, the pages of the adapters in use, y in+out.
        used = token_lora.unique()
        ranks = int(ad.lora_rank[used.long()].sum())
        elem = x.element_size()
        nbytes = elem * (x.numel() + ranks * len(ns) * k + ranks * sum(ns) + 2 * x.shape[0] * sum(ns))
        out["bytes"] = nbytes
        out["hbm_pct_of_h100_peak"] = 100 * nbytes / (row["us_ours"] * 1e-6) / H100_PEAK_BYTES_PER_S
    return out


HEADER = (
    f"{'model':5} {'module':8} {'ranks':8} {'mode':8} {'batch':>5} {'tokens':>6} "
    f"{'ours us':>9} {'stock us':>9} {'bmm us':>9} {'o/stock':>8} {'o/bmm':>7} {'HBM%':>6}"
)


def print_row(row, dry):
    if dry:
        errs = " ".join(f"{k}={v:.1e}" for k, v in row.items() if k.startswith("err_"))
        print(f"{row['model']:5} {row['module']:8} {row['ranks']:8} {row['mode']:8} "
              f"{row['batch']:>5} {row['tokens']:>6}  {errs}", flush=True)  # fmt: skip
        return

    def f(key, fmt):
        return format(row[key], fmt) if key in row else "-"

    print(
        f"{row['model']:5} {row['module']:8} {row['ranks']:8} {row['mode']:8} {row['batch']:>5} "
        f"{row['tokens']:>6} {f('us_ours', '9.1f')} {f('us_stock', '9.1f'):>9} "
        f"{f('us_bmm', '9.1f'):>9} {f('ours/stock', '8.2f'):>8} {f('ours/bmm', '7.2f'):>7} "
        f"{f('hbm_pct_of_h100_peak', '6.1f'):>6}",
        flush=True,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sweep")
    p.add_argument("--dry-run", action="store_true", help="CPU smoke test: tiny shapes, no timing")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/kernels.json; none for --dry-run)")
    args = p.parse_args(argv)
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
    if args.dry_run and worst > 2e-2:
        raise SystemExit(f"dry run: relative error {worst:.1e} > 2e-2")
    if out:
        import torch
        import triton

        meta = dict(
            command="python -m benchmarks.kernels" + (" --quick" if args.quick else "")
            + (" --dry-run" if args.dry_run else ""),
            device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
            torch=torch.__version__, triton=triton.__version__, wall_s=wall,
            dtype="float16", page_width=(DRY if args.dry_run else FULL).d,
            timing="triton.testing.do_bench median, L2 flushed before each call",
        )  # fmt: skip
        try:
            import vllm

            meta["vllm"] = vllm.__version__
        except ImportError:
            pass
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
