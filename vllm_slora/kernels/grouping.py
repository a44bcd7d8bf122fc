"""Tokens grouped by adapter: the work units of the grouped kernels.

Tokens are cut into *groups* of tokens that share an adapter, and a group
into *tiles* of up to BM tokens; every program of the grouped kernels owns
one tile (``tiles.py`` finds it), so an adapter's pages are read once per
tile, not once per token. Three ways to form groups (``MODE``), picked on
the host from shapes only (CUDA-graph safe):

``PER_TOKEN`` (0)
    every token is its own tile (small decode batches, T <=
    ``knobs.PER_TOKEN_MAX_T``): no metadata at all, one launch less.
``SEGMENTS`` (1)
    the caller's segments (seg_start, seg_lora): runs of consecutive tokens
    (prefill). Rows are contiguous, nothing is gathered.
``ADAPTERS`` (2)
    one group per adapter: ``group_by_adapter`` (one small Triton launch)
    lists each adapter's tokens, like vLLM's LoRAKernelMeta but without
    sorting or host sync: ``meta`` int32 = [bounds (L+1) | token index (T) |
    scratch (L + T) | groups to scan (1) | tiles of BM = 16, 32, 64 (3) |
    tile list (3 x MT)]; adapter l owns token_index[bounds[l]:bounds[l+1]].
    The tile list holds (adapter, first, end position) of every tile of the
    BM the plans pick for that batch shape (``adapter_tile_bm``), so a work
    item finds its tile with one load. Callers build it once per step and
    pass it to every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vllm_slora.kernels import knobs
from vllm_slora.kernels.device import interpreter_active, pow2

PER_TOKEN, SEGMENTS, ADAPTERS = 0, 1, 2
# Tile sizes whose tile counts group_by_adapter stores (after the groups to scan).
TILE_BMS = (16, 32, 64)


@dataclass(frozen=True)
class Groups:
    """How tokens are grouped for one call: the mode, the number of groups
    (T for PER_TOKEN) and the three pointers the kernels take."""

    mode: int
    num_groups: int
    bounds: torch.Tensor
    glora: torch.Tensor
    idx: torch.Tensor


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
    return max(16, min(pow2(t), 2048))


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
    lb = max(16, pow2(num_loras))
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
    if t <= knobs.PER_TOKEN_MAX_T:  # with or without the caller's meta
        return Groups(PER_TOKEN, t, token_lora, token_lora, token_lora)
    if meta is None:
        if not build_meta:
            return Groups(ADAPTERS, num_loras, token_lora, token_lora, token_lora)
        meta = group_by_adapter(token_lora, num_loras)
    size = meta_size(t, num_loras)
    if meta.dtype != torch.int32 or meta.numel() != size:
        raise ValueError("meta must come from group_by_adapter(token_lora, num_loras)")
    return Groups(ADAPTERS, num_loras, meta, meta_info(meta, t, num_loras), meta[num_loras + 1 :])



# ---- the grouping kernel ----------------------------------------------------


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

