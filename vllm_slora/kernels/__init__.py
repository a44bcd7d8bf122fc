"""Heterogeneous-rank LoRA ops that read adapters straight from KV-cache pages.

Vocabulary
----------
page
    One row of ``pool``: D contiguous elements. D is a power of two dividing
    every projection width of the model and the size of a KV block, given to
    the kernels as a constexpr (128 or 256 for Llama, 32/64 for tiny models).
pool
    Per model layer, a 2-D view ``[num_rows, D]`` (fp16, bf16 or fp32) of that
    layer's KV-cache buffer. Pages of adapters and of KV blocks share it.
rank-vector
    A LoRA adapter of rank r on a module with input width K and output width
    N has A [r, K] and B [N, r]. It is stored as 2r rank-vectors: A-vector j
    is row j of A (K elements), B-vector j is column j of B (N elements). A
    vector of width W is W // D chunks, one page each, anywhere in the pool.
vector table
    ``a_rows`` int32 [V, K // D]: a_rows[v, c] is the pool row holding chunk c
    of A-vector v; ``b_rows`` int32 [V, N // D] likewise for B-vectors.
    Adapter l owns vectors lora_start[l] .. lora_start[l] + lora_rank[l] - 1.
MBGMV
    Multi-size Batched Gather Matrix-Vector: one token per program, each
    with its own adapter and rank, for decode (``mbgmv.py``).
MBGMM
    Multi-size Batched Gather Matrix-Matrix: tiles of BLOCK_M tokens of a
    segment (a run of tokens sharing an adapter) x rank, for prefill
    (``mbgmm.py``).

Per batch: ``token_lora`` int32 [T] (adapter of each token, -1 = none),
``lora_start`` int32 [L], ``lora_rank`` int32 [L], ``lora_scale`` fp32 [L]
(alpha / r). For token i with l = token_lora[i] >= 0 and r = lora_rank[l]:
``v[i, j] = sum_k x[i, k] A_l[j, k]`` (j < r, fp32 buffer [T, R_MAX]) and
``y[i, n] += lora_scale[l] * sum_j v[i, j] B_l[n, j]``. A rank-8 token does
rank-8 work. Fused slices (q,k,v or gate,up) pass one vector table per slice,
share lora_start/lora_rank (vector v means the same (adapter, rank index) in
every slice's table), use ``v`` [S, T, R_MAX] and write slice s of ``y``
[T, sum N_s] at column N_0 + .. + N_{s-1}.

Geometry, worked example
------------------------
Llama-2-7B in fp16, block_size 16, 32 KV heads x head_dim 128: one KV block
of one layer holds 2 * 16 * 32 * 128 = 131072 elements = 512 pages of D=256
(1024 of D=128). Widths 4096 (7B hidden), 11008 = 43 * 256 (7B MLP), 1024
(70B GQA k/v), 5120 and 13824 = 54 * 256 (13B) all divide by 256 (11008 does
not divide by 512, so D <= 256 for Llama). A rank-r adapter takes r * (K + N)
/ D pages per module; on q, k, v, o of 7B that is r * (4 * 4096 + 4 * 4096) /
256 = 128 r pages per layer: rank 8 -> 1024 pages (2 KV blocks), rank 16 ->
2048 pages (4 KV blocks), rank 64 -> 8192 pages (16 KV blocks).

Backends
--------
The ops run Triton kernels on CUDA tensors and the PyTorch reference
(``reference.py``, the spec) otherwise. ``VLLM_SLORA_KERNELS`` = ``triton``,
``torch`` or ``bmm`` (padded gather + torch.bmm, the S-LoRA ablation baseline;
``bmm.py``) forces one; it is read once, at import. With ``segments`` the
Triton path uses MBGMM, without it MBGMV; both equal the reference.
"""

import os
from collections.abc import Sequence

import torch

from vllm_slora.kernels import bmm, reference
from vllm_slora.kernels.reference import gather_adapter

__all__ = [
    "BACKENDS",
    "gather_adapter",
    "paged_lora",
    "paged_lora_expand",
    "paged_lora_shrink",
]

BACKENDS = ("triton", "torch", "bmm")
_FORCED = os.environ.get("VLLM_SLORA_KERNELS", "").strip().lower() or None
if _FORCED == "auto":  # vllm_slora.config's default: pick by device
    _FORCED = None
if _FORCED is not None and _FORCED not in BACKENDS:
    raise ValueError(f"VLLM_SLORA_KERNELS={_FORCED!r}; expected one of {BACKENDS}")

Tables = torch.Tensor | Sequence[torch.Tensor]
Segments = tuple[torch.Tensor, torch.Tensor] | None


def _backend(x: torch.Tensor) -> str:
    if _FORCED is not None:
        return _FORCED
    return "triton" if x.is_cuda else "torch"


def _slices(rows: Tables, buf: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(tables, buffer as [S, T, R_MAX]) for a single table or fused slices."""
    if isinstance(rows, torch.Tensor):
        return [rows], buf.unsqueeze(0)
    return list(rows), buf


def paged_lora_shrink(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_rows: Tables,
    lora_start: torch.Tensor,
    lora_rank: torch.Tensor,
    token_lora: torch.Tensor,
    out: torch.Tensor,
    segments: Segments = None,
) -> None:
    """out[i, :r] = x[i] @ A_l^T for each token i with adapter l >= 0 of rank r.

    Args:
        x: [T, K], fp16/bf16 (fp32 on CPU), contiguous rows.
        pool: [num_rows, D], x's dtype: one layer's page pool.
        a_rows: int32 [V, K // D], or a list of S tables (fused slices).
        lora_start, lora_rank: int32 [L].
        token_lora: int32 [T], -1 = no LoRA.
        out: fp32 [T, R_MAX] ([S, T, R_MAX] for fused slices); written only at
            [..., i, :rank] of LoRA tokens.
        segments: optional (seg_start int32 [NSEG+1], seg_lora int32 [NSEG]),
            runs of consecutive tokens sharing an adapter (must agree with
            token_lora); selects the MBGMM kernel.
    """
    backend = _backend(x)
    if backend == "torch":
        reference.paged_lora_shrink(x, pool, a_rows, lora_start, lora_rank, token_lora, out)
    elif backend == "bmm":
        bmm.paged_lora_shrink(x, pool, a_rows, lora_start, lora_rank, token_lora, out)
    else:
        from vllm_slora.kernels import mbgmm, mbgmv

        tables, out3 = _slices(a_rows, out)
        if segments is None:
            mbgmv.mbgmv_shrink(x, pool, tables, lora_start, lora_rank, token_lora, out3)
        else:
            mbgmm.mbgmm_shrink(x, pool, tables, lora_start, lora_rank, *segments, out3)


def paged_lora_expand(
    v: torch.Tensor,
    pool: torch.Tensor,
    b_rows: Tables,
    lora_start: torch.Tensor,
    lora_rank: torch.Tensor,
    lora_scale: torch.Tensor,
    token_lora: torch.Tensor,
    y: torch.Tensor,
    segments: Segments = None,
) -> None:
    """y[i] += lora_scale[l] * v[i, :r] @ B_l^T in place, for tokens with l >= 0.

    Args:
        v: fp32 [T, R_MAX] ([S, T, R_MAX] for fused slices); only [..., :r] read.
        pool: [num_rows, D], y's dtype.
        b_rows: int32 [V, N // D], or a list of S tables of widths N_s.
        lora_start, lora_rank: int32 [L]; lora_scale: fp32 [L].
        token_lora: int32 [T], -1 = no LoRA (y row left bit-unchanged).
        y: [T, N] ([T, sum N_s] for fused slices), contiguous rows.
        segments: as in ``paged_lora_shrink``.
    """
    backend = _backend(y)
    args = (pool, b_rows, lora_start, lora_rank, lora_scale, token_lora, y)
    if backend == "torch":
        reference.paged_lora_expand(v, *args)
    elif backend == "bmm":
        bmm.paged_lora_expand(v, *args)
    else:
        from vllm_slora.kernels import mbgmm, mbgmv

        tables, v3 = _slices(b_rows, v)
        if segments is None:
            mbgmv.mbgmv_expand(
                v3, pool, tables, lora_start, lora_rank, lora_scale, token_lora, y
            )
        else:
            mbgmm.mbgmm_expand(
                v3, pool, tables, lora_start, lora_rank, lora_scale, *segments, y
            )


def paged_lora(
    x: torch.Tensor,
    y: torch.Tensor,
    pool: torch.Tensor,
    a_rows: Tables,
    b_rows: Tables,
    lora_start: torch.Tensor,
    lora_rank: torch.Tensor,
    lora_scale: torch.Tensor,
    token_lora: torch.Tensor,
    segments: Segments = None,
    max_rank: int | None = None,
) -> None:
    """y += lora_scale * x @ A^T @ B^T per token: shrink then expand, in place.

    Shapes as in ``paged_lora_shrink`` / ``paged_lora_expand``. Allocates the
    fp32 buffer v [T, max_rank] ([S, T, max_rank] for fused slices). Pass
    ``max_rank`` (>= every lora_rank) to avoid the host sync that reading
    lora_rank.max() costs.
    """
    if max_rank is None:
        max_rank = max(int(lora_rank.max()), 1) if lora_rank.numel() else 1
    fused = not isinstance(a_rows, torch.Tensor)
    shape = (len(a_rows), x.shape[0], max_rank) if fused else (x.shape[0], max_rank)
    v = torch.empty(shape, dtype=torch.float32, device=x.device)
    paged_lora_shrink(x, pool, a_rows, lora_start, lora_rank, token_lora, v, segments)
    paged_lora_expand(
        v, pool, b_rows, lora_start, lora_rank, lora_scale, token_lora, y, segments
    )
