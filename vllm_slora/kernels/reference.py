"""PyTorch reference for the paged LoRA ops: the spec, and the CPU fallback.

Vocabulary and layout: see ``vllm_slora/kernels/__init__.py``.

Every op here computes in fp32 and rounds once when it writes ``y``; the
Triton kernels (``grouped.py``, the baseline ``testing/mbgmv.py``) are
tested against these functions. Work is vectorised per adapter (one ``index_select`` gathers an
adapter's A or B from its scattered pages, one matmul serves all its tokens),
so the Python loop runs over the distinct adapters of a call, never over
tokens. Finding those adapters reads ``token_lora`` on the host, which is
fine on CPU and is why the GPU path does not use this module.
"""

from collections.abc import Sequence

import torch

Tables = torch.Tensor | Sequence[torch.Tensor]


def gather_rows(pool: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Unpage vectors: ``rows`` int [n, W//D] -> the n vectors, [n, W], pool dtype."""
    n, chunks = rows.shape
    return pool.index_select(0, rows.reshape(-1).long()).view(n, chunks * pool.shape[1])


def gather_adapter(
    pool: torch.Tensor,
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    start: int,
    rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy one adapter's A and B out of its pages.

    Args:
        pool: [num_rows, D], fp16/bf16/fp32, the page pool of one layer.
        a_rows: int32 [V, K//D], vector table of the A-vectors.
        b_rows: int32 [V, N//D], vector table of the B-vectors.
        start, rank: the adapter's first vector and its rank r.

    Returns:
        A [r, K] and B [N, r], pool dtype (B is a transposed view).
    """
    a = gather_rows(pool, a_rows[start : start + rank])
    b = gather_rows(pool, b_rows[start : start + rank]).t()
    return a, b


def as_tables(rows: Tables) -> tuple[list[torch.Tensor], bool]:
    """(list of vector tables, whether the caller passed fused slices)."""
    if isinstance(rows, torch.Tensor):
        return [rows], False
    return list(rows), True


def _adapter_groups(token_lora: torch.Tensor, lora_start, lora_rank):
    """Yield (adapter, token indices, start, rank) for each adapter in the batch."""
    starts, ranks = lora_start.tolist(), lora_rank.tolist()
    for lora in torch.unique(token_lora).tolist():
        if lora < 0 or ranks[lora] == 0:
            continue
        idx = (token_lora == lora).nonzero().squeeze(1)
        yield lora, idx, starts[lora], ranks[lora]


def paged_lora_shrink(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_rows: Tables,
    lora_start: torch.Tensor,
    lora_rank: torch.Tensor,
    token_lora: torch.Tensor,
    out: torch.Tensor,
    segments=None,
) -> None:
    """out[i, j] = sum_k x[i, k] * A_l[j, k] for l = token_lora[i] >= 0, j < rank[l].

    Args:
        x: [T, K], pool dtype.
        pool: [num_rows, D].
        a_rows: int32 [V, K//D], or a list of S such tables (fused slices).
        lora_start, lora_rank: int32 [L].
        token_lora: int32 [T], -1 = no LoRA.
        out: fp32 [T, R_MAX], or [S, T, R_MAX] for fused slices. Only
            out[..., i, :rank] of tokens with an adapter is written.
        segments: ignored here (the result does not depend on it).
    """
    tables, fused = as_tables(a_rows)
    outs = out if fused else out.unsqueeze(0)
    for _, idx, start, rank in _adapter_groups(token_lora, lora_start, lora_rank):
        xs = x.index_select(0, idx).float()
        for table, o in zip(tables, outs):
            a = gather_rows(pool, table[start : start + rank]).float()
            o[idx, :rank] = xs @ a.t()


def paged_lora_expand(
    v: torch.Tensor,
    pool: torch.Tensor,
    b_rows: Tables,
    lora_start: torch.Tensor,
    lora_rank: torch.Tensor,
    lora_scale: torch.Tensor,
    token_lora: torch.Tensor,
    y: torch.Tensor,
    segments=None,
) -> None:
    """y[i, n] += scale[l] * sum_{j < rank[l]} v[i, j] * B_l[n, j], in place.

    Args:
        v: fp32 [T, R_MAX], or [S, T, R_MAX] for fused slices; only
            v[..., :rank] is read.
        pool: [num_rows, D].
        b_rows: int32 [V, N//D], or a list of S tables (slice s has width N_s).
        lora_start, lora_rank: int32 [L]; lora_scale: fp32 [L].
        token_lora: int32 [T], -1 = no LoRA (its y row is left untouched).
        y: [T, sum N_s], pool dtype; slice s occupies the columns after
            slices 0..s-1.
        segments: ignored here.
    """
    tables, fused = as_tables(b_rows)
    vs = v if fused else v.unsqueeze(0)
    scales = lora_scale.tolist()
    for lora, idx, start, rank in _adapter_groups(token_lora, lora_start, lora_rank):
        scale = scales[lora]
        col = 0
        for table, vv in zip(tables, vs):
            width = table.shape[1] * pool.shape[1]
            b = gather_rows(pool, table[start : start + rank]).float()
            delta = vv.index_select(0, idx)[:, :rank] @ b
            cols = y[:, col : col + width]
            cols[idx] = (cols.index_select(0, idx).float() + scale * delta).to(y.dtype)
            col += width


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
    segments=None,
) -> None:
    """y += scale * x @ A^T @ B^T per token (shrink then expand), in place."""
    tables, fused = as_tables(a_rows)
    max_rank = max(int(lora_rank.max()), 1) if lora_rank.numel() else 1
    v = torch.empty(len(tables), x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    v = v if fused else v[0]
    paged_lora_shrink(x, pool, a_rows, lora_start, lora_rank, token_lora, v)
    paged_lora_expand(v, pool, b_rows, lora_start, lora_rank, lora_scale, token_lora, y)
