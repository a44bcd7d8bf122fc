"""MBGMM: grouped-GEMM heterogeneous-rank LoRA over segments (prefill).

Vocabulary and layout: see ``vllm_slora/kernels/__init__.py``.

A prefill batch is a few long runs ("segments") of consecutive tokens that
share an adapter: seg_start int32 [NSEG+1] (segment g is tokens
seg_start[g] .. seg_start[g+1]-1) and seg_lora int32 [NSEG] (its adapter,
-1 = none). Tiles are BLOCK_M tokens x a rank block (shrink) or x BLOCK_N
output columns (expand), computed with tensor-core ``tl.dot``.

The grid is fixed by T, not by the segments, so a launch needs no host sync:
program m owns tokens [m*BLOCK_M, (m+1)*BLOCK_M) and finds the segment that
holds its first token by binary search over seg_start, then walks the (one,
rarely two or three) segments overlapping its window, masking the rows of
each. Zero-length segments (padding to a fixed NSEG) cost nothing.

Rank loops stop at each segment's own rank (in blocks of BLOCK_R); rank
blocks past it are skipped, never padded.

Tested against ``reference.py`` in ``tests/kernels/test_kernels.py``.
"""

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from vllm_slora.kernels.mbgmv import MAX_SLICES, check_pool, pick, slice_tables


@triton.jit
def first_segment(seg_start_ptr, NSEG, m0):
    """Largest g in [0, NSEG) with seg_start[g] <= m0 (0 if none)."""
    lo = 0
    hi = NSEG
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tl.load(seg_start_ptr + mid) <= m0:
            lo = mid
        else:
            hi = mid
    return lo


@triton.jit
def _mbgmm_shrink_kernel(
    x_ptr,  # [T, K]
    pool_ptr,  # [num_rows, D]
    out_ptr,  # fp32 [S, T, R_MAX]
    rows0_ptr,  # int32 [V, K // D], one table per slice
    rows1_ptr,
    rows2_ptr,
    lora_start_ptr,  # int32 [L]
    lora_rank_ptr,  # int32 [L]
    seg_start_ptr,  # int32 [NSEG + 1]
    seg_lora_ptr,  # int32 [NSEG]
    T,
    K,
    R_MAX,
    NSEG,
    NUM_R_BLOCKS,
    x_stride,
    pool_stride,
    rows_stride,
    out_stride_s,
    out_stride_t,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Rank blocks and slices vary fastest so the programs that re-read one
    # x tile run together and find it in L2.
    pid = tl.program_id(0)
    r0 = (pid % NUM_R_BLOCKS) * BLOCK_R
    s = pid // NUM_R_BLOCKS
    m0 = tl.program_id(1) * BLOCK_M
    m_end = tl.minimum(m0 + BLOCK_M, T)
    rows_ptr = pick(s, rows0_ptr, rows1_ptr, rows2_ptr)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    out_tile = (
        out_ptr + s * out_stride_s + offs_m.to(tl.int64)[:, None] * out_stride_t
        + offs_r[None, :]
    )  # fmt: skip

    g = first_segment(seg_start_ptr, NSEG, m0)
    seg_lo = tl.load(seg_start_ptr + g)
    while seg_lo < m_end:
        seg_hi = tl.load(seg_start_ptr + g + 1)
        lora = tl.load(seg_lora_ptr + g)
        rank = tl.minimum(tl.load(lora_rank_ptr + tl.maximum(lora, 0)), R_MAX)
        if (lora >= 0) & (r0 < rank) & (seg_hi > m0):
            start = tl.load(lora_start_ptr + lora)
            mask_m = (offs_m >= seg_lo) & (offs_m < seg_hi) & (offs_m < m_end)
            mask_r = offs_r < rank
            vec_ptr = rows_ptr + (start + offs_r).to(tl.int64) * rows_stride
            acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                xt = tl.load(
                    x_ptr + offs_m.to(tl.int64)[:, None] * x_stride
                    + (k0 + offs_k)[None, :],
                    mask=mask_m[:, None],
                    other=0.0,
                )  # fmt: skip
                page = tl.load(vec_ptr + k0 // D, mask=mask_r, other=0).to(tl.int64)
                at = tl.load(
                    pool_ptr + page[:, None] * pool_stride + (k0 % D + offs_k)[None, :],
                    mask=mask_r[:, None],
                    other=0.0,
                )
                acc = tl.dot(xt, tl.trans(at), acc)
            tl.store(out_tile, acc, mask=mask_m[:, None] & mask_r[None, :])
        g += 1
        # Tokens past the last segment belong to none: stop there.
        seg_lo = tl.where(g < NSEG, tl.load(seg_start_ptr + g, mask=g < NSEG), m_end)


@triton.jit
def _mbgmm_expand_kernel(
    v_ptr,  # fp32 [S, T, R_MAX]
    pool_ptr,  # [num_rows, D]
    y_ptr,  # [T, sum N_s]
    rows0_ptr,  # int32 [V, N_s // D], one table per slice
    rows1_ptr,
    rows2_ptr,
    lora_start_ptr,  # int32 [L]
    lora_rank_ptr,  # int32 [L]
    lora_scale_ptr,  # fp32 [L]
    seg_start_ptr,  # int32 [NSEG + 1]
    seg_lora_ptr,  # int32 [NSEG]
    n0,  # width of slice 0, 1, 2
    n1,
    n2,
    T,
    R_MAX,
    NSEG,
    NUM_N_BLOCKS,
    v_stride_s,
    v_stride_t,
    pool_stride,
    y_stride,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    col = (pid % NUM_N_BLOCKS) * BLOCK_N
    s = pid // NUM_N_BLOCKS
    width = tl.where(s == 0, n0, tl.where(s == 1, n1, n2))
    if col >= width:
        return
    m0 = tl.program_id(1) * BLOCK_M
    m_end = tl.minimum(m0 + BLOCK_M, T)
    rows_ptr = pick(s, rows0_ptr, rows1_ptr, rows2_ptr)
    y_col = tl.where(s == 0, 0, tl.where(s == 1, n0, n0 + n1))
    rows_stride = width // D
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    in_page = col % D + offs_n
    v_rows = v_ptr + s * v_stride_s + offs_m.to(tl.int64)[:, None] * v_stride_t
    y_tile = (
        y_ptr + offs_m.to(tl.int64)[:, None] * y_stride + y_col + col + offs_n[None, :]
    )

    g = first_segment(seg_start_ptr, NSEG, m0)
    seg_lo = tl.load(seg_start_ptr + g)
    while seg_lo < m_end:
        seg_hi = tl.load(seg_start_ptr + g + 1)
        lora = tl.load(seg_lora_ptr + g)
        if (lora >= 0) & (seg_hi > m0):
            rank = tl.minimum(tl.load(lora_rank_ptr + lora), R_MAX)
            start = tl.load(lora_start_ptr + lora)
            scale = tl.load(lora_scale_ptr + lora)
            mask_m = (offs_m >= seg_lo) & (offs_m < seg_hi) & (offs_m < m_end)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for j0 in range(0, rank, BLOCK_R):
                offs_r = j0 + tl.arange(0, BLOCK_R)
                mask_r = offs_r < rank
                page = tl.load(
                    rows_ptr + (start + offs_r).to(tl.int64) * rows_stride + col // D,
                    mask=mask_r,
                    other=0,
                ).to(tl.int64)
                bt = tl.load(
                    pool_ptr + page[:, None] * pool_stride + in_page[None, :],
                    mask=mask_r[:, None],
                    other=0.0,
                )
                # v past the rank is never read (it may be stale or NaN); it is
                # rounded to the weights' dtype for the tensor cores, as punica
                # and vLLM do.
                vt = tl.load(
                    v_rows + offs_r[None, :],
                    mask=mask_m[:, None] & mask_r[None, :],
                    other=0.0,
                )
                acc = tl.dot(vt.to(bt.dtype), bt, acc)
            y = tl.load(y_tile, mask=mask_m[:, None], other=0.0)
            y = (y.to(tl.float32) + acc * scale).to(y_ptr.dtype.element_ty)
            tl.store(y_tile, y, mask=mask_m[:, None])
        g += 1
        seg_lo = tl.where(g < NSEG, tl.load(seg_start_ptr + g, mask=g < NSEG), m_end)


def _check_segments(seg_start: torch.Tensor, seg_lora: torch.Tensor) -> int:
    if seg_start.dtype != torch.int32 or seg_lora.dtype != torch.int32:
        raise ValueError("segments (seg_start, seg_lora) must be int32 tensors")
    nseg = seg_lora.shape[0]
    if seg_start.shape[0] != nseg + 1:
        raise ValueError(f"seg_start has {seg_start.shape[0]} entries, need {nseg + 1}")
    return nseg


def mbgmm_shrink(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_tables: Sequence[torch.Tensor],
    lora_start: torch.Tensor,
    lora_rank: torch.Tensor,
    seg_start: torch.Tensor,
    seg_lora: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """out[s, i, :rank] = x[i] @ A_{l,s}^T for tokens of segments with an adapter.

    Args:
        x: [T, K] fp16/bf16/fp32, contiguous rows.
        pool: [num_rows, D], x's dtype.
        a_tables: S int32 tables [V_s, K // D].
        lora_start, lora_rank: int32 [L].
        seg_start: int32 [NSEG + 1], non-decreasing, seg_start[NSEG] <= T.
        seg_lora: int32 [NSEG], adapter of each segment, -1 = none.
        out: fp32 [S, T, R_MAX]; only [s, i, :rank] of LoRA tokens is written.
    """
    d = check_pool(x, pool)
    t, k = x.shape
    s, r_max = len(a_tables), out.shape[-1]
    tables = slice_tables(a_tables)
    nseg = _check_segments(seg_start, seg_lora)
    if t == 0 or nseg == 0:
        return
    assert x.stride(1) == 1 and out.stride(2) == 1 and k % d == 0
    block_m, block_r = 32, 16
    num_r_blocks = triton.cdiv(r_max, block_r)
    grid = (num_r_blocks * s, triton.cdiv(t, block_m))
    _mbgmm_shrink_kernel[grid](
        x, pool, out, *tables, lora_start, lora_rank, seg_start, seg_lora,
        t, k, r_max, nseg, num_r_blocks,
        x.stride(0), pool.stride(0), tables[0].stride(0), out.stride(0), out.stride(1),
        D=d, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=min(d, 128),
    )  # fmt: skip


def mbgmm_expand(
    v: torch.Tensor,
    pool: torch.Tensor,
    b_tables: Sequence[torch.Tensor],
    lora_start: torch.Tensor,
    lora_rank: torch.Tensor,
    lora_scale: torch.Tensor,
    seg_start: torch.Tensor,
    seg_lora: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """y[i, slice s] += scale * v[s, i, :rank] @ B_{l,s}^T over segments.

    Args:
        v: fp32 [S, T, R_MAX]; only [s, i, :rank] is read.
        pool: [num_rows, D], y's dtype.
        b_tables: S int32 tables [V_s, N_s // D].
        lora_start, lora_rank: int32 [L]; lora_scale: fp32 [L].
        seg_start: int32 [NSEG + 1]; seg_lora: int32 [NSEG] (-1 = none).
        y: [T, sum N_s], contiguous rows; rows outside LoRA segments untouched.
    """
    d = check_pool(y, pool)
    t = y.shape[0]
    s, r_max = len(b_tables), v.shape[-1]
    tables = slice_tables(b_tables)
    nseg = _check_segments(seg_start, seg_lora)
    widths = [tb.shape[1] * d for tb in b_tables] + [0] * (MAX_SLICES - s)
    assert sum(widths) == y.shape[1], "y width != sum of slice widths"
    if t == 0 or nseg == 0:
        return
    assert y.stride(1) == 1 and v.stride(2) == 1
    block_m, block_n = 64, min(d, 128)
    num_n_blocks = triton.cdiv(max(widths), block_n)
    grid = (num_n_blocks * s, triton.cdiv(t, block_m))
    _mbgmm_expand_kernel[grid](
        v, pool, y, *tables, lora_start, lora_rank, lora_scale, seg_start, seg_lora,
        *widths, t, r_max, nseg, num_n_blocks,
        v.stride(0), v.stride(1), pool.stride(0), y.stride(0),
        D=d, BLOCK_M=block_m, BLOCK_R=16, BLOCK_N=block_n,
    )  # fmt: skip
