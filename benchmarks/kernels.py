"""Kernel benchmark: our paged MBGMV/MBGMM vs stock vLLM 0.26 LoRA Triton ops
vs the padded gather + torch.bmm baseline, on Llama-2 7B/13B layer shapes.

Reproduce (H100, < 5 min including Triton compilation):

    python -m benchmarks.kernels [--quick] [--out benchmarks/results/kernels.json]

Smoke test on CPU (tiny shapes, Triton interpreter, correctness only, no
timing, writes nothing unless --out is given):

    python -m benchmarks.kernels --dry-run

Each case is one LoRA'd module (shrink + expand, fused slices in one call),
run as the model runs it: ``vllm_slora.kernels.paged_lora`` with max_rank
(decode batches of T tokens without segments, prefill batches of NSEG
segments of 64-256 tokens with them). Per-batch metadata is prepared outside
the timed region on both sides, as each engine does once per step for all
layers: our ``group_by_adapter`` (the pager's ``Batch.meta``) and stock's
LoRAKernelMeta. Our time includes everything else the op does per call
(split-K partials, reductions). A batch uses min(T or NSEG, 64) distinct
adapters. The "plan" column is the grouped kernels' choice: T/S/A = per
token / per segment / per adapter, then BM, then k<split>f|r when the shrink
splits K (partials summed in the expand, or by a reduce launch), then
n<blocks> when an expand program streams several column blocks. "v1 us" is
the first MBGMV (one program per token, mbgmv.py), kept as a baseline for
small decode batches. Stock vLLM gets the same adapters laid out its way
(stacked [max_loras, 1, max_rank, K] / [max_loras, 1, N, max_rank], padded
to the largest rank, the scale folded into B as vLLM does) and is called as
``PunicaWrapperGPU.add_lora_linear`` calls it (lora_shrink then lora_expand
with LoRAKernelMeta.meta_args). Every implementation's output is first
checked against the PyTorch reference (relative-norm error in the JSON).

Timing. The "us" columns are GPU time per call: ``graph_us`` captures the
call REPS times in one CUDA graph, each preceded by a 128 MB write that
evicts L2 (50 MB), times graph replays with CUDA events, and subtracts the
same graph without the calls (median of interleaved replays). This is how
stock's ops run inside vLLM's CUDA graphs (ours run between the graph
pieces: see "eager us"), and it leaves out the host's launch cost, which an
eager call of a 10-50 us op is bound by. "eager us" is
``triton.testing.do_bench`` (median, L2 flushed) of one eager call: what an
op costs when it runs outside a graph, host launch cost included (stock's
two launches against our two or three). The targets (ours/stock, HBM%)
apply to GPU time. HBM% = bytes the op must move (x, the pages of the
adapters in use, y read and written) / GPU time / 3.35 TB/s; the target
applies to decode. The JSON also has, for the bandwidth-bound cases, our
GPU time split into shrink (+ reduce) and expand launches. The run ends with
a summary: per (model, module, ranks, mode) the geometric mean of
ours/stock over batch sizes, and the largest decode HBM%.
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
# Pages per KV block in the "blocks" page layout: Llama-2-7B fp16, 16 tokens
# per block, 32 KV heads x 128: 2 * 16 * 32 * 128 elements = 512 pages of 256.
BLOCK_ROWS = 512
PAGE_LAYOUTS = ("blocks", "random")
PAGES = {"layout": "blocks"}  # set by --pages


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
# Decode 40 > PER_TOKEN_MAX_T exercises the per-adapter grouping.
DRY = Sweep({"tiny": ["qkv", "down"]}, ["mix8-64"], [1, 40], [3], 32, (8, 40), 4)
TARGET_MIXED = 1 / 1.5  # ours/stock, issue 5
TARGET_UNIFORM = 1.0
TARGET_HBM_PCT = 70.0
# Per-kernel breakdown (JSON) for cases with at least this many tokens.
BREAKDOWN_MIN_TOKENS = 128
V1_MAX_TOKENS = 32
# Implementations also timed eagerly (host launch cost included).
EAGER_TIMED = ("ours", "stock")
# Graph timing: calls per graph aim at this much GPU time (within REPS_RANGE);
# replays per measurement; bytes written to evict L2 before each call.
GRAPH_TARGET_US = 2000.0
REPS_RANGE = (3, 50)
GRAPH_REPLAYS = 9
FLUSH_BYTES = 128 << 20


def graph_us(fn, flush, reps_range=REPS_RANGE, replays=GRAPH_REPLAYS) -> float:
    """GPU microseconds per call of ``fn`` (see "Timing" above).

    ``flush`` evicts L2; it runs before every call in the timed graph and
    alone in the baseline graph, whose time is subtracted.
    """
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, pointer caches) off the graph
        for _ in range(2):
            flush()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    guess = max(start.elapsed_time(end) * 1e3, 1.0)
    reps = int(min(max(GRAPH_TARGET_US / guess, reps_range[0]), reps_range[1]))

    def capture(body):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                body()
        return g

    with_fn = capture(lambda: (flush(), fn()))
    alone = capture(flush)
    with_fn.replay()
    alone.replay()
    times: dict[str, list[float]] = {"with": [], "alone": []}
    for _ in range(replays):
        for key, g in (("with", with_fn), ("alone", alone)):
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize()
            times[key].append(start.elapsed_time(end))
    del with_fn, alone
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return max(0.0, 1e3 * (med["with"] - med["alone"]) / reps)


def make_flush():
    import torch

    buf = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    return buf.zero_


def page_tables(torch, k, ns, ranks, d, layout, seed):
    """Vector tables (A per slice, then B per slice) and the pool's row count.

    layout "blocks" places pages as the engine does: each adapter gets whole
    KV blocks of BLOCK_ROWS pages at random places in the pool and packs its
    vectors into them in order (per slice: A-vectors, then B-vectors; a
    vector's pages are consecutive rows), as ``layout.pack_adapter`` and the
    pager do. "random" scatters every page to a random row (the worst case
    for DRAM locality; what the parity tests use).
    """
    gen = torch.Generator().manual_seed(seed)
    v_total = sum(ranks)
    widths = [k] * len(ns) + ns
    pages = sum(v_total * (k + n) // d for n in ns)
    if layout == "random":
        num_rows = pages + pages // 8
        perm = torch.randperm(num_rows, generator=gen).to(torch.int32)
        tables, at = [], 0
        for width in widths:
            n = v_total * width // d
            tables.append(perm[at : at + n].view(v_total, width // d))
            at += n
        return tables, num_rows
    per_adapter = [r * sum(k + n for n in ns) // d for r in ranks]
    blocks = [-(-p // BLOCK_ROWS) for p in per_adapter]
    num_blocks = sum(blocks) + sum(blocks) // 8 + 1
    order = torch.randperm(num_blocks, generator=gen)
    tables = [torch.empty(v_total, w // d, dtype=torch.int32) for w in widths]
    first_block = start = 0
    for r, p, b in zip(ranks, per_adapter, blocks):
        mine = order[first_block : first_block + b]
        rows = (mine[:, None] * BLOCK_ROWS + torch.arange(BLOCK_ROWS)[None, :]).reshape(-1)[:p]
        at = 0
        for s in range(len(ns)):  # per slice (module kind): A-vectors, then B-vectors
            for table in (tables[s], tables[len(ns) + s]):
                n = r * table.shape[1]
                table[start : start + r] = rows[at : at + n].view(r, -1).to(torch.int32)
                at += n
        first_block += b
        start += r
    return tables, num_blocks * BLOCK_ROWS


def build_adapters(torch, k, ns, ranks, d, dtype, device, gen, layout=None):
    """Adapters of the given ranks paged into a fresh pool (see page_tables;
    layout None = the --pages choice).

    Returns a synthetic.PagedAdapters without dense copies (built on device).
    """
    from vllm_slora.kernels.synthetic import PagedAdapters

    layout = layout or PAGES["layout"]
    tables, num_rows = page_tables(torch, k, ns, ranks, d, layout, seed=len(ranks) + k)
    tables = [t.to(device) for t in tables]
    pool = (torch.randn(num_rows, d, device=device, generator=gen) * 0.05).to(dtype)
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


@dataclass
class Case:
    """One benchmark case: a module's adapters, a batch, and our call."""

    row: dict
    ad: object
    x: object
    y0: object
    ns: list[int]
    token_lora: object
    segments: object
    r_max: int
    a_rows: object
    b_rows: object
    meta: object = None  # group_by_adapter of a decode batch, built once (as the pager does)

    def ours(self, y, meta="batch"):
        """Our op; meta="batch" passes the case's prebuilt meta, None builds it per call."""
        import vllm_slora.kernels as kernels

        ad = self.ad
        kernels.paged_lora(
            self.x, y, ad.pool, self.a_rows, self.b_rows, ad.lora_start, ad.lora_rank,
            ad.lora_scale, self.token_lora, segments=self.segments, max_rank=self.r_max,
            meta=self.meta if meta == "batch" else meta,
        )  # fmt: skip


def make_case(torch, model, mod, rset_name, mode, size, sweep, device, gen, ad_all=None):
    """Adapters (or the first n of ad_all), batch and inputs of one case."""
    from vllm_slora.kernels.synthetic import make_segments

    geometry = modules(model) if model in MODELS else {"qkv": (64, [64, 32, 32]), "down": (128, [64])}
    k, ns = geometry[mod]
    rset = RANK_SETS[rset_name]
    if ad_all is None:
        ranks = [rset[i % len(rset)] for i in range(sweep.max_adapters)]
        ad_all = build_adapters(torch, k, ns, ranks, sweep.d, torch.float16, device, gen)
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
    x = torch.randn(t, k, device=device, generator=gen).to(torch.float16)
    y0 = torch.randn(t, sum(ns), device=device, generator=gen).to(torch.float16)
    row = dict(
        model=model, module=mod, K=k, N=ns, ranks=rset_name, mode=mode, batch=size, tokens=t,
        adapters=n, d=sweep.d,
    )  # fmt: skip
    from vllm_slora.kernels import batch_meta

    meta = batch_meta(token_lora, n, segments)  # as the pager builds it
    row["plan"] = plan_tag(ad, x, ns, token_lora, segments, r_max, sweep.d, meta)
    return Case(row, ad, x, y0, ns, token_lora, segments, r_max,
                ad.a_rows if fused else ad.a_rows[0], ad.b_rows if fused else ad.b_rows[0],
                meta)  # fmt: skip


def run(args) -> list[dict]:
    import torch

    import vllm_slora.kernels as kernels
    from vllm_slora.kernels import bmm, mbgmv, reference

    dry = args.dry_run
    sweep = DRY if dry else (QUICK if args.quick else FULL)
    device = "cpu" if dry else "cuda"
    # Triton path even on CPU (interpreter) for the dry run.
    kernels._FORCED = "triton"
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
        geometry = modules(model) if model in MODELS else {"qkv": (64, [64, 32, 32]), "down": (128, [64])}
        for mod in mods:
            k, ns = geometry[mod]
            for rset_name in sweep.rank_sets:
                rset = RANK_SETS[rset_name]
                ranks = [rset[i % len(rset)] for i in range(sweep.max_adapters)]
                ad_all = build_adapters(torch, k, ns, ranks, sweep.d, torch.float16, device, gen)
                batches = [("decode", t) for t in sweep.decode_t]
                batches += [("prefill", s) for s in sweep.prefill_segs]
                for mode, size in batches:
                    c = make_case(torch, model, mod, rset_name, mode, size, sweep, device, gen, ad_all)
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


# Knob variants of the grouped kernels (module globals of grouped.py) timed on
# a few cases at the end of the full run, to tune the next version.
VARIANT_CASES = [
    ("7b", "qkv", "mix8-64", "decode", 32),
    ("7b", "o", "mix8-64", "decode", 32),
    ("7b", "o", "r64", "decode", 512),
    ("7b", "o", "mix8-64", "decode", 512),
    ("7b", "down", "r16", "decode", 512),
    ("7b", "down", "mix8-64", "decode", 512),
    ("7b", "gate_up", "r64", "decode", 512),
    ("7b", "o", "r64", "prefill", 8),
    ("7b", "down", "r16", "prefill", 8),
    ("7b", "down", "mix8-64", "prefill", 64),
]
KNOBS = [
    ("base", {}),
    ("pps2", {"PROGRAMS_PER_SM": 2}),
    ("pps8", {"PROGRAMS_PER_SM": 8}),
    ("bpps2", {"BIG_TILE_PROGRAMS_PER_SM": 2}),
    ("nosplit", {"MAX_SPLIT": 1}),
    ("stages3", {"SHRINK_STAGES": 3}),
    ("fuse64k", {"FUSED_PARTIALS_BYTES": 64 << 10}),
    ("nbp1", {"EXPAND_MAX_NBP": 1}),
    ("nbp32", {"EXPAND_MAX_NBP": 32}),
    ("epps1", {"EXPAND_PROGRAMS_PER_SM": 1}),
    ("ep8n8", {"EXPAND_PROGRAMS_PER_SM": 8, "EXPAND_MAX_NBP": 8}),
    ("estage2", {"EXPAND_STAGES": 2}),
    ("sw8", {"SMALL_TILE_WARPS": (8, 8)}),
    ("ew4", {"SMALL_TILE_WARPS": (4, 4)}),
    ("s32x256", {"SMALL_TILE_SHRINK": (32, 256), "SHRINK_STAGES": 3}),
    ("s32x128", {"SMALL_TILE_SHRINK": (32, 128)}),
    ("s64x128", {"SMALL_TILE_SHRINK": (64, 128), "SHRINK_STAGES": 3}),
    ("s64x64", {"SMALL_TILE_SHRINK": (64, 64)}),
    ("s16x128", {"SMALL_TILE_SHRINK": (16, 128)}),
    ("nopdl", {"PDL": False}),
    ("nometa", None),  # decode: group_by_adapter inside the call (per token up to 32 tokens)
]


def run_variants(sweep, device="cuda", cases=None) -> list[dict]:
    import torch

    from vllm_slora.kernels import grouped

    flush = make_flush()
    gen = torch.Generator(device=device).manual_seed(1)
    out = []
    print("knob variants: ours GPU us per variant (base = the defaults above)")
    print(f"{'case':32} " + " ".join(f"{name:>9}" for name, _ in KNOBS))
    for model, mod, rset, mode, size in cases or VARIANT_CASES:
        c = make_case(torch, model, mod, rset, mode, size, sweep, device, gen)
        res = {}
        for name, knobs in KNOBS:
            saved = {}
            try:
                meta = "batch"
                if knobs is None:
                    if c.meta is None:
                        continue
                    meta = None
                else:
                    for key, value in knobs.items():
                        saved[key] = getattr(grouped, key)
                        setattr(grouped, key, value)
                y = c.y0.clone()
                res[name] = graph_us(lambda y=y, meta=meta: c.ours(y, meta), flush)
                res[name + "_plan"] = plan_tag(c.ad, c.x, c.ns, c.token_lora, c.segments,
                                               c.r_max, sweep.d, c.meta if meta else None)  # fmt: skip
            except Exception as e:  # a variant that fails to compile or run
                res[name] = float("nan")
                print(f"  {name}: {type(e).__name__}: {str(e)[:200]}")
            finally:
                for key, value in saved.items():
                    setattr(grouped, key, value)
        label = f"{model} {mod} {rset} {mode} {size}"
        print(f"{label:32} " + " ".join(
            f"{res[name]:9.1f}" if name in res else f"{'-':>9}" for name, _ in KNOBS), flush=True)
        out.append(dict(case=label, **res))
        del c
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def plot(rows, path) -> str | None:
    """GPU time vs batch for every (model, module): ours, stock, padded bmm,
    one line style per rank set; decode on top, prefill below. Returns the
    PNG path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    panels = list(dict.fromkeys((r["model"], r["module"]) for r in rows if "us_ours" in r))
    if not panels:
        return None
    fig, axes = plt.subplots(2, len(panels), figsize=(3.3 * len(panels), 6.4), squeeze=False)
    colors = {"ours": "tab:blue", "stock": "tab:orange", "bmm": "tab:gray"}
    styles = {"r16": ":", "r64": "--", "mix8-64": "-"}
    for col, (model, mod) in enumerate(panels):
        for row_i, mode in enumerate(("decode", "prefill")):
            ax = axes[row_i][col]
            for rset, style in styles.items():
                rs = [r for r in rows if (r["model"], r["module"], r["ranks"], r["mode"])
                      == (model, mod, rset, mode)]  # fmt: skip
                for impl, color in colors.items():
                    pts = [(r["tokens"], r[f"us_{impl}"]) for r in rs if f"us_{impl}" in r]
                    if pts:
                        ax.plot(*zip(*pts), style, color=color, marker=".",
                                label=f"{impl} {rset}")  # fmt: skip
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"{model} {mod} {mode}", fontsize=9)
            ax.set_xlabel("tokens in batch", fontsize=8)
            if col == 0:
                ax.set_ylabel("GPU us per call", fontsize=8)
            ax.grid(True, alpha=0.3, which="both")
            ax.tick_params(labelsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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


def ratios_and_bandwidth(row, ad, k, ns, x, token_lora, mode):
    out = {}
    for other in ("stock", "bmm", "v1"):
        if f"us_{other}" in row:
            out[f"ours/{other}"] = row["us_ours"] / max(row[f"us_{other}"], 1e-3)
    if "eager_us_stock" in row:
        out["eager ours/stock"] = row["eager_us_ours"] / row["eager_us_stock"]
    # Bytes the op must move: x, the pages of the adapters in use, y in+out.
    used = token_lora.unique()
    used = used[used >= 0]
    ranks = int(ad.lora_rank[used.long()].sum())
    elem = x.element_size()
    nbytes = elem * (x.numel() + ranks * len(ns) * k + ranks * sum(ns) + 2 * x.shape[0] * sum(ns))
    out["bytes"] = nbytes
    out["hbm_pct_of_h100_peak"] = (
        100 * nbytes / (max(row["us_ours"], 1e-3) * 1e-6) / H100_PEAK_BYTES_PER_S
    )
    return out


def _grouped_setup(ad, x, ns, token_lora, segments, r_max, d, meta=None, build_meta=True):
    from vllm_slora.kernels import grouped

    num_loras = ad.lora_start.shape[0]
    groups = grouped.make_groups(token_lora, num_loras, segments, meta, build_meta)
    pl = grouped.plan(groups, x.shape[0], x.shape[1], max(ns), len(ns), r_max, d, x.device)
    return grouped, groups, pl


def plan_tag(ad, x, ns, token_lora, segments, r_max, d, meta=None):
    grouped, groups, pl = _grouped_setup(ad, x, ns, token_lora, segments, r_max, d, meta, False)
    return grouped.describe(groups, pl, r_max)


def breakdown(flush, c):
    """Our GPU time per launch: grouping (decode; once per batch, not in the
    op's time), shrink (+ reduce when the partials are not summed by the
    expand), expand."""
    import torch

    ad, x, ns, token_lora, r_max = c.ad, c.x, c.ns, c.token_lora, c.r_max
    d = ad.pool.shape[1]
    grouped, groups, pl = _grouped_setup(ad, x, ns, token_lora, c.segments, r_max, d, c.meta)
    s, t, num_loras = len(ns), x.shape[0], ad.lora_start.shape[0]
    meta = (ad.lora_start, ad.lora_rank)
    out = {}

    def bench(fn):
        return graph_us(fn, flush)

    if groups.mode == grouped.ADAPTERS:
        out["us_ours_grouping"] = bench(lambda: grouped.group_by_adapter(token_lora, num_loras))
    fused = grouped.fuse_partials(groups, pl, r_max)
    ws = torch.empty((pl.split, s, t, r_max), dtype=torch.float32, device=x.device)
    v = ws[0] if pl.split == 1 else torch.empty((s, t, r_max), dtype=torch.float32, device=x.device)

    def shrink():
        grouped.launch_shrink(x, ad.pool, ad.a_rows, *meta, token_lora,
                              v if pl.split == 1 else ws, groups, pl)  # fmt: skip
        if pl.split > 1 and not fused:
            grouped.launch_reduce(ws, v, token_lora, ad.lora_rank)

    shrink()
    out["us_ours_shrink"] = bench(shrink)
    y = c.y0.clone()
    vin, v_split = (ws, pl.split) if fused else (v, 1)
    out["us_ours_expand"] = bench(
        lambda: grouped.launch_expand(vin, ad.pool, ad.b_rows, *meta, ad.lora_scale, token_lora,
                                      y, groups, pl, v_split)  # fmt: skip
    )
    return out


def geomean(xs) -> float:
    import math

    return math.exp(sum(math.log(max(x, 1e-9)) for x in xs) / len(xs))


def summarize(rows) -> list[str]:
    """Per (model, module, ranks, mode): geometric mean of ours/stock over
    batch sizes and the largest decode HBM%; then the cases off target."""
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["module"], r["ranks"], r["mode"]), []).append(r)
    lines.append(
        f"summary: geomean ours/stock over batch sizes (target mix <= {TARGET_MIXED:.2f}, "
        f"uniform <= {TARGET_UNIFORM:.2f}); decode max HBM% (target >= {TARGET_HBM_PCT:.0f})"
    )
    lines.append(f"{'model':5} {'module':8} {'ranks':8} {'mode':8} {'geo o/s':>8} {'worst':>6} "
                 f"{'maxHBM%':>8}  verdict  {'eager geo o/s':>13}")  # fmt: skip
    misses = []
    for key, rs in groups.items():
        ratios = [r["ours/stock"] for r in rs if "ours/stock" in r]
        if not ratios:
            continue
        geo = geomean(ratios)
        target = TARGET_MIXED if key[2].startswith("mix") else TARGET_UNIFORM
        hbm = max((r.get("hbm_pct_of_h100_peak", 0.0) for r in rs), default=0.0)
        hbm_s = f"{hbm:8.1f}" if key[3] == "decode" else f"{'-':>8}"
        verdict = "ok" if geo <= target else "MISS"
        eager = [r["eager ours/stock"] for r in rs if "eager ours/stock" in r]
        eager_s = f"{geomean(eager):13.2f}" if eager else f"{'-':>13}"
        lines.append(f"{key[0]:5} {key[1]:8} {key[2]:8} {key[3]:8} {geo:8.2f} {max(ratios):6.2f} "
                     f"{hbm_s}  {verdict:7}  {eager_s}")  # fmt: skip
        for r in rs:
            if r.get("ours/stock", 0) > target:
                misses.append(r)
    decode = [r for r in rows if r["mode"] == "decode" and "hbm_pct_of_h100_peak" in r]
    if decode:
        best = max(decode, key=lambda r: r["hbm_pct_of_h100_peak"])
        lines.append(
            f"decode HBM%: max {best['hbm_pct_of_h100_peak']:.1f} ({best['model']} {best['module']} "
            f"{best['ranks']} T={best['tokens']}); at T=512: "
            + ", ".join(f"{r['module']}/{r['ranks']} {r['hbm_pct_of_h100_peak']:.0f}"
                        for r in decode if r["tokens"] == 512 and r["model"] == "7b")  # fmt: skip
        )
    lines.append(f"cases off target (ours/stock): {len(misses)} of "
                 f"{sum(1 for r in rows if 'ours/stock' in r)}")  # fmt: skip
    for r in misses:
        lines.append(f"  {r['model']} {r['module']} {r['ranks']} {r['mode']} {r['batch']}: "
                     f"{r['ours/stock']:.2f} ({r['us_ours']:.1f} vs {r['us_stock']:.1f} us, "
                     f"plan {r['plan']})")  # fmt: skip
    return lines


HEADER = (
    f"{'model':5} {'module':8} {'ranks':8} {'mode':8} {'batch':>5} {'tokens':>6} "
    f"{'ours us':>9} {'stock us':>9} {'bmm us':>9} {'o/stock':>8} {'o/bmm':>7} {'HBM%':>6} "
    f"{'v1 us':>7} {'plan':>10} {'eager: ours':>11} {'stock':>7} {'o/s':>5}"
)


def print_row(row, dry):
    if dry:
        errs = " ".join(f"{k}={v:.1e}" for k, v in row.items() if k.startswith("err_"))
        print(f"{row['model']:5} {row['module']:8} {row['ranks']:8} {row['mode']:8} "
              f"{row['batch']:>5} {row['tokens']:>6} {row['plan']:>8}  {errs}", flush=True)  # fmt: skip
        return

    def f(key, fmt):
        return format(row[key], fmt) if key in row else "-"

    print(
        f"{row['model']:5} {row['module']:8} {row['ranks']:8} {row['mode']:8} {row['batch']:>5} "
        f"{row['tokens']:>6} {f('us_ours', '9.1f')} {f('us_stock', '9.1f'):>9} "
        f"{f('us_bmm', '9.1f'):>9} {f('ours/stock', '8.2f'):>8} {f('ours/bmm', '7.2f'):>7} "
        f"{f('hbm_pct_of_h100_peak', '6.1f'):>6} {f('us_v1', '7.1f'):>7} {row['plan']:>10} "
        f"{f('eager_us_ours', '11.1f'):>11} {f('eager_us_stock', '7.1f'):>7} "
        f"{f('eager ours/stock', '5.2f'):>5}",
        flush=True,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sweep")
    p.add_argument("--dry-run", action="store_true", help="CPU smoke test: tiny shapes, no timing")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/kernels.json; none for --dry-run)")
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


def write_json(out, args, rows, wall, variants):
    import torch
    import triton

    meta = dict(
        command="python -m benchmarks.kernels" + (" --quick" if args.quick else "")
        + (" --dry-run" if args.dry_run else "")
        + (f" --pages {args.pages}" if args.pages != "blocks" else ""),
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        torch=torch.__version__, triton=triton.__version__, wall_s=wall,
        dtype="float16", page_width=(DRY if args.dry_run else FULL).d, pages=args.pages,
        block_rows=BLOCK_ROWS,
        timing="us_*: GPU time per call from CUDA-graph replays, L2 evicted before each "
        "call, flush-only graph subtracted (graph_us); eager_us_*: triton.testing.do_bench "
        "median of eager calls, L2 flushed",
    )  # fmt: skip
    try:
        import vllm

        meta["vllm"] = vllm.__version__
    except ImportError:
        pass
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as fh:
        json.dump({"meta": meta, "rows": rows, "variants": variants}, fh, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
