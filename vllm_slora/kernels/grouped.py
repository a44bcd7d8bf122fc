"""The paged LoRA op on Triton: y += scale * x @ A^T @ B^T, in two or three launches.

One kernel family serves MBGMV (decode) and MBGMM (prefill): tokens are
grouped by adapter (``grouping.py``), the grouping and plan (``plan.py``)
are made once per call, the shrink (``shrink.py``) writes v or split-K
partials (grouped by adapter, ``knobs.DEVICE_SPLIT`` lets it choose the
split from the step's tiles), and the expand (``expand.py``) sums small
partials itself (else a reduce launch runs between) and adds into y. On Hopper the expand is
launched with programmatic dependent launch right behind the shrink, so its
prologue and B-page lookups overlap the shrink's tail. Tested against
``reference.py`` in ``tests/kernels/test_kernels.py``.
"""

from __future__ import annotations

import torch

from vllm_slora.kernels import knobs
from vllm_slora.kernels.device import capability
from vllm_slora.kernels.expand import launch_expand
from vllm_slora.kernels.grouping import ADAPTERS, PER_TOKEN, Groups, make_groups
from vllm_slora.kernels.pages import check_pool, slice_tables, widths
from vllm_slora.kernels.plan import Plan, plan, shape_of, split_args
from vllm_slora.kernels.shrink import launch_reduce, launch_shrink


def fuse_partials(groups: Groups, pl: Plan, r_max: int) -> bool:
    """Whether ``lora`` lets the expand sum the shrink's split-K partials
    (small per tile) instead of launching ``_reduce_kernel``."""
    rows = 1 if groups.mode == PER_TOKEN else pl.tile_tokens
    return pl.split > 1 and pl.split * rows * r_max * 4 <= knobs.FUSED_PARTIALS_BYTES


def describe(groups: Groups, pl: Plan, r_max: int) -> str:
    """Short plan tag for benchmarks: mode, BM, split-K and how it is summed."""
    tag = "TSA"[groups.mode] + str(pl.tile_tokens)
    if pl.split > 1:
        tag += f"k{pl.split}" + ("f" if fuse_partials(groups, pl, r_max) else "r")
    if pl.expand_blocks_per_program > 1:
        tag += f"n{pl.expand_blocks_per_program}"
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
    slice_tables(a_tables)
    slice_tables(b_tables)
    t, k = x.shape
    s = len(a_tables)
    if len(b_tables) != s:
        raise ValueError("a_rows and b_rows have different numbers of slices")
    assert sum(widths(b_tables, d)) == y.shape[1], "y width != sum of slice widths"
    if t == 0 or lora_start.shape[0] == 0:  # nothing to add (the kernels read slot 0 of L)
        return
    assert x.stride(1) == 1 and y.stride(1) == 1 and k % d == 0
    r_max = max(int(max_rank), 1)
    groups = make_groups(token_lora, lora_start.shape[0], segments, meta)
    pl = plan(shape_of(groups, t, k, max(widths(b_tables, d)), s, r_max, d, x.device, x.dtype))
    dev = x.device
    # The expand may start (PDL) while the shrink runs when it comes right
    # behind it; behind a reduce launch it would only wait.
    pdl = use_pdl(dev) and (pl.split == 1 or fuse_partials(groups, pl, r_max))
    dev_split = None
    if pl.split == 1:
        v = keep(torch.empty((s, t, r_max), dtype=torch.float32, device=dev))
        launch_shrink(x, pool, a_tables, lora_start, lora_rank, token_lora, v, groups, pl, pdl,
                      record)
        v_split = 1
    else:
        ws = keep(torch.empty((pl.split, s, t, r_max), dtype=torch.float32, device=dev))
        fused = fuse_partials(groups, pl, r_max)
        if fused and groups.mode == ADAPTERS and knobs.DEVICE_SPLIT:
            dev_split = split_args(pl, k, d, s, r_max)
        launch_shrink(x, pool, a_tables, lora_start, lora_rank, token_lora, ws, groups, pl, pdl,
                      record, dev_split is not None)
        if fused:
            v, v_split = ws, pl.split
        else:
            v = keep(torch.empty((s, t, r_max), dtype=torch.float32, device=dev))
            launch_reduce(ws, v, token_lora, lora_rank, record)
            v_split = 1
    launch_expand(
        v, pool, b_tables, lora_start, lora_rank, lora_scale, token_lora, y, groups, pl, v_split,
        pdl, record, dev_split,
    )


def use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper and later, unless PDL is False."""
    if knobs.PDL is not None:
        return bool(knobs.PDL) and device.type == "cuda"
    return device.type == "cuda" and capability(device.index) >= (9, 0)
