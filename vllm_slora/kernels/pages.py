"""Reading adapters from pages, shared by every Triton LoRA kernel.

Fused slices (q,k,v or gate,up) share one launch: the slice is part of the
program id, and each program picks its slice's vector table among
MAX_SLICES pointer arguments (``pick``). A tile along K (shrink) or N
(expand) never crosses a page, because the tile width divides the page
width D: each tile needs one table lookup per rank-vector and reads
D-aligned, contiguous rows of the pool (``load_b_tile``).
"""

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from vllm_slora.kernels import _interp

_interp.patch()  # Triton's CPU interpreter with a newer numpy (TRITON_INTERPRET=1 only)

MAX_SLICES = 3


@triton.jit
def pick(s, p0, p1, p2):
    """Slice s's value among three pointer arguments (runtime select)."""
    if s == 0:
        p = p0
    elif s == 1:
        p = p1
    else:
        p = p2
    return p


@triton.jit
def load_b_tile(pool_ptr, rows_ptr, start, offs_r, mask_r, rows_stride, col, in_page, pool_stride,
                D: tl.constexpr):
    """B tile [rank-vectors offs_r, columns col + in_page - col % D]: each
    rank-vector's page of column block col, looked up in its vector table
    (rows past the rank masked to zero)."""
    page = tl.load(
        rows_ptr + (start + offs_r).to(tl.int64) * rows_stride + col // D,
        mask=mask_r,
        other=0,
    ).to(tl.int64)
    return tl.load(
        pool_ptr + page[:, None] * pool_stride + in_page[None, :],
        mask=mask_r[:, None],
        other=0.0,
    )


def slice_tables(tables: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Check 1..MAX_SLICES contiguous int32 tables; pad the list to MAX_SLICES."""
    if not 1 <= len(tables) <= MAX_SLICES:
        raise ValueError(
            f"{len(tables)} fused slices; the Triton kernels take 1..{MAX_SLICES}"
            " (raise MAX_SLICES in vllm_slora/kernels/pages.py)"
        )
    for t in tables:
        if t.dtype != torch.int32 or not t.is_contiguous():
            raise ValueError("vector tables must be contiguous int32 tensors")
    return list(tables) + [tables[0]] * (MAX_SLICES - len(tables))


def check_pool(x: torch.Tensor, pool: torch.Tensor) -> int:
    """Return the page width D after checking pool against the activations."""
    if pool.dtype != x.dtype:
        raise ValueError(f"pool dtype {pool.dtype} != activation dtype {x.dtype}")
    if pool.stride(1) != 1:
        raise ValueError("pool rows (pages) must be contiguous")
    d = pool.shape[1]
    if d & (d - 1):
        raise ValueError(f"page width D={d} must be a power of two")
    return d


def widths(tables: Sequence[torch.Tensor], d: int) -> list[int]:
    """Each slice's width in elements: its table's pages per vector x D."""
    return [tb.shape[1] * d for tb in tables]
