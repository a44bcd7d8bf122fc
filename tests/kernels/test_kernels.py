"""Triton kernels (grouped MBGMV/MBGMM, first MBGMV) against the PyTorch reference.

On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py) on small
shapes. The interpreter (Triton 3.6) loads, stores and converts bf16 fine but
its ``tl.dot`` returns garbage for bf16 inputs (numpy has no bf16), so the
grouped kernels do their dots in fp32 there (``kernels/tiles.py: mma``), which also
keeps bf16 covered on CPU. With a GPU, the ``gpu`` group repeats the checks at
Llama-2-7B widths.

Every check runs the public ops three ways: ``paged_lora_shrink`` (NaN
poison: nothing outside [token, :rank] may be written), ``paged_lora_expand``
(rows without LoRA bit-unchanged), and the fused ``paged_lora`` (split-K
partials summed by the expand). Tolerances are relative-norm errors against
the reference (fp32 math, one rounding of y): the grouped kernels round v to
the weights' dtype before the tensor-core expand, as punica and vLLM do.
"""

import os

import pytest
import torch

import vllm_slora.kernels as kernels
from vllm_slora.kernels import grouping, knobs, reference
from vllm_slora.kernels.plan import plan, shape_of
from vllm_slora.testing import mbgmv
from vllm_slora.testing.synthetic import make_paged_adapters, make_segments

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
MIXED = [1, 8, 16, 32, 64, 128]
SMALL = [8, 16, 1, 32, 0]  # rank 0: an adapter without this module
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Small shapes run on the GPU when there is one, else in the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12)).item()


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setattr(kernels, "BACKEND_OVERRIDE", "triton")


@pytest.fixture
def by_adapter(monkeypatch):
    """Group even small batches per adapter (group_by_adapter launch)."""
    monkeypatch.setattr(knobs, "PER_TOKEN_MAX_T", 0)


@pytest.fixture
def force_split(monkeypatch):
    """Split K as much as the shapes allow (split-K partials everywhere)."""
    monkeypatch.setattr(knobs, "PROGRAMS_PER_SM", 10**6)
    monkeypatch.setattr(knobs, "BIG_TILE_PROGRAMS_PER_SM", 10**6)


def check(ranks, k, ns, d, dtype, token_lora, segments=None, device=DEVICE, seed=0,
          meta=False, lora=True):  # fmt: skip
    """Run shrink, expand and paged_lora (Triton) against the reference."""
    token_lora = token_lora.to(device)
    segments = None if segments is None else tuple(t.to(device) for t in segments)
    ad = make_paged_adapters(ranks, k, ns, d, dtype, device=device, seed=seed)
    t, s, r_max = token_lora.shape[0], len(ns), ad.max_rank
    fused = s > 1
    a_rows = ad.a_rows if fused else ad.a_rows[0]
    b_rows = ad.b_rows if fused else ad.b_rows[0]
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(t, k, generator=gen).to(dtype).to(device)
    y0 = torch.randn(t, sum(ns), generator=gen).to(dtype).to(device)
    starts_ranks = (ad.lora_start, ad.lora_rank)
    m = kernels.group_by_adapter(token_lora, len(ranks)) if meta else None

    # NaN poison: entries the shrink must not write stay NaN, and the expand
    # must not read them.
    out = torch.full((s, t, r_max), float("nan"), device=device)
    want_out = out.clone()
    kernels.paged_lora_shrink(
        x, ad.pool, a_rows, *starts_ranks, token_lora, out if fused else out[0], segments, m
    )
    reference.paged_lora_shrink(
        x, ad.pool, a_rows, *starts_ranks, token_lora, want_out if fused else want_out[0]
    )
    lora_ = token_lora.long()
    rank_of = torch.where(lora_ >= 0, ad.lora_rank[lora_.clamp(min=0)], 0)
    written = torch.arange(r_max, device=device)[None, :] < rank_of[:, None]
    written = written.expand(s, t, r_max)
    assert torch.equal(out.isnan(), ~written), "shrink wrote outside [token, :rank]"
    if written.any():
        assert rel_err(out[written], want_out[written]) <= TOL[dtype]

    y = y0.clone()
    want_y = y0.clone()
    args = (ad.pool, b_rows, *starts_ranks, ad.lora_scale, token_lora)
    kernels.paged_lora_expand(out if fused else out[0], *args, y, segments, m)
    reference.paged_lora_expand(want_out if fused else want_out[0], *args, want_y)
    none = lora_ < 0
    assert torch.equal(y[none], y0[none]), "rows without LoRA changed"
    assert y.isfinite().all()
    assert rel_err(y, want_y) <= TOL[dtype]

    if lora:
        y = y0.clone()
        kernels.paged_lora(x, y, ad.pool, a_rows, b_rows, *starts_ranks, ad.lora_scale,
                           token_lora, segments=segments, max_rank=r_max, meta=m)  # fmt: skip
        assert torch.equal(y[none], y0[none]), "paged_lora changed rows without LoRA"
        assert y.isfinite().all()
        assert rel_err(y, want_y) <= TOL[dtype]
    return ad


# ---- CPU (interpreter) and GPU, small shapes ------------------------------

SLICES = {"one-slice": [64], "qkv-gqa": [64, 32, 32], "gate-up": [96, 96]}
# Every dtype on fused q,k,v (GQA widths); the other slice layouts in fp16.
CASES = [
    pytest.param([64, 32, 32], torch.float32, id="qkv-gqa-fp32"),
    pytest.param([64, 32, 32], torch.float16, id="qkv-gqa-fp16"),
    pytest.param([64, 32, 32], torch.bfloat16, id="qkv-gqa-bf16"),
    pytest.param([64], torch.float16, id="one-slice-fp16"),
    pytest.param([96, 96], torch.bfloat16, id="gate-up-bf16"),
]


def decode_batch(n_adapters, t, seed):
    gen = torch.Generator().manual_seed(seed)
    token_lora = torch.randint(-1, n_adapters, (t,), generator=gen, dtype=torch.int32)
    token_lora[:2] = torch.tensor([-1, n_adapters - 1])
    return token_lora


@pytest.mark.parametrize("ns,dtype", CASES)
def test_per_token(triton_backend, ns, dtype):
    # Small decode batch: one tile per token, no grouping launch.
    ranks = MIXED + [8, 16]
    check(ranks, 64, ns, 32, dtype, decode_batch(len(ranks), 12, 3))


@pytest.mark.parametrize("ns,dtype", CASES)
def test_by_adapter(triton_backend, by_adapter, ns, dtype):
    # Adapters repeat within the batch: tiles of several tokens per adapter.
    check(SMALL, 64, ns, 32, dtype, decode_batch(len(SMALL), 24, 4))


@pytest.mark.parametrize("ns,dtype", CASES)
def test_segments(triton_backend, ns, dtype):
    # Segments shorter and longer than BM, empty ones (padding), segments
    # without LoRA, an adapter in two segments, a rank-0 adapter, and tokens
    # after the last segment (no LoRA).
    lengths = [5, 20, 0, 1, 35, 0, 17, 3]
    seg_lora = [0, 3, 2, -1, 3, 1, 4, 2]
    token_lora, segments = make_segments(lengths, seg_lora)
    tail = torch.full((5,), -1, dtype=torch.int32)
    check(SMALL, 64, ns, 32, dtype, torch.cat([token_lora, tail]), segments)


@pytest.mark.parametrize("mode", ["per-token", "by-adapter", "segments"])
def test_split_k(triton_backend, force_split, monkeypatch, mode):
    # K = 5 pages: two uneven page-aligned splits; partials summed both by
    # the reduce launch and (paged_lora) by the expand, or forced to reduce.
    if mode == "by-adapter":
        monkeypatch.setattr(knobs, "PER_TOKEN_MAX_T", 0)
    if mode == "segments":
        token_lora, segments = make_segments([9, 20, 3], [1, -1, 3])
        monkeypatch.setattr(knobs, "FUSED_PARTIALS_BYTES", 0)
    else:
        token_lora, segments = decode_batch(len(SMALL), 10, 5), None
    check(SMALL, 160, [64, 32], 32, torch.float16, token_lora, segments)


@pytest.mark.parametrize("mode", ["per-token", "by-adapter", "segments"])
@pytest.mark.parametrize("ns,dtype", [
    pytest.param([64, 32, 96], torch.float16, id="qkv-uneven-fp16"),
    pytest.param([96, 96], torch.bfloat16, id="gate-up-bf16"),
    pytest.param([64], torch.float32, id="one-slice-fp32"),
])  # fmt: skip
def test_expand_several_column_blocks(triton_backend, monkeypatch, mode, ns, dtype):
    # Every expand program streams EXPAND_MAX_NBP column blocks: slices of 1, 2
    # and 3 pages (a group past a slice's last page is masked), v loaded once.
    monkeypatch.setattr(knobs, "EXPAND_PROGRAMS_PER_SM", 0)
    monkeypatch.setattr(knobs, "EXPAND_MAX_NBP", 4)
    if mode == "by-adapter":
        monkeypatch.setattr(knobs, "PER_TOKEN_MAX_T", 0)
    ranks = [8, 16, 1, 0] if dtype == torch.float32 else SMALL
    segments = None
    if mode == "segments":
        token_lora, segments = make_segments([5, 20, 1, 17], [0, 2, -1, 1])
    else:
        token_lora = decode_batch(len(ranks), 14, 9)
    groups = grouping.make_groups(token_lora, len(ranks), segments, None, build_meta=False)
    pl = plan(shape_of(groups, token_lora.shape[0], 64, max(ns), len(ns), max(ranks), 32,
                       torch.device(DEVICE), dtype))
    assert pl.expand_blocks_per_program == 4, pl
    check(ranks, 64, ns, 32, dtype, token_lora, segments)


@pytest.mark.parametrize("tile", [(32, 256), (64, 64)], ids=["br32-bk256", "br64-bk64"])
@pytest.mark.parametrize("mode", ["per-token", "by-adapter"])
def test_small_tile_shrink_shapes(triton_backend, monkeypatch, tile, mode):
    # The tuning knob's other small-tile shrink steps (BR rank-vectors x BK).
    monkeypatch.setattr(knobs, "SMALL_TILE_SHRINK", tile)
    if mode == "by-adapter":
        monkeypatch.setattr(knobs, "PER_TOKEN_MAX_T", 0)
    ranks = MIXED + [8, 16]
    check(ranks, 64, [64, 32, 32], 32, torch.float16, decode_batch(len(ranks), 20, 11))


def test_meta_given(triton_backend, by_adapter):
    # A batch grouped once by the caller (as the pager does per step).
    check(SMALL, 64, [64, 32, 32], 32, torch.float16, decode_batch(len(SMALL), 12, 6), meta=True)


@pytest.mark.parametrize("on", ["kernel", "torch"])
def test_group_by_adapter(triton_backend, on, monkeypatch):
    if on == "torch":  # CPU without the interpreter: the host fallback
        if DEVICE != "cpu":
            pytest.skip("the torch fallback runs on CPU tensors only")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(7)
    # Tile lists of BM 16, 32 (2500 > one chunk of 2048) and 64; one adapter
    # with 300 tokens and three empty ones.
    for t, num_loras in [(1, 1), (37, 5), (2500, 70), (300, 4)]:
        high = 1 if t == 300 else num_loras
        token_lora = torch.randint(-1, high, (t,), generator=gen, dtype=torch.int32)
        meta = kernels.group_by_adapter(token_lora.to(DEVICE), num_loras).cpu()
        assert meta.numel() == grouping.meta_size(t, num_loras)
        bounds, idx = meta[: num_loras + 1], meta[num_loras + 1 : num_loras + 1 + t]
        counts = torch.bincount(token_lora[token_lora >= 0].long(), minlength=num_loras)
        assert bounds[0] == 0 and torch.equal(bounds[1:] - bounds[:-1], counts.int())
        for lora in range(num_loras):
            got = idx[bounds[lora] : bounds[lora + 1]].sort().values
            assert torch.equal(got, (token_lora == lora).nonzero().squeeze(1).int())
        # The groups to scan and the tiles of 16, 32, 64 tokens (the kernels' work).
        info = grouping.meta_info(meta, t, num_loras)
        assert info[0] == int(token_lora.max()) + 1
        for i, bm in enumerate(grouping.TILE_BMS):
            assert info[1 + i] == int(((counts + bm - 1) // bm).sum()), (t, bm)
        # The tile list: each adapter's positions in order, cut every BM.
        bm = grouping.adapter_tile_bm(t, num_loras)
        want = [(lora, lo, min(lo + bm, int(bounds[lora + 1])))
                for lora in range(num_loras)
                for lo in range(int(bounds[lora]), int(bounds[lora + 1]), bm)]
        got = info[4:4 + 3 * len(want)].view(-1, 3).tolist()
        assert [tuple(e) for e in got] == want, (t, bm)
        assert len(want) <= grouping.max_tiles(t, num_loras, bm)


def test_meta_buffer_for_the_most_tokens_holds_every_batch():
    # The pager allocates group_by_adapter's buffer once, for max_tokens, and
    # hands each forward its first meta_size(t) entries. The tile list's BM
    # grows with t (16 -> 32 at 24 tokens per adapter slot): a size that
    # followed BM would be larger just below that step than at it.
    from vllm_slora.memory.step import StepBuffers, StepLimits

    for slots in (1, 8, 256):
        sizes = [grouping.meta_size(t, slots) for t in range(0, 64 * slots + 2)]
        assert all(a <= b for a, b in zip(sizes, sizes[1:])), slots
    step = StepBuffers(StepLimits(max_tokens=24 * 8, max_loras=8, max_rank=16), torch.device("cpu"))
    for t in range(1, 24 * 8 + 1):
        assert step.meta_for(t).numel() == grouping.meta_size(t, 8)


@pytest.mark.parametrize("resident", [1, 64])
def test_few_adapters_in_many_slots(triton_backend, by_adapter, monkeypatch, resident):
    # As in a CUDA graph captured for 64 adapter slots: a step of 3 adapters
    # in slots 3, 17 and 60 (their tile count comes from the grouping), on a
    # persistent grid of 8 programs (each loops over many work items) or of
    # one program per item.
    monkeypatch.setattr(knobs, "RESIDENT_PROGRAMS_PER_SM", resident)
    ranks = [MIXED[i % len(MIXED)] or 8 for i in range(64)]
    gen = torch.Generator().manual_seed(5)
    token_lora = torch.tensor([3, 17, 60, -1], dtype=torch.int32)[torch.randint(0, 4, (45,), generator=gen)]
    check(ranks, 64, [64, 32, 32], 32, torch.float16, token_lora, meta=True)


def test_many_adapters(triton_backend):
    ranks = [MIXED[i % len(MIXED)] for i in range(40)]
    token_lora = torch.randperm(40, generator=torch.Generator().manual_seed(4))[:24]
    check(ranks, 64, [32, 32], 32, torch.float16, token_lora.to(torch.int32), lora=False)


@pytest.mark.parametrize("adapters,chosen", [(20, 1), (6, 2), (3, 4)])
def test_split_chosen_from_the_steps_tiles(triton_backend, by_adapter, monkeypatch, request,
                                           adapters, chosen):  # fmt: skip
    # The plan splits K = 10 pages 4 ways, as if the step had one adapter
    # (FEW_GROUPS = 1: 4 tiles); the step's 20 (6) one-adapter tiles call
    # for 1 (2) splits, its 3 for the planned 4. The shrink writes only
    # those partials, the expand sums only them, and the op equals the
    # reference either way.
    from vllm_slora.kernels.expand import launch_expand
    from vllm_slora.kernels import plan as plan_mod
    from vllm_slora.kernels.plan import pow2_split, split_args
    from vllm_slora.kernels.shrink import launch_shrink

    monkeypatch.setattr(knobs, "FEW_GROUPS", 1)
    monkeypatch.setattr(knobs, "DEVICE_SPLIT", True)
    # The splits above are those of the interpreter's 8 SMs; a GPU plans
    # for its own count (an H100's 132: 5 splits, not 4), so plan for 8 there too.
    monkeypatch.setattr(plan_mod, "num_sms", lambda index: 8)
    plan_mod._plan.cache_clear()
    request.addfinalizer(plan_mod._plan.cache_clear)
    ranks = [SMALL[i % len(SMALL)] for i in range(adapters)]
    token_lora = (torch.arange(40) % adapters).to(torch.int32)
    k, ns, d, dtype = 320, [64, 32], 32, torch.float16
    ad = check(ranks, k, ns, d, dtype, token_lora, meta=True)
    token_lora = token_lora.to(DEVICE)
    groups = grouping.make_groups(token_lora, adapters, None, None)
    pl = plan(shape_of(groups, 40, k, max(ns), len(ns), ad.max_rank, d, torch.device(DEVICE),
                       dtype))
    assert pl.split == 4, pl
    est_tiles, per_tile, want2, _ = split_args(pl, k, d, len(ns), ad.max_rank)
    # The rule on the host: the step's tiles (one per adapter), at least the plan's.
    assert min(pow2_split(max(adapters, est_tiles) * per_tile, want2), pl.split) == chosen
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    ws = torch.full((pl.split, len(ns), 40, ad.max_rank), float("nan"), device=DEVICE)
    launch_shrink(x, ad.pool, ad.a_rows, ad.lora_start, ad.lora_rank, token_lora, ws, groups, pl,
                  dev_split=True)
    want = torch.full((len(ns), 40, ad.max_rank), float("nan"), device=DEVICE)
    reference.paged_lora_shrink(x, ad.pool, ad.a_rows, ad.lora_start, ad.lora_rank, token_lora,
                                want)
    written = ~want.isnan()
    assert not ws[chosen:].isnan().logical_not().any(), "partials past the chosen split written"
    got = ws[:chosen].sum(0)
    assert torch.equal(got.isnan(), want.isnan())
    assert rel_err(got[written], want[written]) <= TOL[dtype]
    # The expand reads the chosen partials only (the others are NaN here).
    y0 = torch.randn(40, sum(ns), generator=torch.Generator().manual_seed(3)).to(dtype)
    y, want_y = y0.to(DEVICE).clone(), y0.to(DEVICE).clone()
    launch_expand(ws, ad.pool, ad.b_rows, ad.lora_start, ad.lora_rank, ad.lora_scale, token_lora,
                  y, groups, pl, v_split=pl.split,
                  dev_split=split_args(pl, k, d, len(ns), ad.max_rank))
    reference.paged_lora_expand(want, ad.pool, ad.b_rows, ad.lora_start, ad.lora_rank,
                                ad.lora_scale, token_lora, want_y)
    assert y.isfinite().all()
    assert rel_err(y, want_y) <= TOL[dtype]


def test_many_segments_one_token_each(triton_backend, monkeypatch):
    # Decode-like segments (length 1); more segments than one tile-map step.
    monkeypatch.setattr(knobs, "SCAN_GROUPS", 16)
    seg_lora = [i % 5 - 1 for i in range(20)]
    token_lora, segments = make_segments([1] * 20, seg_lora)
    check([1, 8, 16, 32], 64, [64], 32, torch.float16, token_lora, segments)


@pytest.mark.parametrize("mode", ["per-token", "by-adapter", "segments"])
def test_no_lora_tokens_at_all(triton_backend, monkeypatch, mode):
    if mode == "by-adapter":
        monkeypatch.setattr(knobs, "PER_TOKEN_MAX_T", 0)
    token_lora, segments = make_segments([9, 4], [-1, -1])
    check([8, 16], 64, [64], 32, torch.float16, token_lora, segments if mode == "segments" else None)


def test_rejects_too_many_slices(triton_backend):
    ad = make_paged_adapters([8], 64, [32] * 4, 32, torch.float16, device=DEVICE)
    out = torch.empty(4, 1, 8, device=DEVICE)
    x = torch.randn(1, 64, device=DEVICE).half()
    token_lora = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="fused slices"):
        kernels.paged_lora_shrink(
            x, ad.pool, ad.a_rows, ad.lora_start, ad.lora_rank, token_lora, out
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_first_mbgmv(dtype):
    # The first, one-program-per-token MBGMV, kept as a baseline.
    ranks = MIXED + [8]
    ad = make_paged_adapters(ranks, 64, [64, 32, 32], 32, dtype, device=DEVICE)
    token_lora = decode_batch(len(ranks), 9, 8).to(DEVICE)
    x = torch.randn(9, 64, device=DEVICE).to(dtype)
    y = torch.randn(9, 128, device=DEVICE).to(dtype)
    want = y.clone()
    meta = (ad.lora_start, ad.lora_rank)
    v = torch.empty(3, 9, ad.max_rank, device=DEVICE)
    mbgmv.mbgmv_shrink(x, ad.pool, ad.a_rows, *meta, token_lora, v)
    mbgmv.mbgmv_expand(v, ad.pool, ad.b_rows, *meta, ad.lora_scale, token_lora, y)
    reference.paged_lora(x, want, ad.pool, ad.a_rows, ad.b_rows, *meta, ad.lora_scale, token_lora)
    assert rel_err(y, want) <= TOL[dtype]


@pytest.mark.parametrize("mode", ["per-token", "by-adapter", "segments"])
def test_expand_into_column_slice(triton_backend, monkeypatch, mode):
    """Row-parallel TP: the expand adds into this rank's columns of the full-width
    partial sum, a strided view; the columns around it stay bit-unchanged."""
    if mode == "by-adapter":
        monkeypatch.setattr(knobs, "PER_TOKEN_MAX_T", 0)
    ranks, n, d, world, p = [8, 3, 16, 1], 64, 16, 3, 1
    ad = make_paged_adapters(ranks, 32, [n], d, torch.float16, device=DEVICE, seed=4)
    token_lora, segments = make_segments([3, 1, 2, 1, 3], [0, -1, 2, 1, 3], device=DEVICE)
    segments = segments if mode == "segments" else None
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(token_lora.shape[0], ad.max_rank, generator=gen).to(DEVICE)
    full = torch.randn(token_lora.shape[0], n * world, generator=gen).to(torch.float16).to(DEVICE)
    got, want = full.clone(), full.clone()
    cols = slice(p * n, (p + 1) * n)
    args = (ad.pool, ad.b_rows[0], ad.lora_start, ad.lora_rank, ad.lora_scale, token_lora)
    kernels.paged_lora_expand(v, *args, got[:, cols], segments)
    reference.paged_lora_expand(v, *args, want[:, cols])
    outside = torch.ones(n * world, dtype=torch.bool)
    outside[cols] = False
    assert torch.equal(got[:, outside], full[:, outside]), "wrote outside its columns"
    assert rel_err(got[:, cols], want[:, cols]) <= TOL[torch.float16]


# ---- custom ops and torch.compile (CPU, reference backend) ------------------


def _small_problem(device="cpu"):
    ad = make_paged_adapters([16, 8], 64, [32, 32], 32, torch.float32, device=device, seed=9)
    token_lora = torch.tensor([1, -1, 0, 1, 0], dtype=torch.int32, device=device)
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(5, 64, generator=gen).to(device)
    y = torch.randn(5, 64, generator=gen).to(device)
    return ad, token_lora, x, y


def test_ops_are_registered_custom_ops():
    for name in ("paged_lora", "paged_lora_shrink", "paged_lora_expand"):
        op = getattr(torch.ops.vllm_slora, name).default
        assert op._schema.is_mutable, name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_paged_lora_without_dispatch_is_the_same_op(monkeypatch, backend):
    # dispatch=False (the LoRA layers' path) runs the op's implementation directly.
    monkeypatch.setattr(kernels, "BACKEND_OVERRIDE", backend)
    ad, token_lora, x, y0 = _small_problem()
    args = (ad.pool, ad.a_rows, ad.b_rows, ad.lora_start, ad.lora_rank, ad.lora_scale, token_lora)
    got, want = y0.clone(), y0.clone()
    kernels.paged_lora(x, got, *args, max_rank=16, dispatch=False)
    kernels.paged_lora(x, want, *args, max_rank=16)
    assert not torch.equal(want, y0) and torch.equal(got, want)


def test_opcheck_paged_lora():
    ad, token_lora, x, y = _small_problem()
    args = (x, y, ad.pool, ad.a_rows, ad.b_rows, ad.lora_start, ad.lora_rank, ad.lora_scale,
            token_lora, None, None, 16, None)  # fmt: skip
    torch.library.opcheck(
        torch.ops.vllm_slora.paged_lora.default, args,
        test_utils=("test_schema", "test_faketensor"),
    )  # fmt: skip


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",  # dynamo + fake kernels + functionalisation of the mutation
        pytest.param(
            "inductor",
            marks=pytest.mark.skipif(
                not torch.cuda.is_available() and not os.environ.get("VLLM_SLORA_TEST_INDUCTOR"),
                reason="inductor's C++ build takes ~15 s on the CPU machine; runs on GPU "
                "machines or with VLLM_SLORA_TEST_INDUCTOR=1",
            ),
        ),
    ],
)
def test_torch_compile_fullgraph_matches_eager(backend):
    ad, token_lora, x, y0 = _small_problem()

    def layer(x, y, token_lora):
        kernels.paged_lora(x, y, ad.pool, ad.a_rows, ad.b_rows, ad.lora_start, ad.lora_rank,
                           ad.lora_scale, token_lora, max_rank=16)  # fmt: skip
        return y * 2 + 1  # something after the op, for inductor to compile

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    y_compiled, y_eager = y0.clone(), y0.clone()
    got = compiled(x, y_compiled, token_lora)
    want = layer(x, y_eager, token_lora)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    # The op mutates y in place under compile too, and did something.
    assert torch.allclose(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y_eager, y0)


# ---- GPU, Llama-2-7B widths -----------------------------------------------

LLAMA = {
    "qkv-7b": (4096, [4096, 4096, 4096]),
    "qkv-gqa": (4096, [4096, 1024, 1024]),
    "gate-up-7b": (4096, [11008, 11008]),
    "down-7b": (11008, [4096]),
}


GPU_DECODE = [
    pytest.param(t, d, dtype, id=f"t{t}-d{d}-{str(dtype)[6:]}")
    for t, d, dtype in [
        (5, 256, torch.float16),  # per token
        (5, 256, torch.bfloat16),
        (256, 256, torch.float16),  # per adapter
        (256, 256, torch.bfloat16),
        (256, 128, torch.float16),  # D = 128 pages
    ]
]


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("shape", LLAMA.values(), ids=LLAMA.keys())
@pytest.mark.parametrize("t,d,dtype", GPU_DECODE)
def test_gpu_decode_llama(triton_backend, shape, d, dtype, t):
    k, ns = shape
    ranks = [MIXED[i % len(MIXED)] for i in range(32)]
    gen = torch.Generator().manual_seed(5)
    token_lora = torch.randint(-1, len(ranks), (t,), generator=gen, dtype=torch.int32)
    check(ranks, k, ns, d, dtype, token_lora, device="cuda")


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", LLAMA.values(), ids=LLAMA.keys())
def test_gpu_segments_llama(triton_backend, shape, dtype):
    k, ns = shape
    gen = torch.Generator().manual_seed(6)
    lengths = torch.randint(1, 300, (24,), generator=gen).tolist() + [0, 0]
    seg_lora = torch.randint(-1, len(MIXED), (26,), generator=gen).tolist()
    token_lora, segments = make_segments(lengths, seg_lora)
    check(MIXED, k, ns, 256, dtype, token_lora, segments, device="cuda")


@pytest.mark.gpu
@on_gpu
def test_gpu_few_long_segments_split_k(triton_backend):
    # Prefill of few long segments on down (K = 11008): split-K + reduce.
    token_lora, segments = make_segments([700, 500], [0, 1])
    check([16, 64], 11008, [4096], 256, torch.bfloat16, token_lora, segments, device="cuda")


@pytest.mark.parametrize("t", [6, 40])  # one tile per token; grouped by adapter
def test_module_with_rank_in_one_slot_only(triton_backend, t):
    # The kernels skip a module on which no adapter slot has a rank (the
    # engine calls gate_up and down also when the step's adapters target only
    # q,k,v,o). Here only the last of 5 slots has one: its tokens get LoRA,
    # the others' rows stay bit-identical; then no slot has one: nothing changes.
    ad = make_paged_adapters([8, 16, 8, 16, 8], 64, [64], 32, torch.float16, device=DEVICE)
    gen = torch.Generator().manual_seed(3)
    token_lora = torch.randint(-1, 5, (t,), generator=gen, dtype=torch.int32)
    token_lora[:2] = torch.tensor([4, 0])
    token_lora = token_lora.to(DEVICE)
    x = torch.randn(t, 64, generator=gen).half().to(DEVICE)
    y0 = torch.randn(t, 64, generator=gen).half().to(DEVICE)
    for ranks in ([0, 0, 0, 0, 8], [0] * 5):
        rank = torch.tensor(ranks, dtype=torch.int32, device=DEVICE)
        y, want = y0.clone(), y0.clone()
        args = (ad.pool, ad.a_rows[0], ad.b_rows[0], ad.lora_start, rank, ad.lora_scale, token_lora)
        kernels.paged_lora(x, y, *args, max_rank=16)
        reference.paged_lora(x, want, *args)
        untouched = token_lora != 4 if ranks[4] else torch.ones_like(token_lora, dtype=torch.bool)
        assert torch.equal(y[untouched], y0[untouched])
        if ranks[4]:
            assert not torch.equal(y[0], y0[0])
            assert rel_err(y, want) <= TOL[torch.float16]
