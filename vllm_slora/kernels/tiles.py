"""Device side of the grouping: which tokens a work item's tile holds.

The grouped kernels run persistent programs, each looping over work items
(tile x rank block x split x slice, or tile x column block x slice); an
item finds its tile here. ADAPTERS mode reads it from the tile list that
``grouping.group_by_adapter`` wrote (one load); SEGMENTS, and ADAPTERS with
``knobs.TILE_LIST`` off, derive it from the groups' sizes (a cumulative sum
of ceil(size / BM) over the group bounds, in registers: a scan of every
group per item, about three more dependent loads before the first page).
Also the two helpers every grouped kernel shares: the early exit when no
adapter has a rank on the module, and the dot.
"""

import triton
import triton.language as tl

from vllm_slora.kernels import knobs
from vllm_slora.kernels.device import pow2
from vllm_slora.kernels.grouping import ADAPTERS


@triton.jit
def tile(p, token_lora_ptr, bounds_ptr, glora_ptr, NG, MODE: tl.constexpr, BM: tl.constexpr,
         SCAN_GROUPS: tl.constexpr, LIST: tl.constexpr):  # fmt: skip
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
        # tiles those are. Groups' tile counts are cumulated SCAN_GROUPS at a time.
        if MODE == 2:
            # Groups past the last adapter with tokens are empty: scan only
            # up to it (group_by_adapter stores that count after the lists).
            NG = tl.load(glora_ptr)
        g = 0
        prev = 0
        base = 0
        for c0 in range(0, NG, SCAN_GROUPS):
            offs = c0 + tl.arange(0, SCAN_GROUPS)
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
def tile_tokens(lo, hi, idx_ptr, MODE: tl.constexpr, BM: tl.constexpr):
    """Token rows of a tile (int64) and their mask."""
    pos = lo + tl.arange(0, BM)
    mask = pos < hi
    if MODE == 2:
        tok = tl.load(idx_ptr + pos, mask=mask, other=0)
    else:
        tok = pos
    return tok.to(tl.int64), mask


@triton.jit
def num_tiles(glora_ptr, TILES, MODE: tl.constexpr, BM: tl.constexpr):
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
def if_any_rank(n_items, lora_rank_ptr, L, RANK_LB: tl.constexpr):
    """n_items, or 0 when no adapter slot has a rank on this module (RANK_LB
    >= L: one vector load; 0: no check). The engine calls every LoRA'd
    module of every layer, also those no adapter of the step targets."""
    if RANK_LB > 0:
        offs = tl.arange(0, RANK_LB)
        ranks = tl.load(lora_rank_ptr + offs, mask=offs < L, other=0)
        n_items = tl.where(tl.max(ranks, 0) > 0, n_items, 0)
    return n_items


@triton.jit
def device_split(tiles, EST_TILES, ITEMS_PER_TILE, WANT2, PLANNED, PAGES):
    """(splits, pages per split) of the shrink's K for this step: the plan's
    rule (``plan.pow2_split``) over the step's tiles instead of the tiles the
    plan assumed, never more than its PLANNED splits (ADAPTERS mode: a step of 200
    one-token adapters in a graph planned for a few popular ones splits K
    less, its items read whole vectors; a step of few adapters splits as
    planned)."""
    est = tl.maximum(tl.maximum(tiles, EST_TILES) * ITEMS_PER_TILE, 1)
    s = 1
    while est * s * 2 <= WANT2:
        s *= 2
    s = tl.minimum(s, PLANNED)
    pps = tl.cdiv(PAGES, s)
    return tl.cdiv(PAGES, pps), pps


@triton.jit
def mma(a, b, acc, DOT_F32: tl.constexpr):
    # DOT_F32: fp32 operands (fp32 pools, and the CPU interpreter, whose
    # tl.dot is wrong for bf16); otherwise fp16/bf16 tensor cores.
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)



# ---- host side: the tile map's compile-time settings of a launch ------------


def uses_tile_list(mode: int) -> bool:
    """LIST: items read their tile from group_by_adapter's tile list."""
    return knobs.TILE_LIST and mode == ADAPTERS


def any_rank_lanes(lora_rank) -> int:
    """RANK_LB: the any-rank check's vector width (0 = no check)."""
    n = lora_rank.shape[0]
    return pow2(n) if knobs.ANY_RANK_CHECK and 0 < n <= 4096 else 0
