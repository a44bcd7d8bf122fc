"""What the benchmark runs: the sweeps (models, modules, rank sets, batch
sizes), the adapters paged into a pool the way the engine places them, and
one case's batch, inputs and our call.

Kept apart from the timing and the reporting so that tests can build the same
page tables and cases on CPU.
"""

from dataclasses import dataclass

from benchmarks.kernels.plan import plan_tag

MAX_ADAPTERS = 64
MODELS = {"7b": (4096, 11008), "13b": (5120, 13824)}
RANK_SETS = {"r16": [16], "r64": [64], "mix8-64": [8, 16, 32, 64]}
DECODE_T = [1, 8, 32, 128, 512]
PREFILL_SEGS = [8, 32, 64]
# The dry run's "tiny" model: module name -> (K, [N_s per fused slice]).
TINY_MODULES = {"qkv": (64, [64, 32, 32]), "down": (128, [64])}
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


def page_tables(torch, k, ns, ranks, d, layout, seed):
    """Vector tables (A per slice, then B per slice) and the pool's row count.

    layout "blocks" places pages as the engine does: each adapter gets whole
    KV blocks of BLOCK_ROWS pages at random places in the pool and packs its
    vectors into them in order (per slice: A-vectors, then B-vectors; a
    vector's pages are consecutive rows), as ``packing.pack_adapter`` and the
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
    from vllm_slora.testing.synthetic import PagedAdapters

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
    from vllm_slora.testing.synthetic import make_segments

    geometry = modules(model) if model in MODELS else TINY_MODULES
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
