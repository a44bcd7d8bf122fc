"""The expand of the grouped kernels: y += scale * v @ B^T, per adapter.

Every program loops over work items (tile x column block(s) x slice;
``plan.py``); an item loads its tile's v (summing split-K partials where the
shrink left them, V_SPLIT > 1), loops over rank blocks only up to its
group's rank, and adds into its y columns. With one rank step covering
every adapter, a program streams several column blocks (NBP), loading v and
the page lookups once. Tested against ``reference.py`` in
``tests/kernels/test_kernels.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vllm_slora.kernels import knobs
from vllm_slora.kernels.device import dot_f32
from vllm_slora.kernels.grouping import Groups, make_groups
from vllm_slora.kernels.pages import (MAX_SLICES, check_pool, load_b_tile, pick, slice_tables,
                                      widths)
from vllm_slora.kernels.plan import Plan, plan, register_cap, resident, shape_of
from vllm_slora.kernels.replay import launch
from vllm_slora.kernels.tiles import (any_rank_lanes, device_split, if_any_rank, mma, num_tiles,
                                      tile, tile_tokens, uses_tile_list)


@triton.jit
def _load_v(v_rows, offs_r, mask_m, R_MAX, v_stride_c, split, V_SPLIT: tl.constexpr):
    """v[tile rows, offs_r] (fp32), the shrink's first ``split`` (<= V_SPLIT)
    split-K partials summed in a fixed order.

    Entries past R_MAX are not loaded; entries past the adapter's rank are
    loaded (whole rows, vectorised) and must be zeroed by the caller.
    """
    mask_v = mask_m[:, None] & (offs_r < R_MAX)[None, :]
    vt = tl.load(v_rows + offs_r[None, :], mask=mask_v, other=0.0)
    for c in tl.static_range(1, V_SPLIT):
        vt += tl.load(v_rows + c * v_stride_c + offs_r[None, :], mask=mask_v & (c < split),
                      other=0.0)
    return vt


@triton.jit
def _expand_columns(v_rows, pool_ptr, y_ptr, rows_ptr, tok, mask_m, start, rank, scale, col,
                    width, y_col, R_MAX, v_stride_c, split, rows_stride, pool_stride, y_stride,
                    D: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
                    NBP: tl.constexpr, V_SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
                    PDL: tl.constexpr):  # fmt: skip
    """Expand of NBP consecutive column blocks of one tile, for rank <= BR.

    v is loaded once and the pool rows of the program's NBP * BN columns are
    looked up once, up front (a lookup inside the loop would be a load feeding
    a load, which the pipeliner serialises), so the loop streams B and y
    tiles with num_stages - 1 in flight. col is a multiple of NBP * BN, itself
    a multiple of D.
    """
    NPP: tl.constexpr = (NBP * BN) // D  # pages per program, a power of two
    offs_r = tl.arange(0, BR)
    mask_r = offs_r < rank
    p0 = col // D
    offs_p = tl.arange(0, NPP)
    pages = tl.load(
        rows_ptr + (start + offs_r).to(tl.int64)[:, None] * rows_stride + p0 + offs_p[None, :],
        mask=mask_r[:, None] & (p0 + offs_p < width // D)[None, :],
        other=0,
    )
    if PDL:
        tl.extra.cuda.gdc_wait()
    vt = _load_v(v_rows, offs_r, mask_m, R_MAX, v_stride_c, split, V_SPLIT)
    vt = tl.where(mask_r[None, :], vt, 0.0).to(pool_ptr.dtype.element_ty)
    offs_n = tl.arange(0, BN)
    for i in range(NBP):
        c = col + i * BN
        live = c < width
        page = tl.sum(tl.where(offs_p[None, :] == (i * BN) // D, pages, 0), axis=1).to(tl.int64)
        in_page = tl.max_contiguous(tl.multiple_of(c % D + offs_n, BN), BN)
        b = tl.load(
            pool_ptr + page[:, None] * pool_stride + in_page[None, :],
            mask=mask_r[:, None] & live,
            other=0.0,
        )
        y_tile = y_ptr + tok[:, None] * y_stride + y_col + c + offs_n[None, :]
        y = tl.load(y_tile, mask=mask_m[:, None] & live, other=0.0)
        acc = mma(vt, b, tl.zeros((BM, BN), dtype=tl.float32), DOT_F32)
        y = (y.to(tl.float32) + acc * scale).to(y_ptr.dtype.element_ty)
        tl.store(y_tile, y, mask=mask_m[:, None] & live)


@triton.jit(do_not_specialize=["NG", "TILES", "L", "n0", "n1", "n2", "NUM_N", "NUM_S",
                               "EST_TILES", "S_ITEMS", "WANT2", "S_PAGES"])
def _expand_kernel(
    v_ptr,  # fp32 [S, T, R_MAX], or partials [V_SPLIT, S, T, R_MAX]
    pool_ptr,  # [num_rows, D]
    y_ptr,  # [T, sum N_s]
    rows0_ptr,  # int32 [V, N_s // D], one table per slice
    rows1_ptr,
    rows2_ptr,
    lora_start_ptr,  # int32 [L]
    lora_rank_ptr,  # int32 [L]
    lora_scale_ptr,  # fp32 [L]
    token_lora_ptr,  # int32 [T]
    bounds_ptr,
    glora_ptr,
    idx_ptr,
    NG,
    TILES,  # tiles bound (the tile count is read from meta in ADAPTERS mode)
    L,  # adapter slots
    n0,  # width of slice 0, 1, 2
    n1,
    n2,
    R_MAX,
    NUM_N,  # column groups (NBP blocks of BN) of the widest slice
    NUM_S,
    EST_TILES,  # DEV_SPLIT: the shrink's split rule (plan.split_args), to know
    S_ITEMS,  # how many partials it wrote
    WANT2,
    S_PAGES,
    v_stride_c,
    v_stride_s,
    v_stride_t,
    pool_stride,
    y_stride,
    MODE: tl.constexpr,
    D: tl.constexpr,
    BM: tl.constexpr,
    BR: tl.constexpr,
    BN: tl.constexpr,
    SCAN_GROUPS: tl.constexpr,
    V_SPLIT: tl.constexpr,
    NBP: tl.constexpr,  # column blocks per program (> 1: rank <= BR, one rank step)
    LIST: tl.constexpr,
    RANK_LB: tl.constexpr,
    DOT_F32: tl.constexpr,
    PDL: tl.constexpr,  # launched with PDL behind the shrink: wait before reading v
    DEV_SPLIT: tl.constexpr,  # the shrink chose its split on the device (V_SPLIT at most)
):
    per_tile = NUM_N * NUM_S
    tiles = num_tiles(glora_ptr, TILES, MODE, BM)
    n_items = tiles * per_tile
    if DEV_SPLIT:
        split, _ = device_split(tiles, EST_TILES, S_ITEMS, WANT2, V_SPLIT, S_PAGES)
    else:
        split = V_SPLIT
    n_items = if_any_rank(n_items, lora_rank_ptr, L, RANK_LB)
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
        p = item // per_tile
        q = item % per_tile
        nb = q % NUM_N
        s = q // NUM_N
        width = tl.where(s == 0, n0, tl.where(s == 1, n1, n2))
        col = nb * BN * NBP
        lora, lo, hi = tile(p, token_lora_ptr, bounds_ptr, glora_ptr, NG, MODE, BM, SCAN_GROUPS,
                            LIST)
        rank = tl.load(lora_rank_ptr + tl.maximum(lora, 0))
        start = tl.load(lora_start_ptr + tl.maximum(lora, 0))
        scale = tl.load(lora_scale_ptr + tl.maximum(lora, 0))
        rank = tl.where((lora >= 0) & (col < width), tl.minimum(rank, R_MAX), 0)
        if rank > 0:
            _expand_item(v_ptr, pool_ptr, y_ptr, rows0_ptr, rows1_ptr, rows2_ptr, start,
                         scale, idx_ptr, lora, lo, hi, rank, s, col, width, n0, n1, R_MAX,
                         v_stride_c, split, v_stride_s, v_stride_t, pool_stride, y_stride, MODE,
                         D, BM, BR, BN, V_SPLIT, NBP, DOT_F32, PDL)  # fmt: skip
    if PDL:
        # A program that read no v still ends after the shrink: what runs
        # after this kernel in the stream may rely on the shrink's writes.
        tl.extra.cuda.gdc_wait()


@triton.jit
def _expand_item(v_ptr, pool_ptr, y_ptr, rows0_ptr, rows1_ptr, rows2_ptr, start,
                 scale, idx_ptr, lora, lo, hi, rank, s, col, width, n0, n1, R_MAX,
                 v_stride_c, split, v_stride_s, v_stride_t, pool_stride, y_stride,
                 MODE: tl.constexpr,
                 D: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
                 V_SPLIT: tl.constexpr, NBP: tl.constexpr, DOT_F32: tl.constexpr,
                 PDL: tl.constexpr):  # fmt: skip
    """One work item: column block(s) col of slice s of one tile."""
    rows_ptr = pick(s, rows0_ptr, rows1_ptr, rows2_ptr)
    # Slice s starts after slices 0..s-1 in y; table s has width // D columns.
    y_col = tl.multiple_of(tl.where(s == 0, 0, tl.where(s == 1, n0, n0 + n1)), D)
    rows_stride = width // D
    tok, mask_m = tile_tokens(lo, hi, idx_ptr, MODE, BM)
    v_rows = v_ptr + s * v_stride_s + tok[:, None] * v_stride_t
    if NBP > 1:
        _expand_columns(v_rows, pool_ptr, y_ptr, rows_ptr, tok, mask_m, start, rank, scale,
                        col, width, y_col, R_MAX, v_stride_c, split, rows_stride, pool_stride,
                        y_stride,
                        D, BM, BR, BN, NBP, V_SPLIT, DOT_F32, PDL)  # fmt: skip
    else:
        offs_n = tl.arange(0, BN)
        in_page = tl.max_contiguous(tl.multiple_of(col % D + offs_n, BN), BN)
        y_tile = y_ptr + tok[:, None] * y_stride + y_col + col + offs_n[None, :]
        # Issued before the rank loop so that its latency overlaps the B loads.
        y = tl.load(y_tile, mask=mask_m[:, None], other=0.0)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        # Wait for the shrink (PDL) before the rank loop, not inside it: the
        # software pipeliner hoists the loop's first v loads into its
        # prologue, ahead of a wait placed in the body, and they would read
        # v before the shrink wrote it (triton-lang/triton#11905). The
        # plugin inside CUDA graphs died of that: NaN logits, then sampled
        # ids out of the vocabulary (GPU parity test, 2026-12-02).
        if PDL:
            tl.extra.cuda.gdc_wait()
        for j0 in range(0, rank, BR):
            offs_r = j0 + tl.arange(0, BR)
            mask_r = offs_r < rank
            b = load_b_tile(pool_ptr, rows_ptr, start, offs_r, mask_r, rows_stride, col, in_page,
                            pool_stride, D)
            # v past the rank may be stale or NaN (0 * NaN = NaN): it is loaded
            # (whole rows, vectorised) but zeroed. It is rounded to the weights'
            # dtype for the tensor cores, as punica and vLLM do.
            vt = _load_v(v_rows, offs_r, mask_m, R_MAX, v_stride_c, split, V_SPLIT)
            vt = tl.where(mask_r[None, :], vt, 0.0)
            acc = mma(vt.to(b.dtype), b, acc, DOT_F32)
        y = (y.to(tl.float32) + acc * scale).to(y_ptr.dtype.element_ty)
        tl.store(y_tile, y, mask=mask_m[:, None])




def launch_expand(v, pool, tables, lora_start, lora_rank, lora_scale, token_lora, y,
                  groups: Groups, pl: Plan, v_split: int = 1, pdl: bool = False,
                  record=None, dev_split: tuple | None = None) -> None:  # fmt: skip
    """Run the expand kernel; v is [S, T, R_MAX] or partials [v_split, S, T, R_MAX].

    pdl: launch with programmatic dependent launch; only right behind the
    shrink (or reduce) that writes v, whose other inputs were complete before
    that kernel started. dev_split: the shrink chose its split on the device;
    its ``plan.split_args`` (the expand sums the partials it wrote).
    """
    assert dev_split is None or v_split > 1, "a device split needs the shrink's partials"
    d = pool.shape[1]
    s, r_max = len(tables), v.shape[-1]
    padded = slice_tables(tables)
    ns = widths(tables, d) + [0] * (MAX_SLICES - s)
    num_n = triton.cdiv(triton.cdiv(max(ns), pl.expand_n_block), pl.expand_blocks_per_program)
    grid = (resident(pl.max_tiles * num_n * s, y.device),)
    if grid[0] == 0:
        return
    stride_c = v.stride(0) if v_split > 1 else 0
    launch(_expand_kernel, grid, (
        v, pool, y, *padded, lora_start, lora_rank, lora_scale, token_lora,
        groups.bounds, groups.glora, groups.idx,
        groups.num_groups, pl.max_tiles, lora_rank.shape[0], *ns, r_max, num_n, s,
        *(dev_split or (0, 0, 0, 1)), stride_c, v.stride(-3), v.stride(-2), pool.stride(0), y.stride(0),
    ), dict(
        MODE=groups.mode, D=d, BM=pl.tile_tokens, BR=pl.expand_rank_block, BN=pl.expand_n_block,
        SCAN_GROUPS=knobs.SCAN_GROUPS, LIST=uses_tile_list(groups.mode),
        RANK_LB=any_rank_lanes(lora_rank), V_SPLIT=v_split, NBP=pl.expand_blocks_per_program,
        DOT_F32=dot_f32(y), PDL=pdl, DEV_SPLIT=dev_split is not None,
        num_warps=pl.expand_warps, num_stages=pl.expand_stages, launch_pdl=pdl, **register_cap(pl.expand_maxnreg),
    ), record)  # fmt: skip


def expand(v, pool, tables, lora_start, lora_rank, lora_scale, token_lora, y, segments=None,
           meta=None) -> None:  # fmt: skip
    """y[i, slice s] += scale * v[s, i, :rank] @ B_{l,s}^T (v: fp32 [S, T, R_MAX])."""
    d = check_pool(y, pool)
    slice_tables(tables)
    t = y.shape[0]
    s, r_max = len(tables), v.shape[-1]
    assert sum(widths(tables, d)) == y.shape[1], "y width != sum of slice widths"
    if t == 0 or lora_start.shape[0] == 0:  # nothing to add (the kernels read slot 0 of L)
        return
    assert y.stride(1) == 1 and v.stride(2) == 1
    groups = make_groups(token_lora, lora_start.shape[0], segments, meta)
    pl = plan(shape_of(groups, t, d, max(widths(tables, d)), s, r_max, d, y.device, y.dtype))
    launch_expand(v, pool, tables, lora_start, lora_rank, lora_scale, token_lora, y, groups, pl)
