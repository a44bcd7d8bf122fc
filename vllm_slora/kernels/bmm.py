"""Baseline: gather adapters into padded tensors, then torch.bmm.

Vocabulary and layout: see ``vllm_slora/kernels/__init__.py``.

This is the ablation of the S-LoRA paper (section 5): copy each token's
adapter out of its pages into a contiguous [T, R_MAX, W] tensor padded with
zeros to the largest rank and multiply with ``torch.bmm``. It does
max-rank work for every token and copies weights every call, which is what
MBGMV/MBGMM avoid. No host sync (R_MAX comes from the buffer shapes), so it
can also run under CUDA graphs.
"""

import torch

from vllm_slora.kernels.reference import Tables, as_tables, gather_rows

# Per-token gathered weights are [T, R_MAX, W]: gather them this many bytes at
# a time so that a large prefill batch does not need tens of GB.
CHUNK_BYTES = 512 << 20


def _chunks(t: int, r_max: int, width: int, itemsize: int):
    step = max(1, CHUNK_BYTES // max(1, r_max * width * itemsize))
    return [slice(s, min(s + step, t)) for s in range(0, t, step)]


def _padded(pool, table, lora_start, lora_rank, r_max):
    """Vectors of the given adapters (one per token), zero-padded: [t, r_max, W]."""
    j = torch.arange(r_max, device=pool.device)
    valid = j[None, :] < lora_rank[:, None]
    vec = torch.where(valid, lora_start[:, None] + j[None, :], 0)
    w = gather_rows(pool, table.index_select(0, vec.reshape(-1)))
    w = w.view(*vec.shape, -1)
    return torch.where(valid[..., None], w, torch.zeros((), dtype=w.dtype, device=w.device))


def paged_lora_shrink(x, pool, a_rows: Tables, lora_start, lora_rank, token_lora, out, segments=None):
    """Same contract as ``reference.paged_lora_shrink`` (writes out[..., :R_MAX])."""
    tables, fused = as_tables(a_rows)
    outs = out if fused else out.unsqueeze(0)
    has = (token_lora >= 0)[:, None]
    idx = token_lora.clamp(min=0).long()
    for table, o in zip(tables, outs):
        width = table.shape[1] * pool.shape[1]
        for s in _chunks(x.shape[0], o.shape[-1], width, pool.element_size()):
            a = _padded(pool, table, lora_start[idx[s]], lora_rank[idx[s]], o.shape[-1])
            v = torch.bmm(a, x[s].unsqueeze(2)).squeeze(2).float()
            o[s].copy_(torch.where(has[s], v, o[s]))


def paged_lora_expand(
    v, pool, b_rows: Tables, lora_start, lora_rank, lora_scale, token_lora, y, segments=None
):
    """Same contract as ``reference.paged_lora_expand``."""
    tables, fused = as_tables(b_rows)
    vs = v if fused else v.unsqueeze(0)
    r_max = vs.shape[-1]
    has = token_lora >= 0
    idx = token_lora.clamp(min=0).long()
    # v past a token's rank may be stale or NaN: zero it, since 0 * NaN = NaN.
    live = has[:, None] & (torch.arange(r_max, device=v.device)[None, :] < lora_rank[idx][:, None])
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
