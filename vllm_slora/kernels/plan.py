"""Tile sizes, split-K and grids of the grouped kernels, from shapes only.

A plan depends on the batch's shape (tokens, groups, widths, slices, the
static R_MAX), never on its values, so one plan serves every step a CUDA
graph replays. Plans are cached per (``Shape``, ``knobs.snapshot()``).

Shrink split-K: with few tiles (small batches, few long segments) or a wide
K (``down``, K = 11008) the K loop is cut into ``split`` page-aligned
chunks, each a work item, writing fp32 partial sums to a workspace [split,
S, T, R_MAX]. Plans count tiles as if a step had at most
``knobs.FEW_GROUPS`` adapters (the steady state of few popular adapters):
many-adapter steps then split more than they need, which costs partial
sums, not idle programs. The partials are summed in a fixed order
(deterministic, no atomics, no zeroing): by the expand while it loads v
(when they are small, ``grouped.fuse_partials``) or by the reduce kernel.

Expand column streaming: when one rank step covers every adapter (max rank
<= the expand's rank block), an expand program takes several consecutive
column blocks instead of one, as long as the grid keeps
``knobs.EXPAND_PROGRAMS_PER_SM`` programs per SM: it loads v and the page
lookups once and streams the B and y tiles through the pipeline.

Persistent grids: at most ``knobs.RESIDENT_PROGRAMS_PER_SM`` programs per
SM (``resident``), each looping over work items from its id in steps of
the grid, so the grid depends on shapes only while the number of items
comes from the step (ADAPTERS mode: the tile count ``group_by_adapter``
stored; a step of 5 adapters in a graph captured for 256 slots runs its ~20
tiles' items and no empty program for the other ~236 possible tiles).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton

from vllm_slora.kernels import knobs
from vllm_slora.kernels.device import device_index, num_sms, pow2
from vllm_slora.kernels.grouping import ADAPTERS, PER_TOKEN, Groups, adapter_tile_bm


@dataclass(frozen=True)
class Shape:
    """What a plan depends on."""

    mode: int  # grouping.PER_TOKEN, SEGMENTS or ADAPTERS
    num_groups: int  # segments or adapter slots (tokens for PER_TOKEN)
    tokens: int
    k: int  # input width (the shrink's K)
    n_max: int  # widest output slice
    slices: int
    max_rank: int  # R_MAX of the v buffer
    page_width: int  # D
    device_index: int | None  # None: CPU (interpreter)
    dtype: torch.dtype


@dataclass(frozen=True)
class Plan:
    tile_tokens: int  # BM
    max_tiles: int  # tiles the grid is sized for
    # shrink: [BM, BK] x [BK, BR] steps, K cut into `split` chunks
    shrink_rank_block: int  # BR
    shrink_k_block: int  # BK (<= D)
    split: int
    split_width: int  # K elements per split (whole pages)
    split_pages_pow2: int  # NPG: power of two >= pages per split
    shrink_warps: int
    shrink_stages: int
    # expand: [BM, BR] x [BR, BN] steps
    expand_n_block: int  # BN (<= D)
    expand_rank_block: int  # BR
    expand_warps: int
    expand_stages: int
    expand_blocks_per_program: int = 1  # NBP: column blocks streamed per program
    shrink_maxnreg: int | None = None  # register cap (None: ptxas's choice)
    expand_maxnreg: int | None = None
    # The split rule's inputs, for the kernels' own choice (``device_split``):
    est_tiles: int = 0  # tiles the split was planned for
    split_want: int = 0  # sqrt2_want(programs wanted)

    def constants(self) -> tuple:
        """The compile-time part (one Triton variant per distinct value)."""
        return (self.tile_tokens, self.shrink_rank_block, self.shrink_k_block,
                self.split_pages_pow2, self.shrink_warps, self.shrink_stages,
                self.expand_n_block, self.expand_rank_block, self.expand_warps,
                self.expand_stages, self.expand_blocks_per_program, self.shrink_maxnreg,
                self.expand_maxnreg)


def shape_of(groups: Groups, tokens: int, k: int, n_max: int, slices: int, max_rank: int,
             page_width: int, device: torch.device, dtype: torch.dtype) -> Shape:
    return Shape(groups.mode, groups.num_groups, tokens, k, n_max, slices, max_rank, page_width,
                 device_index(device), dtype)


def plan(shape: Shape) -> Plan:
    """Tile sizes and split-K for ``shape`` under the knobs' current values."""
    return _plan(shape, knobs.snapshot())


@functools.lru_cache(maxsize=4096)
def _plan(sh: Shape, kn: knobs.Knobs) -> Plan:
    t, d = sh.tokens, sh.page_width
    if sh.mode == PER_TOKEN:
        bm, est_tiles = 16, t
        tiles = t
    else:
        # Tile size: average tokens per non-empty group, assuming all
        # groups are used; work: tiles as if FEW_GROUPS groups were.
        bm = adapter_tile_bm(t, sh.num_groups)  # SEGMENTS: segments, the same rule
        ng = max(1, min(sh.num_groups, t))
        if sh.mode == ADAPTERS:
            est_tiles = triton.cdiv(t, bm) + min(ng, kn.few_groups)
        else:
            est_tiles = max(ng, triton.cdiv(t, bm))
        tiles = min(t, triton.cdiv(t, bm) + ng)
    r_pow2 = max(16, pow2(sh.max_rank))
    # Shrink: [BM, BK] x [BK, BR] steps. Small tiles stream A in full pages.
    if bm == 16:
        br_s = min(kn.small_tile_shrink[0] * (2 if sh.slices > 1 else 1), r_pow2)
        bk = min(d, kn.small_tile_shrink[1])
        warps_s, stages_s = kn.small_tile_warps[0], kn.shrink_stages
    else:
        br_s, bk, warps_s, stages_s = min(64, r_pow2), min(d, 128), 4, 3
    if sh.dtype == torch.float32:  # fp32 pools (tests): FMA dots, keep tiles small
        br_s, bk = 16, min(d, 64)
    num_r = triton.cdiv(sh.max_rank, br_s)
    est = est_tiles * num_r * sh.slices
    per_sm = kn.programs_per_sm if bm == 16 else kn.big_tile_programs_per_sm
    want = per_sm * num_sms(sh.device_index)
    # Split K in whole pages: nearest power of two (in log scale) of
    # want / est, keeping >= 2 K steps per split where K allows.
    pages = sh.k // d
    min_pages = 1 if pages * (d // bk) < 4 else max(1, 2 * bk // d)
    split_cap = max(1, min(kn.max_split, pages // min_pages))
    want2 = sqrt2_want(want)
    split = min(pow2_split(est, want2), split_cap)
    pages_per_split = triton.cdiv(pages, split)
    split = triton.cdiv(pages, pages_per_split)
    # Expand: [BM, BR] x [BR, BN]; one rank step covers ranks up to 64.
    bn = min(d, kn.expand_bn)
    br_e = min(64, r_pow2)
    warps_e = 8 if bm >= 32 else kn.small_tile_warps[1]
    if sh.dtype == torch.float32:
        bn, br_e = min(d, 64), 16
    # Several column blocks per program when one rank step covers every
    # adapter: v and the page lookups are loaded once, B tiles stream.
    nbp, stages_e = 1, 2
    if sh.max_rank <= br_e:
        programs = est_tiles * triton.cdiv(sh.n_max, bn) * sh.slices
        want_e = kn.expand_programs_per_sm * num_sms(sh.device_index)
        while nbp < kn.expand_max_nbp and programs >= 2 * nbp * want_e:
            nbp *= 2
        if nbp * bn < d:  # a program's columns must be whole pages
            nbp = 1
        if nbp > 1:
            stages_e = kn.expand_stages
    regs_s, regs_e = kn.small_tile_maxnreg if bm == 16 else (None, None)
    return Plan(bm, tiles, br_s, bk, split, pages_per_split * d, pow2(pages_per_split), warps_s,
                stages_s, bn, br_e, warps_e, stages_e, nbp, regs_s, regs_e,
                est_tiles, want2)


def sqrt2_want(want: int) -> int:
    """floor(want * sqrt(2)) (``pow2_split``'s bound), kept within int32."""
    return min(math.isqrt(2 * want * want), 1 << 30)


def pow2_split(est: int, want2: int) -> int:
    """The power of two nearest (in log scale) to want / est, at least 1:
    the largest s with est * s <= want * sqrt(2). The kernels' device
    choice (``tiles.device_split``) is the same integer rule."""
    s, est = 1, max(est, 1)
    while est * s * 2 <= want2:
        s *= 2
    return s


def split_args(pl: Plan, k: int, d: int, slices: int, r_max: int) -> tuple:
    """The shrink's split rule as the expand's arguments: (tiles planned for,
    the shrink's items per tile, want, pages of K). The step's tiles are never
    fewer than planned for, so the device splits at most pl.split times."""
    items_per_tile = triton.cdiv(r_max, pl.shrink_rank_block) * slices
    return pl.est_tiles, items_per_tile, pl.split_want, k // d


def resident(items: int, device: torch.device) -> int:
    """Programs of a persistent grid for at most ``items`` work items."""
    return min(items, knobs.RESIDENT_PROGRAMS_PER_SM * num_sms(device_index(device)))


def register_cap(maxnreg: int | None) -> dict:
    """Launch options capping a kernel's registers per thread (none if None)."""
    return {} if maxnreg is None else {"maxnreg": maxnreg}
