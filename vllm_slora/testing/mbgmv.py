"""The first MBGMV: one program per token (decode), reading scattered pages.

A baseline, not used by the engine: ``benchmarks/kernels`` times it ("v1
us") beside the grouped kernels, and ``tests/kernels`` checks it against the
reference. One program serves one token, so each token does exactly its own
adapter's rank of work; its K loop runs serially per program (a page lookup
feeding each load), so it is latency-bound for small batches, and each
token re-reads its adapter's pages (the grouped kernels read them once per
tile). Vocabulary and layout: ``vllm_slora/kernels/__init__.py``.
"""

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from vllm_slora.kernels.pages import MAX_SLICES, check_pool, load_b_tile, pick, slice_tables


@triton.jit
def _mbgmv_shrink_kernel(
    x_ptr,  # [T, K]
    pool_ptr,  # [num_rows, D]
    out_ptr,  # fp32 [S, T, R_MAX]
    rows0_ptr,  # int32 [V, K // D], one table per slice
    rows1_ptr,
    rows2_ptr,
    lora_start_ptr,  # int32 [L]
    lora_rank_ptr,  # int32 [L]
    token_lora_ptr,  # int32 [T]
    K,
    R_MAX,
    x_stride,
    pool_stride,
    rows_stride,
    out_stride_s,
    out_stride_t,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tok = tl.program_id(0)
    r0 = tl.program_id(1) * BLOCK_R
    s = tl.program_id(2)
    lora = tl.load(token_lora_ptr + tok)
    if lora < 0:
        return
    rank = tl.minimum(tl.load(lora_rank_ptr + lora), R_MAX)
    if r0 >= rank:
        return
    start = tl.load(lora_start_ptr + lora)
    rows_ptr = pick(s, rows0_ptr, rows1_ptr, rows2_ptr)

    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    vec_ptr = rows_ptr + (start + offs_r).to(tl.int64) * rows_stride
    offs_k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + tok.to(tl.int64) * x_stride
    # Reduce once after the loop: an elementwise accumulator keeps the K loop
    # free of cross-lane shuffles.
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        page = tl.load(vec_ptr + k0 // D, mask=mask_r, other=0).to(tl.int64)
        a = tl.load(
            pool_ptr + page[:, None] * pool_stride + (k0 % D + offs_k)[None, :],
            mask=mask_r[:, None],
            other=0.0,
        )
        xv = tl.load(x_row + k0 + offs_k)
        acc += a.to(tl.float32) * xv.to(tl.float32)[None, :]
    v = tl.sum(acc, axis=1)
    out = out_ptr + s * out_stride_s + tok.to(tl.int64) * out_stride_t
    tl.store(out + offs_r, v, mask=mask_r)



@triton.jit
def _mbgmv_expand_kernel(
    v_ptr,  # fp32 [S, T, R_MAX]
    pool_ptr,  # [num_rows, D]
    y_ptr,  # [T, sum N_s]
    rows0_ptr,  # int32 [V, N_s // D], one table per slice
    rows1_ptr,
    rows2_ptr,
    lora_start_ptr,  # int32 [L]
    lora_rank_ptr,  # int32 [L]
    lora_scale_ptr,  # fp32 [L]
    token_lora_ptr,  # int32 [T]
    n0,  # width of slice 0, 1, 2
    n1,
    n2,
    R_MAX,
    v_stride_s,
    v_stride_t,
    pool_stride,
    y_stride,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tok = tl.program_id(0)
    col = tl.program_id(1) * BLOCK_N
    s = tl.program_id(2)
    width = tl.where(s == 0, n0, tl.where(s == 1, n1, n2))
    if col >= width:
        return
    lora = tl.load(token_lora_ptr + tok)
    if lora < 0:
        return
    rank = tl.minimum(tl.load(lora_rank_ptr + lora), R_MAX)
    start = tl.load(lora_start_ptr + lora)
    scale = tl.load(lora_scale_ptr + lora)
    rows_ptr = pick(s, rows0_ptr, rows1_ptr, rows2_ptr)
    # Slice s starts after slices 0..s-1 in y; table s has width // D columns.
    y_col = tl.where(s == 0, 0, tl.where(s == 1, n0, n0 + n1))
    rows_stride = width // D

    offs_n = tl.arange(0, BLOCK_N)
    in_page = col % D + offs_n
    v_row = v_ptr + s * v_stride_s + tok.to(tl.int64) * v_stride_t
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for j0 in range(0, rank, BLOCK_R):
        offs_r = j0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        b = load_b_tile(pool_ptr, rows_ptr, start, offs_r, mask_r, rows_stride, col, in_page,
                        pool_stride, D)
        # Masked: v past the rank is never read (it may be stale or NaN).
        vv = tl.load(v_row + offs_r, mask=mask_r, other=0.0)
        acc += b.to(tl.float32) * vv[:, None]
    delta = tl.sum(acc, axis=0) * scale
    y = y_ptr + tok.to(tl.int64) * y_stride + y_col + col + offs_n
    tl.store(y, (tl.load(y).to(tl.float32) + delta).to(y_ptr.dtype.element_ty))



def mbgmv_shrink(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_tables: Sequence[torch.Tensor],
    lora_start: torch.Tensor,
    lora_rank: torch.Tensor,
    token_lora: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """out[s, i, :rank] = x[i] @ A_{l,s}^T, one program per (token, rank block, slice).

    Args:
        x: [T, K] fp16/bf16/fp32, contiguous rows.
        pool: [num_rows, D], x's dtype.
        a_tables: S int32 tables [V_s, K // D].
        lora_start, lora_rank: int32 [L].
        token_lora: int32 [T], -1 = no LoRA.
        out: fp32 [S, T, R_MAX]; only [s, i, :rank] of LoRA tokens is written.
    """
    d = check_pool(x, pool)
    t, k = x.shape
    s, r_max = len(a_tables), out.shape[-1]
    tables = slice_tables(a_tables)
    if t == 0:
        return
    assert x.stride(1) == 1 and out.stride(2) == 1 and k % d == 0
    # Small batches get narrow rank blocks so that more programs share the
    # memory traffic; big batches have programs enough.
    block_r = 16 if t * s >= 128 else 4
    grid = (t, triton.cdiv(r_max, block_r), s)
    _mbgmv_shrink_kernel[grid](
        x, pool, out, *tables, lora_start, lora_rank, token_lora,
        k, r_max, x.stride(0), pool.stride(0), tables[0].stride(0),
        out.stride(0), out.stride(1),
        D=d, BLOCK_R=block_r, BLOCK_K=min(d, 256),
    )  # fmt: skip


def mbgmv_expand(
    v: torch.Tensor,
    pool: torch.Tensor,
    b_tables: Sequence[torch.Tensor],
    lora_start: torch.Tensor,
    lora_rank: torch.Tensor,
    lora_scale: torch.Tensor,
    token_lora: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """y[i, slice s] += scale * v[s, i, :rank] @ B_{l,s}^T, per (token, N tile, slice).

    Args:
        v: fp32 [S, T, R_MAX]; only [s, i, :rank] is read.
        pool: [num_rows, D], y's dtype.
        b_tables: S int32 tables [V_s, N_s // D].
        lora_start, lora_rank: int32 [L]; lora_scale: fp32 [L].
        token_lora: int32 [T], -1 = no LoRA (row left untouched).
        y: [T, sum N_s], contiguous rows; slice s at column sum_{s'<s} N_s'.
    """
    d = check_pool(y, pool)
    t = y.shape[0]
    s, r_max = len(b_tables), v.shape[-1]
    tables = slice_tables(b_tables)
    widths = [tb.shape[1] * d for tb in b_tables] + [0] * (MAX_SLICES - s)
    assert sum(widths) == y.shape[1], "y width != sum of slice widths"
    if t == 0:
        return
    assert y.stride(1) == 1 and v.stride(2) == 1
    block_n = min(d, 128)
    grid = (t, triton.cdiv(max(widths), block_n), s)
    _mbgmv_expand_kernel[grid](
        v, pool, y, *tables, lora_start, lora_rank, lora_scale, token_lora,
        *widths, r_max, v.stride(0), v.stride(1), pool.stride(0), y.stride(0),
        D=d, BLOCK_R=16, BLOCK_N=block_n,
    )  # fmt: skip
