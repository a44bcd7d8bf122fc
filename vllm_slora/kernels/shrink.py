"""The shrink of the grouped kernels: v = x @ A^T, per adapter and rank.

Every program loops over work items (tile x rank block x split x slice;
``plan.py``); an item reads its tile's x rows and its adapter's A pages and
writes fp32 v [S, T, R_MAX], or split-K partials [split, S, T, R_MAX] that
the expand (``grouped.lora``) or ``_reduce_kernel`` sums. Work is
rank-exact: items whose rank block starts past the group's rank return at
once, so a rank-8 token does rank-8 work. Tested against ``reference.py``
in ``tests/kernels/test_kernels.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_slora.kernels import knobs
from vllm_slora.kernels.device import dot_f32, pow2
from vllm_slora.kernels.grouping import Groups, make_groups
from vllm_slora.kernels.pages import check_pool, pick, slice_tables, widths
from vllm_slora.kernels.plan import Plan, plan, register_cap, resident, shape_of
from vllm_slora.kernels.replay import launch
from vllm_slora.kernels.tiles import (any_rank_lanes, device_split, if_any_rank, mma, num_tiles,
                                      tile, tile_tokens, uses_tile_list)


@triton.jit(do_not_specialize=["NG", "TILES", "K", "R_MAX", "K_SPLIT", "NUM_R", "SPLIT", "NUM_S",
                               "L", "EST_TILES", "WANT2"])
def _shrink_kernel(
    x_ptr,  # [T, K]
    pool_ptr,  # [num_rows, D]
    out_ptr,  # fp32 [S, T, R_MAX], or partials [SPLIT, S, T, R_MAX]
    rows0_ptr,  # int32 [V, K // D], one table per slice
    rows1_ptr,
    rows2_ptr,
    lora_start_ptr,  # int32 [L]
    lora_rank_ptr,  # int32 [L]
    token_lora_ptr,  # int32 [T]
    bounds_ptr,  # group bounds [NG + 1] (SEGMENTS, ADAPTERS)
    glora_ptr,  # adapter per group [NG] (SEGMENTS); groups to scan, tiles [4] (ADAPTERS)
    idx_ptr,  # group-ordered tokens [T] (ADAPTERS)
    NG,
    TILES,  # tiles bound (the tile count is read from meta in ADAPTERS mode)
    L,  # adapter slots
    K,
    R_MAX,
    K_SPLIT,  # K elements per split: NPG pages or fewer
    NUM_R,  # rank blocks: cdiv(R_MAX, BR)
    SPLIT,  # DEV_SPLIT: the most splits
    NUM_S,
    EST_TILES,  # DEV_SPLIT: the split rule's inputs (Plan.est_tiles, Plan.split_want)
    WANT2,
    x_stride,
    pool_stride,
    rows_stride,
    out_stride_c,
    out_stride_s,
    out_stride_t,
    MODE: tl.constexpr,
    D: tl.constexpr,
    BM: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
    NPG: tl.constexpr,  # power of two >= pages per split
    SCAN_GROUPS: tl.constexpr,
    LIST: tl.constexpr,  # ADAPTERS: tiles from group_by_adapter's tile list
    RANK_LB: tl.constexpr,  # power of two >= L, or 0: skip the any-rank check
    DOT_F32: tl.constexpr,
    PDL: tl.constexpr,  # let the expand (launched with PDL) start its prologue now
    DEV_SPLIT: tl.constexpr,  # choose the split from the step's tiles (tiles.device_split)
):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    # Rank blocks, then splits, then slices vary fastest: the items that
    # read one x tile run together and find it in L2.
    tiles = num_tiles(glora_ptr, TILES, MODE, BM)
    if DEV_SPLIT:
        split, pages_per_split = device_split(tiles, EST_TILES, NUM_R * NUM_S, WANT2, SPLIT,
                                              K // D)
        k_split = pages_per_split * D
    else:
        split = SPLIT
        k_split = K_SPLIT
    per_tile = NUM_R * split * NUM_S
    n_items = tiles * per_tile
    n_items = if_any_rank(n_items, lora_rank_ptr, L, RANK_LB)
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
        p = item // per_tile
        q = item % per_tile
        rb = q % NUM_R
        c = (q // NUM_R) % split
        s = q // (NUM_R * split)
        lora, lo, hi = tile(p, token_lora_ptr, bounds_ptr, glora_ptr, NG, MODE, BM, SCAN_GROUPS,
                            LIST)
        # rank and start side by side (both need only the adapter): one
        # dependent load fewer before the pages.
        rank = tl.load(lora_rank_ptr + tl.maximum(lora, 0))
        start = tl.load(lora_start_ptr + tl.maximum(lora, 0))
        rank = tl.where(lora >= 0, tl.minimum(rank, R_MAX), 0)
        if rb * BR < rank:
            _shrink_item(x_ptr, pool_ptr, out_ptr, rows0_ptr, rows1_ptr, rows2_ptr, start,
                         idx_ptr, lora, lo, hi, rank, rb, c, s, K, k_split, x_stride, pool_stride,
                         rows_stride, out_stride_c, out_stride_s, out_stride_t, MODE, D, BM, BR,
                         BK, NPG, DOT_F32)  # fmt: skip


@triton.jit
def _shrink_item(x_ptr, pool_ptr, out_ptr, rows0_ptr, rows1_ptr, rows2_ptr, start,
                 idx_ptr, lora, lo, hi, rank, rb, c, s, K, K_SPLIT, x_stride, pool_stride,
                 rows_stride, out_stride_c, out_stride_s, out_stride_t, MODE: tl.constexpr,
                 D: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
                 NPG: tl.constexpr, DOT_F32: tl.constexpr):  # fmt: skip
    """One work item: rank block rb of split c of slice s of one tile."""
    r0 = rb * BR
    rows_ptr = pick(s, rows0_ptr, rows1_ptr, rows2_ptr)
    tok, mask_m = tile_tokens(lo, hi, idx_ptr, MODE, BM)

    offs_r = r0 + tl.arange(0, BR)
    mask_r = offs_r < rank
    offs_k = tl.arange(0, BK)
    x_rows = x_ptr + tok[:, None] * x_stride + offs_k[None, :]
    # This split covers pages pg0 .. pg0 + NPG - 1 of every A-vector. Their
    # pool rows are loaded once, up front: a page lookup inside the K loop
    # would be a load feeding a load, which Triton's pipeliner serialises
    # (one buffer); from registers the A and x tiles get num_stages - 1.
    k_lo = tl.multiple_of(c * K_SPLIT, D)
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    pg0 = k_lo // D
    offs_pg = tl.arange(0, NPG)
    vec_ptr = rows_ptr + (start + offs_r).to(tl.int64) * rows_stride + pg0
    pages = tl.load(
        vec_ptr[:, None] + offs_pg[None, :],
        mask=mask_r[:, None] & ((pg0 + offs_pg) * D < k_hi)[None, :],
        other=0,
    )
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        j = k0 // D - pg0
        page = tl.sum(tl.where(offs_pg[None, :] == j, pages, 0), axis=1).to(tl.int64)
        in_page = tl.max_contiguous(tl.multiple_of(k0 % D + offs_k, BK), BK)
        a = tl.load(
            pool_ptr + page[:, None] * pool_stride + in_page[None, :],
            mask=mask_r[:, None],
            other=0.0,
        )
        xt = tl.load(x_rows + k0, mask=mask_m[:, None], other=0.0)
        acc = mma(xt, tl.trans(a), acc, DOT_F32)
    out = (
        out_ptr + c * out_stride_c + s * out_stride_s + tok[:, None] * out_stride_t
        + offs_r[None, :]
    )  # fmt: skip
    tl.store(out, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["T", "SPLIT"])
def _reduce_kernel(
    ws_ptr,  # fp32 partials [SPLIT, S, T, R_MAX]
    out_ptr,  # fp32 [S, T, R_MAX]
    token_lora_ptr,
    lora_rank_ptr,
    T,
    R_MAX,
    SPLIT,
    ws_stride_c,
    ws_stride_s,
    ws_stride_t,
    out_stride_s,
    out_stride_t,
    BT: tl.constexpr,
    BRM: tl.constexpr,
):
    """out[s, i, :rank] = sum over splits of the partials, for LoRA tokens."""
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    s = tl.program_id(1)
    mask_t = offs_t < T
    lora = tl.load(token_lora_ptr + offs_t, mask=mask_t, other=-1)
    has = mask_t & (lora >= 0)
    rank = tl.load(lora_rank_ptr + tl.where(has, lora, 0), mask=has, other=0)
    rank = tl.minimum(rank, R_MAX)
    offs_r = tl.arange(0, BRM)
    # Loads take whole rows (vectorised; entries past the rank are unwritten
    # and summed but never stored); stores are exact.
    load_mask = has[:, None] & (offs_r < R_MAX)[None, :]
    mask = has[:, None] & (offs_r[None, :] < rank[:, None])
    rows = offs_t.to(tl.int64)[:, None]
    src = ws_ptr + s * ws_stride_s + rows * ws_stride_t + offs_r[None, :]
    acc = tl.zeros((BT, BRM), dtype=tl.float32)
    for c in range(SPLIT):
        acc += tl.load(src + c * ws_stride_c, mask=load_mask, other=0.0)
    tl.store(out_ptr + s * out_stride_s + rows * out_stride_t + offs_r[None, :], acc, mask=mask)




def launch_shrink(x, pool, tables, lora_start, lora_rank, token_lora, out, groups: Groups,
                  pl: Plan, pdl: bool = False, record=None,
                  dev_split: bool = False) -> None:  # fmt: skip
    """Run the shrink kernel into ``out``: [S, T, R_MAX] when pl.split == 1,
    else partials [split, S, T, R_MAX]. ``dev_split`` (ADAPTERS mode): the
    kernel splits K at most pl.split times, as the step's tiles call for
    (``tiles.device_split``); partials past its choice are left unwritten."""
    d = pool.shape[1]
    t, k = x.shape
    s, r_max = len(tables), out.shape[-1]
    padded = slice_tables(tables)
    num_r = triton.cdiv(r_max, pl.shrink_rank_block)
    grid = (resident(pl.max_tiles * num_r * pl.split * s, x.device),)
    if grid[0] == 0:
        return
    stride_c = out.stride(0) if pl.split > 1 else 0
    o_s, o_t = out.stride(-3), out.stride(-2)
    launch(_shrink_kernel, grid, (
        x, pool, out, *padded, lora_start, lora_rank, token_lora,
        groups.bounds, groups.glora, groups.idx,
        groups.num_groups, pl.max_tiles, lora_rank.shape[0], k, r_max, pl.split_width, num_r,
        pl.split, s, pl.est_tiles, pl.split_want,
        x.stride(0), pool.stride(0), padded[0].stride(0), stride_c, o_s, o_t,
    ), dict(
        MODE=groups.mode, D=d, BM=pl.tile_tokens, BR=pl.shrink_rank_block, BK=pl.shrink_k_block,
        NPG=pow2(k // d) if dev_split else pl.split_pages_pow2, SCAN_GROUPS=knobs.SCAN_GROUPS,
        LIST=uses_tile_list(groups.mode), RANK_LB=any_rank_lanes(lora_rank),
        DOT_F32=dot_f32(x), PDL=pdl, DEV_SPLIT=dev_split, num_warps=pl.shrink_warps,
        num_stages=pl.shrink_stages, **register_cap(pl.shrink_maxnreg),
    ), record)  # fmt: skip


def launch_reduce(ws, out, token_lora, lora_rank, record=None) -> None:
    split, s, t, r_max = ws.shape
    bt = 8
    launch(_reduce_kernel, (triton.cdiv(t, bt), s), (
        ws, out, token_lora, lora_rank, t, r_max, split,
        ws.stride(0), ws.stride(1), ws.stride(2), out.stride(0), out.stride(1),
    ), dict(BT=bt, BRM=max(16, pow2(r_max)), num_warps=2), record)  # fmt: skip


def shrink(x, pool, tables, lora_start, lora_rank, token_lora, out, segments=None,
           meta=None) -> None:  # fmt: skip
    """out[s, i, :rank] = x[i] @ A_{l,s}^T (out: fp32 [S, T, R_MAX])."""
    d = check_pool(x, pool)
    slice_tables(tables)
    t, k = x.shape
    s, r_max = len(tables), out.shape[-1]
    if t == 0 or lora_start.shape[0] == 0:  # nothing to add (the kernels read slot 0 of L)
        return
    assert x.stride(1) == 1 and out.stride(2) == 1 and k % d == 0
    groups = make_groups(token_lora, lora_start.shape[0], segments, meta)
    pl = plan(shape_of(groups, t, k, max(widths(tables, d)), s, r_max, d, x.device, x.dtype))
    if pl.split == 1:
        launch_shrink(x, pool, tables, lora_start, lora_rank, token_lora, out, groups, pl)
        return
    ws = torch.empty((pl.split, s, t, r_max), dtype=torch.float32, device=x.device)
    launch_shrink(x, pool, tables, lora_start, lora_rank, token_lora, ws, groups, pl)
    launch_reduce(ws, out, token_lora, lora_rank)
