"""Grouped heterogeneous-rank LoRA kernels (decode and prefill), reading pages.

Vocabulary and layout: see ``vllm_slora/kernels/__init__.py``.

One kernel family serves MBGMV (decode) and MBGMM (prefill). Tokens are
cut into *groups* of tokens that share an adapter, and a group into *tiles*
of up to BM tokens; every program owns one tile and one rank block (shrink)
or one BN-column block (expand), so an adapter's pages are read once per
tile, not once per token, and tensor cores (``tl.dot``) do the math. Three
ways to form groups (``MODE``), picked on the host from shapes only:

``PER_TOKEN`` (0)
    every token is its own tile (small decode batches, T <= PER_TOKEN_MAX_T):
    no metadata at all, one launch less.
``SEGMENTS`` (1)
    the caller's segments (seg_start, seg_lora): runs of consecutive tokens
    (prefill). Rows are contiguous, nothing is gathered.
``ADAPTERS`` (2)
    one group per adapter: ``group_by_adapter`` (one small Triton launch)
    lists each adapter's tokens, like vLLM's LoRAKernelMeta but without
    sorting or host sync: ``meta`` int32 = [bounds (L+1) | token index (T) |
    scratch (L + T) | groups to scan (1) | tiles of BM = 16, 32, 64 (3) |
    tile list (3 x MT)]; adapter l owns token_index[bounds[l]:bounds[l+1]].
    Callers may build it once per batch and pass it to every layer.

Tile map, no host sync. ADAPTERS: ``group_by_adapter`` writes the tile
list, (adapter, first, end position) of every tile of the BM the plans
pick for that batch shape (``adapter_tile_bm``), so a work item finds its
tile with one load. SEGMENTS (and ADAPTERS with ``TILE_LIST`` off, for
comparison): tile p finds its group from the groups' sizes (a cumulative
sum of ceil(size / BM) over the group bounds, in registers), a scan of
every group per work item. The list cut the dependent loads before an
item's first page from about six to three.

Persistent programs: the grid depends only on shapes (T, the adapter slots,
the widths; CUDA-graph safe) and is capped at RESIDENT_PROGRAMS_PER_SM
programs per SM; each program loops over the work items (tile x rank block
x split x slice, or tile x column block x slice) from its id in steps of
the grid. The number of items comes from the step: in ADAPTERS mode from
the tile count that ``group_by_adapter`` stores, so a step of 5 adapters in
a graph captured for 256 adapter slots runs its ~20 tiles' items and no
empty program for the other ~236 possible tiles (an empty program costs a
block launch and the tile-map scan: ~10 us per launch over tens of
thousands of them, measured in decode steps of a 7B model).

Work is rank-exact: shrink programs whose rank block starts past the
group's rank return at once; expand loops over rank blocks only up to the
group's rank. A rank-8 token does rank-8 work.

Expand column streaming: when one rank step covers every adapter (max rank
<= BR), an expand program takes NBP consecutive column blocks instead of
one, as long as the grid keeps EXPAND_PROGRAMS_PER_SM programs per SM. It
loads v and the pool rows of its columns once and streams the B and y tiles
through the software pipeline: fewer, longer programs, which on an H100 cut
decode expands of 512 tokens by 5-10% (``benchmarks/kernels.py`` variants).

Shrink split-K: with few tiles (small batches, few long segments) or a wide
K (``down``, K = 11008) the K loop is cut into SPLIT page-aligned chunks, each
a work item, writing fp32 partial sums to a workspace [SPLIT, S, T, R_MAX].
Plans count tiles as if a step had at most FEW_GROUPS adapters (the steady
state of few popular adapters): many-adapter steps then split more than
they need, which costs partial sums, not idle programs.
The partials are summed in a fixed order (deterministic, no atomics, no
zeroing): by the expand kernel while it loads v (``paged_lora``, when the
partials are small) or by ``_reduce_kernel`` (standalone shrink; large ones).

Pages: a K tile (shrink) or N tile (expand) of width BK / BN <= D never
crosses a page, so it costs one table lookup per rank-vector and reads
contiguous, D-aligned rows of the pool.

Fused slices (q,k,v or gate,up) share one launch: the slice is part of the
program id, and each program picks its slice's vector table among
MAX_SLICES pointer arguments.

Tested against ``reference.py`` in ``tests/kernels/test_kernels.py``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vllm_slora.kernels.mbgmv import MAX_SLICES, check_pool, load_b_tile, pick, slice_tables

PER_TOKEN, SEGMENTS, ADAPTERS = 0, 1, 2
# Decode batches up to this many tokens skip the grouping launch (their
# tokens rarely share adapters; a repeated adapter is re-read from L2).
PER_TOKEN_MAX_T = 32
# Shrink split-K aims at this many programs per SM (see plan()).
PROGRAMS_PER_SM = 4
# The same for big tiles (BM >= 32, about 100 KB of shared memory each).
BIG_TILE_PROGRAMS_PER_SM = 1
MAX_SPLIT = 16
# Sum split-K partials inside the expand when one tile's partials are at
# most this large (else a reduce launch). 64 KB (was 8 KB): the split-K
# steps of a decode batch of 64 fuse too, one launch less per module; in an
# engine-like step in CUDA graphs (``python -m benchmarks.lora_step``, one
# H200, 2026-12-02) the LoRA time fell 12-37% over B = 64/256, n = 5/64.
FUSED_PARTIALS_BYTES = 64 << 10
# Groups scanned per step by the tile map (any count works, in chunks).
NGB = 128
# Persistent grids: at most this many programs per SM, each looping over
# work items. Each item is a chain of dependent loads (tile map, rank, page
# table, pages); 16 programs per SM (more than fit at once) keep more of
# them in flight than 4 did: 64-adapter decode steps 15-25% faster
# (``benchmarks.lora_step``, H200), 5-adapter steps within 7%.
RESIDENT_PROGRAMS_PER_SM = 16
# Plans (split-K, expand column streaming) size the work as if a step in
# ADAPTERS mode had at most this many adapters.
FEW_GROUPS = 8
# Tile sizes whose tile counts group_by_adapter stores (after the groups to scan).
TILE_BMS = (16, 32, 64)
# ADAPTERS mode reads each item's tile from group_by_adapter's tile list
# (False: scans the group bounds per item, the earlier way; a knob for
# ``benchmarks.lora_step``).
TILE_LIST = True
# Programs exit at once when no adapter slot has a rank on the module (one
# vector load of the slots' ranks, beside the first tile's); a knob for
# ``benchmarks.lora_step``.
ANY_RANK_CHECK = True
# Pipeline depth of the small-tile (BM = 16) shrink; expand column block.
SHRINK_STAGES = 4
EXPAND_BN = 128
# Expand: column blocks per program, up to EXPAND_MAX_NBP, while the grid
# keeps at least EXPAND_PROGRAMS_PER_SM programs per SM (rank <= BR only).
# These values won the knob variants of ``python -m benchmarks.kernels
# --variants-only`` on an H100 (fewer, longer expand programs: 5-10% on
# decode batches of 512 tokens; one big-tile shrink program per SM: 12% on
# short prefills of o).
EXPAND_MAX_NBP = 16
EXPAND_PROGRAMS_PER_SM = 2
EXPAND_STAGES = 3
# Warps of the small-tile (BM = 16) shrink and expand programs (8 expand
# warps: 3-7% on decode batches of o and down on an H100).
SMALL_TILE_WARPS = (4, 8)
# Small-tile shrink step: BR rank-vectors x BK columns (BK <= D); BR is
# doubled for fused slices (q,k,v: three times the items already). In an
# engine-like step (``benchmarks.lora_step``, H200, B = 256) BR = 32 cut q,k,v
# by 13% at 5 adapters and 25% in a mixed step with a 256-token prompt, and
# left 256 adapters level, while o (one slice) at 256 adapters was 15%
# slower with it.
SMALL_TILE_SHRINK = (16, 256)
# Programmatic dependent launch of the expand behind the shrink in ``lora``
# (the expand's prologue and B-page lookups overlap the shrink's tail): None
# = on Hopper and later, False = off (also ``VLLM_SLORA_PDL=0``, read at
# import: for telling a PDL race from other faults on a GPU).
PDL: bool | None = None if os.environ.get("VLLM_SLORA_PDL", "") != "0" else False


# ---------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------


@triton.jit
def _tile(p, token_lora_ptr, bounds_ptr, glora_ptr, NG,
          MODE: tl.constexpr, BM: tl.constexpr, NGB: tl.constexpr, LIST: tl.constexpr):  # fmt: skip
    """(adapter, first position, end position) of tile p; adapter -1: no work.

    Positions index the tokens (PER_TOKEN, SEGMENTS) or the group-ordered
    token list (ADAPTERS). LIST (ADAPTERS only): read the tile list.
    """
    if MODE == 0:
        lora = tl.load(token_lora_ptr + p)
        lo = p
        hi = p + 1
    elif LIST:
        entry = glora_ptr + 4 + p * 3  # after the groups to scan and 3 tile counts
        lora = tl.load(entry)
        lo = tl.load(entry + 1)
        hi = tl.load(entry + 2)
    else:
        # g = number of groups whose tiles all come before p; prev = how many
        # tiles those are. Groups' tile counts are cumulated NGB at a time.
        if MODE == 2:
            # Groups past the last adapter with tokens are empty: scan only
            # up to it (group_by_adapter stores that count after the lists).
            NG = tl.load(glora_ptr)
        g = 0
        prev = 0
        base = 0
        for c0 in range(0, NG, NGB):
            offs = c0 + tl.arange(0, NGB)
            m = offs < NG
            size = tl.load(bounds_ptr + offs + 1, mask=m, other=0) - tl.load(
                bounds_ptr + offs, mask=m, other=0
            )
            if MODE == 1:
                gl = tl.load(glora_ptr + offs, mask=m, other=-1)
                size = tl.where(gl >= 0, size, 0)
            tiles = (size + BM - 1) // BM
            cum = tl.cumsum(tiles, 0) + base
            before = cum <= p
            g += tl.sum(before.to(tl.int32), 0)
            prev = tl.maximum(prev, tl.max(tl.where(before, cum, 0), 0))
            base += tl.sum(tiles, 0)
        ok = g < NG
        lo = tl.load(bounds_ptr + g, mask=ok, other=0)
        hi = tl.load(bounds_ptr + g + 1, mask=ok, other=0)
        if MODE == 1:
            lora = tl.load(glora_ptr + g, mask=ok, other=-1)
        else:
            lora = tl.where(ok, g, -1)
        lo = lo + (p - prev) * BM
    return lora, lo, hi


@triton.jit
def _tile_tokens(lo, hi, idx_ptr, MODE: tl.constexpr, BM: tl.constexpr):
    """Token rows of a tile (int64) and their mask."""
    pos = lo + tl.arange(0, BM)
    mask = pos < hi
    if MODE == 2:
        tok = tl.load(idx_ptr + pos, mask=mask, other=0)
    else:
        tok = pos
    return tok.to(tl.int64), mask


@triton.jit
def _num_tiles(glora_ptr, TILES, MODE: tl.constexpr, BM: tl.constexpr):
    """Tiles with work: ADAPTERS mode reads group_by_adapter's count for BM
    (stored after the groups to scan); otherwise TILES (the grid's bound)."""
    if MODE == 2:
        if BM == 16:
            n = tl.load(glora_ptr + 1)
        elif BM == 32:
            n = tl.load(glora_ptr + 2)
        else:
            n = tl.load(glora_ptr + 3)
    else:
        n = TILES
    return n


@triton.jit
def _if_any_rank(n_items, lora_rank_ptr, L, RANK_LB: tl.constexpr):
    """n_items, or 0 when no adapter slot has a rank on this module (RANK_LB
    >= L: one vector load; 0: no check). The engine calls every LoRA'd
    module of every layer, also those no adapter of the step targets."""
    if RANK_LB > 0:
        offs = tl.arange(0, RANK_LB)
        ranks = tl.load(lora_rank_ptr + offs, mask=offs < L, other=0)
        n_items = tl.where(tl.max(ranks, 0) > 0, n_items, 0)
    return n_items


@triton.jit
def _mma(a, b, acc, DOT_F32: tl.constexpr):
    # DOT_F32: fp32 operands (fp32 pools, and the CPU interpreter, whose
    # tl.dot is wrong for bf16); otherwise fp16/bf16 tensor cores.
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit(do_not_specialize=["NG", "TILES", "K", "R_MAX", "K_SPLIT", "NUM_R", "SPLIT", "NUM_S",
                               "L"])
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
    SPLIT,
    NUM_S,
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
    NGB: tl.constexpr,
    LIST: tl.constexpr,  # ADAPTERS: tiles from group_by_adapter's tile list
    RANK_LB: tl.constexpr,  # power of two >= L, or 0: skip the any-rank check
    DOT_F32: tl.constexpr,
    PDL: tl.constexpr,  # let the expand (launched with PDL) start its prologue now
):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    # Rank blocks, then splits, then slices vary fastest: the items that
    # read one x tile run together and find it in L2.
    per_tile = NUM_R * SPLIT * NUM_S
    n_items = _num_tiles(glora_ptr, TILES, MODE, BM) * per_tile
    n_items = _if_any_rank(n_items, lora_rank_ptr, L, RANK_LB)
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
        p = item // per_tile
        q = item % per_tile
        rb = q % NUM_R
        c = (q // NUM_R) % SPLIT
        s = q // (NUM_R * SPLIT)
        lora, lo, hi = _tile(p, token_lora_ptr, bounds_ptr, glora_ptr, NG, MODE, BM, NGB, LIST)
        # rank and start side by side (both need only the adapter): one
        # dependent load fewer before the pages.
        rank = tl.load(lora_rank_ptr + tl.maximum(lora, 0))
        start = tl.load(lora_start_ptr + tl.maximum(lora, 0))
        rank = tl.where(lora >= 0, tl.minimum(rank, R_MAX), 0)
        if rb * BR < rank:
            _shrink_item(x_ptr, pool_ptr, out_ptr, rows0_ptr, rows1_ptr, rows2_ptr, start,
                         idx_ptr, lora, lo, hi, rank, rb, c, s, K, K_SPLIT, x_stride, pool_stride,
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
    tok, mask_m = _tile_tokens(lo, hi, idx_ptr, MODE, BM)

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
        mask=mask_r[:, None] & (pg0 + offs_pg < K // D)[None, :],
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
        acc = _mma(xt, tl.trans(a), acc, DOT_F32)
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


@triton.jit
def _load_v(v_rows, offs_r, mask_m, R_MAX, v_stride_c, V_SPLIT: tl.constexpr):
    """v[tile rows, offs_r] (fp32), split-K partials summed in a fixed order.

    Entries past R_MAX are not loaded; entries past the adapter's rank are
    loaded (whole rows, vectorised) and must be zeroed by the caller.
    """
    mask_v = mask_m[:, None] & (offs_r < R_MAX)[None, :]
    vt = tl.load(v_rows + offs_r[None, :], mask=mask_v, other=0.0)
    for c in tl.static_range(1, V_SPLIT):
        vt += tl.load(v_rows + c * v_stride_c + offs_r[None, :], mask=mask_v, other=0.0)
    return vt


@triton.jit
def _expand_columns(v_rows, pool_ptr, y_ptr, rows_ptr, tok, mask_m, start, rank, scale, col,
                    width, y_col, R_MAX, v_stride_c, rows_stride, pool_stride, y_stride,
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
    vt = _load_v(v_rows, offs_r, mask_m, R_MAX, v_stride_c, V_SPLIT)
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
        acc = _mma(vt, b, tl.zeros((BM, BN), dtype=tl.float32), DOT_F32)
        y = (y.to(tl.float32) + acc * scale).to(y_ptr.dtype.element_ty)
        tl.store(y_tile, y, mask=mask_m[:, None] & live)


@triton.jit(do_not_specialize=["NG", "TILES", "L", "n0", "n1", "n2", "NUM_N", "NUM_S"])
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
    NGB: tl.constexpr,
    V_SPLIT: tl.constexpr,
    NBP: tl.constexpr,  # column blocks per program (> 1: rank <= BR, one rank step)
    LIST: tl.constexpr,
    RANK_LB: tl.constexpr,
    DOT_F32: tl.constexpr,
    PDL: tl.constexpr,  # launched with PDL behind the shrink: wait before reading v
):
    per_tile = NUM_N * NUM_S
    n_items = _num_tiles(glora_ptr, TILES, MODE, BM) * per_tile
    n_items = _if_any_rank(n_items, lora_rank_ptr, L, RANK_LB)
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
        p = item // per_tile
        q = item % per_tile
        nb = q % NUM_N
        s = q // NUM_N
        width = tl.where(s == 0, n0, tl.where(s == 1, n1, n2))
        col = nb * BN * NBP
        lora, lo, hi = _tile(p, token_lora_ptr, bounds_ptr, glora_ptr, NG, MODE, BM, NGB, LIST)
        rank = tl.load(lora_rank_ptr + tl.maximum(lora, 0))
        start = tl.load(lora_start_ptr + tl.maximum(lora, 0))
        scale = tl.load(lora_scale_ptr + tl.maximum(lora, 0))
        rank = tl.where((lora >= 0) & (col < width), tl.minimum(rank, R_MAX), 0)
        if rank > 0:
            _expand_item(v_ptr, pool_ptr, y_ptr, rows0_ptr, rows1_ptr, rows2_ptr, start,
                         scale, idx_ptr, lora, lo, hi, rank, s, col, width, n0, n1, R_MAX,
                         v_stride_c, v_stride_s, v_stride_t, pool_stride, y_stride, MODE, D, BM, BR,
                         BN, V_SPLIT, NBP, DOT_F32, PDL)  # fmt: skip
    if PDL:
        # A program that read no v still ends after the shrink: what runs
        # after this kernel in the stream may rely on the shrink's writes.
        tl.extra.cuda.gdc_wait()


@triton.jit
def _expand_item(v_ptr, pool_ptr, y_ptr, rows0_ptr, rows1_ptr, rows2_ptr, start,
                 scale, idx_ptr, lora, lo, hi, rank, s, col, width, n0, n1, R_MAX,
                 v_stride_c, v_stride_s, v_stride_t, pool_stride, y_stride, MODE: tl.constexpr,
                 D: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
                 V_SPLIT: tl.constexpr, NBP: tl.constexpr, DOT_F32: tl.constexpr,
                 PDL: tl.constexpr):  # fmt: skip
    """One work item: column block(s) col of slice s of one tile."""
    rows_ptr = pick(s, rows0_ptr, rows1_ptr, rows2_ptr)
    # Slice s starts after slices 0..s-1 in y; table s has width // D columns.
    y_col = tl.multiple_of(tl.where(s == 0, 0, tl.where(s == 1, n0, n0 + n1)), D)
    rows_stride = width // D
    tok, mask_m = _tile_tokens(lo, hi, idx_ptr, MODE, BM)
    v_rows = v_ptr + s * v_stride_s + tok[:, None] * v_stride_t
    if NBP > 1:
        _expand_columns(v_rows, pool_ptr, y_ptr, rows_ptr, tok, mask_m, start, rank, scale,
                        col, width, y_col, R_MAX, v_stride_c, rows_stride, pool_stride, y_stride,
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
            vt = _load_v(v_rows, offs_r, mask_m, R_MAX, v_stride_c, V_SPLIT)
            vt = tl.where(mask_r[None, :], vt, 0.0)
            acc = _mma(vt.to(b.dtype), b, acc, DOT_F32)
        y = (y.to(tl.float32) + acc * scale).to(y_ptr.dtype.element_ty)
        tl.store(y_tile, y, mask=mask_m[:, None])


@triton.jit(do_not_specialize=["T", "L"])
def _group_by_adapter_kernel(
    token_lora_ptr,  # int32 [T]
    meta_ptr,  # int32 [meta_size(T, L)]
    T,
    L,
    LB: tl.constexpr,
    CH: tl.constexpr,
    ONE_CHUNK: tl.constexpr,  # T <= CH: keep each token's slot in registers
    TBM: tl.constexpr,  # tile size of the tile list (adapter_tile_bm)
):
    """One program: counting sort of the tokens by adapter. A token's slot
    within its adapter comes from an atomic counter, so the order within an
    adapter is arbitrary; every output row is computed independently of the
    other rows of its tile, so results do not depend on it."""
    bounds = meta_ptr
    idx = meta_ptr + L + 1
    cnt = idx + T  # scratch: tokens per adapter
    rnk = cnt + L  # scratch: each token's slot within its adapter
    offs_l = tl.arange(0, LB)
    mask_l = offs_l < L
    tl.store(cnt + offs_l, tl.zeros([LB], dtype=tl.int32), mask=mask_l)
    tl.debug_barrier()
    if ONE_CHUNK:
        offs = tl.arange(0, CH)
        lora = tl.load(token_lora_ptr + offs, mask=offs < T, other=-1)
        ok = (lora >= 0) & (lora < L)
        one = tl.full([CH], 1, dtype=tl.int32)
        r = tl.atomic_add(cnt + tl.where(ok, lora, 0), one, mask=ok, sem="relaxed")
        tl.debug_barrier()
        counts = tl.load(cnt + offs_l, mask=mask_l, other=0, cache_modifier=".cg")
        ends = tl.cumsum(counts, 0)
        tl.store(bounds + offs_l, ends - counts, mask=mask_l)
        tl.store(bounds + L, tl.sum(counts, 0))
        tl.debug_barrier()
        first = tl.load(bounds + tl.where(ok, lora, 0), mask=ok, other=0, cache_modifier=".cg")
        tl.store(idx + first + r, offs, mask=ok)
        tl.store(rnk + T, tl.max(tl.where(ok, lora + 1, 0), 0))
        _store_tile_counts(rnk + T + 1, counts)
        _store_tile_list(rnk + T + 4, counts, ends, offs_l, mask_l, TBM)
    else:
        used = 0
        for t0 in range(0, T, CH):
            offs = t0 + tl.arange(0, CH)
            lora = tl.load(token_lora_ptr + offs, mask=offs < T, other=-1)
            ok = (lora >= 0) & (lora < L)
            one = tl.full([CH], 1, dtype=tl.int32)
            r = tl.atomic_add(cnt + tl.where(ok, lora, 0), one, mask=ok, sem="relaxed")
            tl.store(rnk + offs, r, mask=ok)
            used = tl.maximum(used, tl.max(tl.where(ok, lora + 1, 0), 0))
        tl.store(rnk + T, used)
        tl.debug_barrier()
        counts = tl.load(cnt + offs_l, mask=mask_l, other=0, cache_modifier=".cg")
        ends = tl.cumsum(counts, 0)
        tl.store(bounds + offs_l, ends - counts, mask=mask_l)
        tl.store(bounds + L, tl.sum(counts, 0))
        _store_tile_counts(rnk + T + 1, counts)
        _store_tile_list(rnk + T + 4, counts, ends, offs_l, mask_l, TBM)
        tl.debug_barrier()
        for t0 in range(0, T, CH):
            offs = t0 + tl.arange(0, CH)
            lora = tl.load(token_lora_ptr + offs, mask=offs < T, other=-1)
            ok = (lora >= 0) & (lora < L)
            r = tl.load(rnk + offs, mask=ok, other=0, cache_modifier=".cg")
            first = tl.load(bounds + tl.where(ok, lora, 0), mask=ok, other=0, cache_modifier=".cg")
            tl.store(idx + first + r, offs, mask=ok)


@triton.jit
def _store_tile_counts(ptr, counts):
    """Tiles of BM = 16, 32, 64 tokens the groups of ``counts`` make (TILE_BMS)."""
    tl.store(ptr, tl.sum((counts + 15) // 16, 0))
    tl.store(ptr + 1, tl.sum((counts + 31) // 32, 0))
    tl.store(ptr + 2, tl.sum((counts + 63) // 64, 0))


@triton.jit
def _store_tile_list(ptr, counts, ends, offs_l, mask_l, BM: tl.constexpr):
    """(adapter, first, end position) of every tile of BM tokens, adapter by
    adapter: the tiles of adapter l follow those of adapters < l."""
    tiles = (counts + BM - 1) // BM
    first = tl.cumsum(tiles, 0) - tiles
    lo0 = ends - counts
    for j in range(0, tl.max(tiles, 0)):
        m = mask_l & (j < tiles)
        entry = ptr + (first + j) * 3
        lo = lo0 + j * BM
        tl.store(entry, offs_l, mask=m)
        tl.store(entry + 1, lo, mask=m)
        tl.store(entry + 2, tl.minimum(lo + BM, ends), mask=m)


# ---------------------------------------------------------------------------
# Host side: plans and launches
# ---------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int | None) -> int:
    if device_index is None or not torch.cuda.is_available():
        # The CPU interpreter: a small GPU, so that interpreted grids stay
        # small while still exercising split-K.
        return 8
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@dataclass(frozen=True)
class Groups:
    """How tokens are grouped for one call (see the module docstring)."""

    mode: int
    ng: int  # number of groups (T for PER_TOKEN)
    bounds: torch.Tensor  # the three pointers the kernels take
    glora: torch.Tensor
    idx: torch.Tensor


@dataclass(frozen=True)
class Plan:
    bm: int
    tiles: int  # programs on the tile axis
    # shrink
    br_s: int
    bk: int
    split: int
    k_split: int
    npg: int  # power of two >= pages per split
    warps_s: int
    stages_s: int
    # expand
    bn: int
    br_e: int
    warps_e: int
    stages_e: int
    nbp: int = 1  # column blocks per expand program


def adapter_tile_bm(t: int, num_loras: int) -> int:
    """Tile size of ADAPTERS mode for a batch shape: from the average tokens
    per group, as if all num_loras groups were used (shapes only)."""
    avg = t / max(1, min(num_loras, t))
    return 64 if avg >= 48 else (32 if avg >= 24 else 16)


def max_tiles(t: int, num_loras: int, bm: int) -> int:
    """Tiles of bm tokens that t tokens in at most num_loras groups can make."""
    return triton.cdiv(t, bm) + min(num_loras, t)


def meta_size(t: int, num_loras: int) -> int:
    """int32 entries of ``group_by_adapter``'s result for t tokens. Never
    smaller for more tokens (a static buffer for the most tokens holds every
    smaller batch's): the tile list is sized for the smallest BM, whatever
    BM the batch gets."""
    info = 1 + len(TILE_BMS)  # groups to scan, tile counts
    return 2 * num_loras + 2 * t + 1 + info + 3 * max_tiles(t, num_loras, min(TILE_BMS))


def meta_info(meta: torch.Tensor, t: int, num_loras: int) -> torch.Tensor:
    """The view of meta from its groups-to-scan entry: [groups to scan, tiles
    of BM = 16, 32, 64, tile list (adapter, first, end) x max_tiles]."""
    return meta[2 * num_loras + 2 * t + 1:]


def meta_chunk(t: int) -> int:
    """Tokens ``_group_by_adapter_kernel`` reads per chunk (CH) for a batch of t;
    with t <= CH the whole batch is one chunk (ONE_CHUNK)."""
    return max(16, min(_pow2(t), 2048))


def group_by_adapter(token_lora: torch.Tensor, num_loras: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Tokens listed by adapter, on device, one launch, no host sync.

    Returns int32 meta [meta_size(T, L)]: meta[:L+1] are the bounds
    (adapter l owns positions bounds[l]..bounds[l+1]-1), meta[L+1:L+1+T] the
    token index at each position; then (``meta_info``) one past the last
    adapter that has tokens (the groups the kernels scan), the tiles of BM
    = 16, 32 and 64 tokens the groups make (the kernels' work), and the tile
    list for BM = ``adapter_tile_bm(T, L)``; the rest is scratch. Tokens
    with adapter -1 (or >= num_loras) are in no group. Build it once per
    batch and pass it as ``meta`` to every layer's call to skip this launch
    there. ``out``: a buffer of ``meta_size(T, L)`` int32 to fill instead of
    a new tensor (static per-step buffers, CUDA graphs).
    """
    t = token_lora.shape[0]
    size = meta_size(t, num_loras)
    if out is None:
        meta = torch.empty(size, dtype=torch.int32, device=token_lora.device)
    elif out.dtype != torch.int32 or out.shape != (size,):
        raise ValueError(f"meta buffer must be int32 [{size}], got {out.dtype} {tuple(out.shape)}")
    else:
        meta = out
    info = meta_info(meta, t, num_loras)
    if t == 0:
        meta[: num_loras + 1].zero_()
        info[:4] = 0
        return meta
    if not token_lora.is_cuda and not interpreter_active():
        # CPU without the interpreter: the same result with torch (host sync).
        ok = (token_lora >= 0) & (token_lora < num_loras)
        key = torch.where(ok, token_lora, num_loras).long()
        order = torch.sort(key, stable=True).indices
        counts = torch.bincount(key, minlength=num_loras + 1)[:num_loras]
        meta[0] = 0
        meta[1 : num_loras + 1] = counts.cumsum(0)
        meta[num_loras + 1 : num_loras + 1 + t] = order.int()
        info[0] = int(torch.where(ok, token_lora + 1, 0).max())
        for i, bm in enumerate(TILE_BMS):
            info[1 + i] = int(((counts + bm - 1) // bm).sum())
        bm = adapter_tile_bm(t, num_loras)
        ends = counts.cumsum(0)
        entries = [(lora, lo, min(lo + bm, int(ends[lora])))
                   for lora in range(num_loras)
                   for lo in range(int(ends[lora] - counts[lora]), int(ends[lora]), bm)]
        if entries:
            info[4:4 + 3 * len(entries)] = torch.tensor(entries, dtype=torch.int32).view(-1)
        return meta
    lb = max(16, _pow2(num_loras))
    ch = meta_chunk(t)
    _group_by_adapter_kernel[(1,)](
        token_lora, meta, t, num_loras, LB=lb, CH=ch, ONE_CHUNK=t <= ch,
        TBM=adapter_tile_bm(t, num_loras), num_warps=4,
    )  # fmt: skip
    return meta


def make_groups(
    token_lora: torch.Tensor,
    num_loras: int,
    segments: tuple[torch.Tensor, torch.Tensor] | None,
    meta: torch.Tensor | None,
    build_meta: bool = True,
) -> Groups:
    """Pick the grouping from shapes (never from values): see module docstring.

    build_meta=False leaves the per-adapter lists unbuilt (for planning only).
    """
    t = token_lora.shape[0]
    if segments is not None:
        seg_start, seg_lora = segments
        if seg_start.dtype != torch.int32 or seg_lora.dtype != torch.int32:
            raise ValueError("segments (seg_start, seg_lora) must be int32 tensors")
        nseg = seg_lora.shape[0]
        if seg_start.shape[0] != nseg + 1:
            raise ValueError(f"seg_start has {seg_start.shape[0]} entries, need {nseg + 1}")
        return Groups(SEGMENTS, nseg, seg_start, seg_lora, seg_start)
    if t <= PER_TOKEN_MAX_T:  # with or without the caller's meta
        return Groups(PER_TOKEN, t, token_lora, token_lora, token_lora)
    if meta is None:
        if not build_meta:
            return Groups(ADAPTERS, num_loras, token_lora, token_lora, token_lora)
        meta = group_by_adapter(token_lora, num_loras)
    size = meta_size(t, num_loras)
    if meta.dtype != torch.int32 or meta.numel() != size:
        raise ValueError("meta must come from group_by_adapter(token_lora, num_loras)")
    return Groups(ADAPTERS, num_loras, meta, meta_info(meta, t, num_loras), meta[num_loras + 1 :])


def plan(groups: Groups, t: int, k: int, n_max: int, s: int, r_max: int, d: int,
         device: torch.device, dtype: torch.dtype = torch.float16) -> Plan:  # fmt: skip
    """Tile sizes and split-K from shapes only (CUDA-graph safe)."""
    index = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    knobs = (PROGRAMS_PER_SM, MAX_SPLIT, SHRINK_STAGES, EXPAND_BN, EXPAND_MAX_NBP,
             EXPAND_PROGRAMS_PER_SM, EXPAND_STAGES, SMALL_TILE_WARPS, BIG_TILE_PROGRAMS_PER_SM,
             SMALL_TILE_SHRINK, FEW_GROUPS)
    return _plan(groups.mode, groups.ng, t, k, n_max, s, r_max, d, index, dtype, knobs)


@functools.lru_cache(maxsize=4096)
def _plan(mode, ng, t, k, n_max, s, r_max, d, device_index, dtype, knobs):
    (programs_per_sm, max_split, shrink_stages, expand_bn, max_nbp, expand_pps, expand_stages,
     small_warps, big_pps, small_shrink, few_groups) = knobs
    if mode == PER_TOKEN:
        bm, est_tiles = 16, t
    else:
        # Tile size: average tokens per non-empty group, assuming all
        # groups are used; work: tiles as if FEW_GROUPS groups were.
        bm = adapter_tile_bm(t, ng)  # SEGMENTS: ng segments, the same rule
        ng = max(1, min(ng, t))
        if mode == ADAPTERS:
            est_tiles = triton.cdiv(t, bm) + min(ng, few_groups)
        else:
            est_tiles = max(ng, triton.cdiv(t, bm))
    tiles = t if mode == PER_TOKEN else min(t, triton.cdiv(t, bm) + ng)
    r_pow2 = max(16, _pow2(r_max))
    # Shrink: [BM, BK] x [BK, BR] steps. Small tiles stream A in full pages.
    if bm == 16:
        br_s = min(small_shrink[0] * (2 if s > 1 else 1), r_pow2)
        bk = min(d, small_shrink[1])
        warps_s, stages_s = small_warps[0], shrink_stages
    else:
        br_s, bk, warps_s, stages_s = min(64, r_pow2), min(d, 128), 4, 3
    if dtype == torch.float32:  # fp32 pools (tests): FMA dots, keep tiles small
        br_s, bk = 16, min(d, 64)
    num_r = triton.cdiv(r_max, br_s)
    est = est_tiles * num_r * s
    per_sm = programs_per_sm if bm == 16 else big_pps
    want = per_sm * _num_sms(device_index)
    # Split K in whole pages: nearest power of two (in log scale) of
    # want / est, keeping >= 2 K steps per split where K allows.
    pages = k // d
    split = 1
    if est < want:
        split = 1 << round(math.log2(want / est))
        min_pages = 1 if pages * (d // bk) < 4 else max(1, 2 * bk // d)
        split = max(1, min(split, max_split, pages // min_pages))
    pages_per_split = triton.cdiv(pages, split)
    split = triton.cdiv(pages, pages_per_split)
    k_split = pages_per_split * d
    # Expand: [BM, BR] x [BR, BN]; one rank step covers ranks up to 64.
    bn = min(d, expand_bn)
    br_e = min(64, r_pow2)
    warps_e = 8 if bm >= 32 else small_warps[1]
    if dtype == torch.float32:
        bn, br_e = min(d, 64), 16
    # Several column blocks per program when one rank step covers every
    # adapter: v and the page lookups are loaded once, B tiles stream.
    nbp, stages_e = 1, 2
    if r_max <= br_e:
        programs = est_tiles * triton.cdiv(n_max, bn) * s
        want_e = expand_pps * _num_sms(device_index)
        while nbp < max_nbp and programs >= 2 * nbp * want_e:
            nbp *= 2
        if nbp * bn < d:  # a program's columns must be whole pages
            nbp = 1
        if nbp > 1:
            stages_e = expand_stages
    return Plan(bm, tiles, br_s, bk, split, k_split, _pow2(pages_per_split), warps_s, stages_s,
                bn, br_e, warps_e, stages_e, nbp)


def _dot_f32(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 or not x.is_cuda


def resident(items: int, device: torch.device) -> int:
    """Programs of a persistent grid for at most ``items`` work items."""
    index = device.index if device.type == "cuda" else None
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return min(items, RESIDENT_PROGRAMS_PER_SM * _num_sms(index))


def launch_shrink(x, pool, tables, lora_start, lora_rank, token_lora, out, groups: Groups,
                  pl: Plan, pdl: bool = False, record=None) -> None:  # fmt: skip
    """Run the shrink kernel into ``out``: [S, T, R_MAX] when pl.split == 1,
    else partials [split, S, T, R_MAX]."""
    d = pool.shape[1]
    t, k = x.shape
    s, r_max = len(tables), out.shape[-1]
    padded = slice_tables(tables)
    num_r = triton.cdiv(r_max, pl.br_s)
    grid = (resident(pl.tiles * num_r * pl.split * s, x.device),)
    if grid[0] == 0:
        return
    stride_c = out.stride(0) if pl.split > 1 else 0
    o_s, o_t = out.stride(-3), out.stride(-2)
    _run(_shrink_kernel, grid, (
        x, pool, out, *padded, lora_start, lora_rank, token_lora,
        groups.bounds, groups.glora, groups.idx,
        groups.ng, pl.tiles, lora_rank.shape[0], k, r_max, pl.k_split, num_r, pl.split, s,
        x.stride(0), pool.stride(0), padded[0].stride(0), stride_c, o_s, o_t,
    ), dict(
        MODE=groups.mode, D=d, BM=pl.bm, BR=pl.br_s, BK=pl.bk, NPG=pl.npg, NGB=NGB,
        LIST=_tile_list(groups), RANK_LB=_rank_lb(lora_rank),
        DOT_F32=_dot_f32(x), PDL=pdl, num_warps=pl.warps_s, num_stages=pl.stages_s,
    ), record)  # fmt: skip


def _run(fn, grid, args: tuple, kwargs: dict, record=None) -> None:
    """``fn[grid](*args, **kwargs)``, or through ``record`` (a
    ``replay.Recorder``), which also keeps the launch for replays."""
    if record is None:
        fn[grid](*args, **kwargs)
    else:
        record.launch(fn, grid, args, kwargs)


def _rank_lb(lora_rank: torch.Tensor) -> int:
    """RANK_LB: the any-rank check's vector width (0 = no check)."""
    n = lora_rank.shape[0]
    return _pow2(n) if ANY_RANK_CHECK and 0 < n <= 4096 else 0


def _tile_list(groups: Groups) -> bool:
    return TILE_LIST and groups.mode == ADAPTERS


def launch_reduce(ws, out, token_lora, lora_rank, record=None) -> None:
    split, s, t, r_max = ws.shape
    bt = 8
    _run(_reduce_kernel, (triton.cdiv(t, bt), s), (
        ws, out, token_lora, lora_rank, t, r_max, split,
        ws.stride(0), ws.stride(1), ws.stride(2), out.stride(0), out.stride(1),
    ), dict(BT=bt, BRM=max(16, _pow2(r_max)), num_warps=2), record)  # fmt: skip


def launch_expand(v, pool, tables, lora_start, lora_rank, lora_scale, token_lora, y,
                  groups: Groups, pl: Plan, v_split: int = 1, pdl: bool = False,
                  record=None) -> None:  # fmt: skip
    """Run the expand kernel; v is [S, T, R_MAX] or partials [v_split, S, T, R_MAX].

    pdl: launch with programmatic dependent launch; only right behind the
    shrink (or reduce) that writes v, whose other inputs were complete before
    that kernel started.
    """
    d = pool.shape[1]
    s, r_max = len(tables), v.shape[-1]
    padded = slice_tables(tables)
    widths = [tb.shape[1] * d for tb in tables] + [0] * (MAX_SLICES - s)
    num_n = triton.cdiv(triton.cdiv(max(widths), pl.bn), pl.nbp)
    grid = (resident(pl.tiles * num_n * s, y.device),)
    if grid[0] == 0:
        return
    stride_c = v.stride(0) if v_split > 1 else 0
    _run(_expand_kernel, grid, (
        v, pool, y, *padded, lora_start, lora_rank, lora_scale, token_lora,
        groups.bounds, groups.glora, groups.idx,
        groups.ng, pl.tiles, lora_rank.shape[0], *widths, r_max, num_n, s,
        stride_c, v.stride(-3), v.stride(-2), pool.stride(0), y.stride(0),
    ), dict(
        MODE=groups.mode, D=d, BM=pl.bm, BR=pl.br_e, BN=pl.bn, NGB=NGB, LIST=_tile_list(groups),
        RANK_LB=_rank_lb(lora_rank),
        V_SPLIT=v_split, NBP=pl.nbp, DOT_F32=_dot_f32(y), PDL=pdl, num_warps=pl.warps_e,
        num_stages=pl.stages_e, launch_pdl=pdl,
    ), record)  # fmt: skip


def _check_tables(tables: Sequence[torch.Tensor]) -> None:
    slice_tables(tables)


def _widths(tables, d: int) -> list[int]:
    return [tb.shape[1] * d for tb in tables]


def shrink(x, pool, tables, lora_start, lora_rank, token_lora, out, segments=None,
           meta=None) -> None:  # fmt: skip
    """out[s, i, :rank] = x[i] @ A_{l,s}^T (out: fp32 [S, T, R_MAX])."""
    d = check_pool(x, pool)
    _check_tables(tables)
    t, k = x.shape
    s, r_max = len(tables), out.shape[-1]
    if t == 0 or lora_start.shape[0] == 0:  # nothing to add (the kernels read slot 0 of L)
        return
    assert x.stride(1) == 1 and out.stride(2) == 1 and k % d == 0
    groups = make_groups(token_lora, lora_start.shape[0], segments, meta)
    pl = plan(groups, t, k, max(_widths(tables, d)), s, r_max, d, x.device, x.dtype)
    if pl.split == 1:
        launch_shrink(x, pool, tables, lora_start, lora_rank, token_lora, out, groups, pl)
        return
    ws = torch.empty((pl.split, s, t, r_max), dtype=torch.float32, device=x.device)
    launch_shrink(x, pool, tables, lora_start, lora_rank, token_lora, ws, groups, pl)
    launch_reduce(ws, out, token_lora, lora_rank)


def expand(v, pool, tables, lora_start, lora_rank, lora_scale, token_lora, y, segments=None,
           meta=None) -> None:  # fmt: skip
    """y[i, slice s] += scale * v[s, i, :rank] @ B_{l,s}^T (v: fp32 [S, T, R_MAX])."""
    d = check_pool(y, pool)
    _check_tables(tables)
    t = y.shape[0]
    s, r_max = len(tables), v.shape[-1]
    assert sum(_widths(tables, d)) == y.shape[1], "y width != sum of slice widths"
    if t == 0 or lora_start.shape[0] == 0:  # nothing to add (the kernels read slot 0 of L)
        return
    assert y.stride(1) == 1 and v.stride(2) == 1
    groups = make_groups(token_lora, lora_start.shape[0], segments, meta)
    pl = plan(groups, t, d, max(_widths(tables, d)), s, r_max, d, y.device, y.dtype)
    launch_expand(v, pool, tables, lora_start, lora_rank, lora_scale, token_lora, y, groups, pl)


def fuse_partials(groups: Groups, pl: Plan, r_max: int) -> bool:
    """Whether ``lora`` lets the expand sum the shrink's split-K partials
    (small per tile) instead of launching ``_reduce_kernel``."""
    rows = 1 if groups.mode == PER_TOKEN else pl.bm
    return pl.split > 1 and pl.split * rows * r_max * 4 <= FUSED_PARTIALS_BYTES


def describe(groups: Groups, pl: Plan, r_max: int) -> str:
    """Short plan tag for benchmarks: mode, BM, split-K and how it is summed."""
    tag = "TSA"[groups.mode] + str(pl.bm)
    if pl.split > 1:
        tag += f"k{pl.split}" + ("f" if fuse_partials(groups, pl, r_max) else "r")
    if pl.nbp > 1:
        tag += f"n{pl.nbp}"
    return tag


def lora(x, y, pool, a_tables, b_tables, lora_start, lora_rank, lora_scale, token_lora,
         max_rank: int, segments=None, meta=None, record=None) -> None:  # fmt: skip
    """y += scale * x @ A^T @ B^T: grouping and plan once, split-K partials
    summed by the expand where they are small. ``record``: a
    ``replay.Recorder`` that keeps the launches (and their workspaces) for
    replays with another layer's x, pool and y."""
    keep = record.keep if record is not None else (lambda t: t)
    d = check_pool(x, pool)
    check_pool(y, pool)
    _check_tables(a_tables)
    _check_tables(b_tables)
    t, k = x.shape
    s = len(a_tables)
    if len(b_tables) != s:
        raise ValueError("a_rows and b_rows have different numbers of slices")
    assert sum(_widths(b_tables, d)) == y.shape[1], "y width != sum of slice widths"
    if t == 0 or lora_start.shape[0] == 0:  # nothing to add (the kernels read slot 0 of L)
        return
    assert x.stride(1) == 1 and y.stride(1) == 1 and k % d == 0
    r_max = max(int(max_rank), 1)
    groups = make_groups(token_lora, lora_start.shape[0], segments, meta)
    pl = plan(groups, t, k, max(_widths(b_tables, d)), s, r_max, d, x.device, x.dtype)
    dev = x.device
    # The expand may start (PDL) while the shrink runs when it comes right
    # behind it; behind a reduce launch it would only wait.
    pdl = use_pdl(dev) and (pl.split == 1 or fuse_partials(groups, pl, r_max))
    if pl.split == 1:
        v = keep(torch.empty((s, t, r_max), dtype=torch.float32, device=dev))
        launch_shrink(x, pool, a_tables, lora_start, lora_rank, token_lora, v, groups, pl, pdl,
                      record)
        v_split = 1
    else:
        ws = keep(torch.empty((pl.split, s, t, r_max), dtype=torch.float32, device=dev))
        launch_shrink(x, pool, a_tables, lora_start, lora_rank, token_lora, ws, groups, pl, pdl,
                      record)
        if fuse_partials(groups, pl, r_max):
            v, v_split = ws, pl.split
        else:
            v = keep(torch.empty((s, t, r_max), dtype=torch.float32, device=dev))
            launch_reduce(ws, v, token_lora, lora_rank, record)
            v_split = 1
    launch_expand(
        v, pool, b_tables, lora_start, lora_rank, lora_scale, token_lora, y, groups, pl, v_split,
        pdl, record,
    )


def knob_state() -> tuple:
    """The module settings a recorded launch depends on (a replay's cache key)."""
    return (PROGRAMS_PER_SM, MAX_SPLIT, SHRINK_STAGES, EXPAND_BN, EXPAND_MAX_NBP,
            EXPAND_PROGRAMS_PER_SM, EXPAND_STAGES, SMALL_TILE_WARPS, BIG_TILE_PROGRAMS_PER_SM,
            SMALL_TILE_SHRINK, FEW_GROUPS, FUSED_PARTIALS_BYTES, RESIDENT_PROGRAMS_PER_SM,
            TILE_LIST, ANY_RANK_CHECK, PDL)


def use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper and later, unless PDL is False."""
    if PDL is not None:
        return bool(PDL) and device.type == "cuda"
    return device.type == "cuda" and _capability(device.index) >= (9, 0)


@functools.lru_cache(maxsize=None)
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
