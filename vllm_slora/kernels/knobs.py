"""Tuning knobs of the grouped kernels, in one place.

Module globals read at call time: tests and benchmarks set them
(``monkeypatch.setattr(knobs, ...)``, ``benchmarks.lora_step`` variants), and
``snapshot()`` is the key under which plans and recorded launches are
cached, so a changed knob never reuses a plan made under another value.
The values are the winners of the knob variants of ``python -m
benchmarks.kernels`` and ``python -m benchmarks.lora_step`` on an H100/H200.
"""

from __future__ import annotations

import os
from typing import NamedTuple

# Decode batches up to this many tokens skip the grouping launch (their
# tokens rarely share adapters; a repeated adapter is re-read from L2).
PER_TOKEN_MAX_T = 32
# Shrink split-K aims at this many programs per SM (see plan.py).
PROGRAMS_PER_SM = 4
# The same for big tiles (BM >= 32, about 100 KB of shared memory each).
BIG_TILE_PROGRAMS_PER_SM = 1
MAX_SPLIT = 16
# Sum split-K partials inside the expand when one tile's partials are at
# most this large (else a reduce launch): the split-K steps of a decode
# batch of 64 fuse too, one launch less per module (LoRA time of an
# engine-like step 12-37% lower than with 8 KB over B = 64/256, n = 5/64).
FUSED_PARTIALS_BYTES = 64 << 10
# ADAPTERS mode, partials summed by the expand: the shrink splits K by the
# step's tile count (read from group_by_adapter's meta) instead of the
# plan's FEW_GROUPS guess, at most as often as planned. A decode step of
# 216 one-token adapters (n = 2,000) then reads whole vectors per item, as
# `benchmarks.lora_step`'s few256 did, while a step of 5 popular adapters
# splits as planned. With RESIDENT_PROGRAMS_PER_SM = 8, against the split
# planned on the host with 16 (`lora_step` variants devsplit-r8 and
# hostsplit, H100, 2026-12-07): decode steps of 216 tokens on 216 / 64 / 5
# adapters 8.12 -> 7.59 / 3.61 -> 3.40 / 1.75 -> 1.69 ms of LoRA a step (o
# 90 -> 72 us a layer); mixed steps (+ a 256-token prompt) 7.64 -> 8.04 at
# 216 adapters (q,k,v unsplit: 153 -> 169 us), 2.04 -> 1.90 at 5.
DEVICE_SPLIT = True
# Groups the tile map scans at a time (any count works, in chunks).
SCAN_GROUPS = 128
# Persistent grids: at most this many programs per SM, each looping over
# work items. Each item is a chain of dependent loads (tile map, rank, page
# table, pages); more programs keep more of them in flight, but every
# program of a call with no rank (gate_up and down under q,k,v,o adapters)
# still starts and exits. 16 made 64-adapter decode steps 15-25% faster
# than 4 (host split, 2026-12-01); with the device split, 8 against 16
# (H100, 2026-12-07): 216 / 64 / 5 adapters 7.75 -> 7.55, 3.53 -> 3.40,
# 1.88 -> 1.69 ms a step, the rank-0 calls 16 -> 11 us a layer.
RESIDENT_PROGRAMS_PER_SM = 8
# Plans (split-K, expand column streaming) size the work as if a step in
# ADAPTERS mode had at most this many adapters.
FEW_GROUPS = 8
# ADAPTERS mode reads each item's tile from group_by_adapter's tile list
# (False: scans the group bounds per item; kept for comparison).
TILE_LIST = True
# Programs exit at once when no adapter slot has a rank on the module (one
# vector load of the slots' ranks, beside the first tile's).
ANY_RANK_CHECK = True
# Pipeline depth of the small-tile (BM = 16) shrink; expand column block.
SHRINK_STAGES = 4
EXPAND_BN = 128
# Expand: column blocks per program, up to EXPAND_MAX_NBP, while the grid
# keeps at least EXPAND_PROGRAMS_PER_SM programs per SM (rank <= BR only):
# fewer, longer expand programs, 5-10% on decode batches of 512 tokens.
EXPAND_MAX_NBP = 16
EXPAND_PROGRAMS_PER_SM = 2
EXPAND_STAGES = 3
# Warps of the small-tile (BM = 16) shrink and expand programs (8 expand
# warps: 3-7% on decode batches of o and down).
SMALL_TILE_WARPS = (4, 8)
# Small-tile shrink step: BR rank-vectors x BK columns (BK <= D); BR is
# doubled for fused slices (q,k,v: three times the items already). BR = 32
# cut q,k,v by 13% at 5 adapters and 25% in a mixed step with a 256-token
# prompt, and left 256 adapters level, while o (one slice) at 256 adapters
# was 15% slower with it.
SMALL_TILE_SHRINK = (16, 256)
# Register caps (ptxas .maxnreg) of the small-tile shrink and expand, None =
# ptxas's choice (64-117 registers a thread). Shared memory, not registers,
# bounds their programs per SM (`python -m benchmarks.regs` prints both on
# CPU); a cap of 96 was 8% slower at 216 adapters on an H100.
SMALL_TILE_MAXNREG: tuple[int | None, int | None] = (None, None)
# Programmatic dependent launch of the expand behind the shrink in ``lora``
# (the expand's prologue and B-page lookups overlap the shrink's tail): None
# = on Hopper and later, False = off (also ``VLLM_SLORA_PDL=0``, read at
# import: for telling a PDL race from other faults on a GPU).
PDL: bool | None = None if os.environ.get("VLLM_SLORA_PDL", "") != "0" else False


class Knobs(NamedTuple):
    """The knobs' values at one moment (hashable: a cache key)."""

    per_token_max_t: int
    programs_per_sm: int
    big_tile_programs_per_sm: int
    max_split: int
    fused_partials_bytes: int
    device_split: bool
    scan_groups: int
    resident_programs_per_sm: int
    few_groups: int
    tile_list: bool
    any_rank_check: bool
    shrink_stages: int
    expand_bn: int
    expand_max_nbp: int
    expand_programs_per_sm: int
    expand_stages: int
    small_tile_warps: tuple[int, int]
    small_tile_shrink: tuple[int, int]
    small_tile_maxnreg: tuple[int | None, int | None]
    pdl: bool | None


def snapshot() -> Knobs:
    """The knobs now."""
    return Knobs(PER_TOKEN_MAX_T, PROGRAMS_PER_SM, BIG_TILE_PROGRAMS_PER_SM, MAX_SPLIT,
                 FUSED_PARTIALS_BYTES, DEVICE_SPLIT, SCAN_GROUPS, RESIDENT_PROGRAMS_PER_SM,
                 FEW_GROUPS,
                 TILE_LIST, ANY_RANK_CHECK, SHRINK_STAGES, EXPAND_BN, EXPAND_MAX_NBP,
                 EXPAND_PROGRAMS_PER_SM, EXPAND_STAGES, SMALL_TILE_WARPS, SMALL_TILE_SHRINK,
                 SMALL_TILE_MAXNREG, PDL)
