"""Baseline: S-LoRA's padding ablation, gather then ``torch.bmm``.

Vocabulary and layout: see ``vllm_slora/kernels/__init__.py``.

The S-LoRA paper's baseline for heterogeneous ranks (section 5): copy each
adapter of the batch out of its pages once, zero-padded to the batch's
largest rank, into ``[U, r, W]`` (U adapters in the batch); pad each
adapter's tokens to the largest token count per adapter, ``[U, n, K]``; one
``torch.bmm`` per op. It does the largest rank's work for every adapter and
copies weights every call, which is what MBGMV/MBGMM avoid.

Sizing the padding reads two numbers of the batch on the host (its largest
rank, its largest token count per adapter), which a CUDA-graph capture
cannot do: under capture (and so in every replay) each token gathers its
own adapter padded to the largest rank allowed (``R_MAX``, the buffer's
width), ``[T, R_MAX, W]`` in chunks, the same function with more work.
"""

import torch

from vllm_slora.kernels.reference import Tables, as_tables, gather_rows

# Per-token gathered weights (under capture) are [T, R_MAX, W]: gather them
# this many bytes at a time so that a large prefill batch does not need tens of GB.
CHUNK_BYTES = 512 << 20


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _chunks(t: int, r_max: int, width: int, itemsize: int):
    step = max(1, CHUNK_BYTES // max(1, r_max * width * itemsize))
    return [slice(s, min(s + step, t)) for s in range(0, t, step)]


def _padded(pool, table, lora_start, lora_rank, r_max):
    """Vectors of the given adapters (one per row of ``lora_start``), zero-padded: [n, r_max, W]."""
    j = torch.arange(r_max, device=pool.device)
    valid = j[None, :] < lora_rank[:, None]
    vec = torch.where(valid, lora_start[:, None] + j[None, :], 0)
    w = gather_rows(pool, table.index_select(0, vec.reshape(-1)))
    w = w.view(*vec.shape, -1)
    return torch.where(valid[..., None], w, torch.zeros((), dtype=w.dtype, device=w.device))


class Padding:
    """The batch's adapters and their tokens, padded S-LoRA's way.

    ``tokens``: the indices of tokens with an adapter, grouped by adapter;
    ``group``/``slot``: each such token's adapter (0..U-1) and place in its
    group; ``rank``: the batch's largest rank; ``rows``: the largest group.
    """

    def __init__(self, token_lora, lora_start, lora_rank):
        has = token_lora >= 0
        used, group = torch.unique(token_lora[has].long(), return_inverse=True)
        order = torch.argsort(group, stable=True)
        self.tokens = torch.nonzero(has).squeeze(1)[order]
        self.group = group[order]
        counts = torch.bincount(self.group, minlength=used.numel())
        first = torch.cumsum(counts, 0) - counts
        self.slot = torch.arange(self.group.numel(), device=token_lora.device) - first[self.group]
        self.start, self.ranks = lora_start[used], lora_rank[used]
        self.rank = int(self.ranks.max()) if used.numel() else 0
        self.rows = int(counts.max()) if used.numel() else 0

    def weights(self, pool, table):
        """Each adapter's vectors, once, padded to the batch's largest rank: [U, rank, W]."""
        return _padded(pool, table, self.start, self.ranks, self.rank)

    def pad(self, x):
        """Tokens [T, C] -> [U, rows, C], zero where a group is shorter."""
        out = x.new_zeros(self.start.numel(), self.rows, x.shape[1])
        out[self.group, self.slot] = x[self.tokens]
        return out

    def unpad(self, padded):
        """[U, rows, C] -> the grouped tokens' rows, [T with an adapter, C]."""
        return padded[self.group, self.slot]


def paged_lora_shrink(x, pool, a_rows: Tables, lora_start, lora_rank, token_lora, out, segments=None):
    """Same contract as ``reference.paged_lora_shrink`` (writes out[..., :R_MAX])."""
    tables, fused = as_tables(a_rows)
    outs = out if fused else out.unsqueeze(0)
    if _capturing():
        return _shrink_per_token(x, pool, tables, lora_start, lora_rank, token_lora, outs)
    p = Padding(token_lora, lora_start, lora_rank)
    if not p.rank:
        return
    xs = p.pad(x)
    for table, o in zip(tables, outs):
        v = torch.bmm(xs, p.weights(pool, table).transpose(1, 2))  # [U, rows, rank]
        o[p.tokens, : p.rank] = p.unpad(v).float().to(o.dtype)


def paged_lora_expand(
    v, pool, b_rows: Tables, lora_start, lora_rank, lora_scale, token_lora, y, segments=None
):
    """Same contract as ``reference.paged_lora_expand``."""
    tables, fused = as_tables(b_rows)
    vs = v if fused else v.unsqueeze(0)
    if _capturing():
        return _expand_per_token(vs, pool, tables, lora_start, lora_rank, lora_scale, token_lora, y)
    p = Padding(token_lora, lora_start, lora_rank)
    if not p.rank:
        return
    # v past a token's rank may be stale or NaN: zero it, since 0 * NaN = NaN.
    rank = lora_rank[token_lora.clamp(min=0).long()]
    live = torch.arange(p.rank, device=v.device)[None, :] < rank[:, None]
    scale = lora_scale[token_lora[p.tokens].long()][:, None]
    col = 0
    for table, vv in zip(tables, vs):
        mine = torch.where(live, vv[:, : p.rank], 0.0).to(y.dtype)
        delta = p.unpad(torch.bmm(p.pad(mine), p.weights(pool, table))).float() * scale
        width = delta.shape[1]
        cols = y[p.tokens, col : col + width]
        y[p.tokens, col : col + width] = (cols.float() + delta).to(y.dtype)
        col += width


def _shrink_per_token(x, pool, tables, lora_start, lora_rank, token_lora, outs):
    """Under CUDA-graph capture: every token its own adapter, padded to R_MAX."""
    has = (token_lora >= 0)[:, None]
    idx = token_lora.clamp(min=0).long()
    for table, o in zip(tables, outs):
        width = table.shape[1] * pool.shape[1]
        for s in _chunks(x.shape[0], o.shape[-1], width, pool.element_size()):
            a = _padded(pool, table, lora_start[idx[s]], lora_rank[idx[s]], o.shape[-1])
            v = torch.bmm(a, x[s].unsqueeze(2)).squeeze(2).float()
            o[s].copy_(torch.where(has[s], v, o[s]))


def _expand_per_token(vs, pool, tables, lora_start, lora_rank, lora_scale, token_lora, y):
    r_max = vs.shape[-1]
    has = token_lora >= 0
    idx = token_lora.clamp(min=0).long()
    live = has[:, None] & (torch.arange(r_max, device=vs.device)[None, :] < lora_rank[idx][:, None])
    scale = lora_scale[idx][:, None]
    col = 0
    for table, vv in zip(tables, vs):
        vv = torch.where(live, vv, 0.0).to(y.dtype)
        width = table.shape[1] * pool.shape[1]
        for s in _chunks(y.shape[0], r_max, width, pool.element_size()):
            b = _padded(pool, table, lora_start[idx[s]], lora_rank[idx[s]], r_max)  # [t, R, N]
            delta = torch.bmm(vv[s].unsqueeze(1), b).squeeze(1).float() * scale[s]
            cols = y[s, col : col + width]
            cols.copy_(torch.where(has[s, None], (cols.float() + delta).to(y.dtype), cols))
        col += width
