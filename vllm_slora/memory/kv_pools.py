"""Adapter pages inside vLLM's KV buffers: where a block's pages lie.

A touch point of vLLM 0.26 internals (listed in ``patches/README.md``): each
attention layer's ``static_forward_context[...].kv_cache`` tensor, whose
storage is viewed as a pool ``[num_rows, D]`` (same storage, no copy). The
layout of one block in that storage (``block_chunks``) gives the pool rows of
any block; a layout that cannot be split into whole pages per block stops
start-up with its shapes.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch


def block_chunks(kv: torch.Tensor, num_blocks: int) -> tuple[tuple[int, ...], int, int]:
    """Where a KV block lives in ``kv``'s storage, in bytes.

    Returns (offset of each chunk of block 0, block stride, chunk size). CPU_ATTN
    and FlashAttention keep a block in one chunk; a ``(2, num_blocks, ...)``
    layout gives two (K and V). A backend that splits the scheduler's block
    into k kernel blocks has a dimension of ``k * num_blocks``; block b is then
    kernel blocks ``b*k .. b*k+k-1``, adjacent in that dimension.
    """
    dims = [d for d in range(kv.dim()) if kv.shape[d] % num_blocks == 0]
    if not dims:
        raise ValueError(f"KV cache of shape {tuple(kv.shape)} has no dimension of "
                         f"{num_blocks} blocks; vllm_slora cannot page adapters into it")
    bd = max(dims, key=lambda d: kv.stride(d))
    per_block = kv.shape[bd] // num_blocks
    es = kv.element_size()
    outer = [d for d in range(kv.dim()) if d != bd and kv.stride(d) > kv.stride(bd)]
    inner = [d for d in range(kv.dim()) if d != bd and d not in outer]
    if int(np.prod([kv.shape[d] for d in inner])) != kv.stride(bd):
        raise ValueError(f"KV cache of shape {tuple(kv.shape)}, strides {kv.stride()} does not "
                         f"keep a block's bytes dense; vllm_slora cannot page adapters into it")
    offsets = tuple(
        (kv.storage_offset() + sum(i * kv.stride(d) for i, d in zip(idx, outer))) * es
        for idx in itertools.product(*[range(kv.shape[d]) for d in outer]))
    size = kv.stride(bd) * per_block * es
    return offsets, size, size


class KVPools:
    """Every layer's KV buffer viewed as a pool of pages, and the pool rows
    of a KV block (the same in every layer)."""

    def __init__(self, kv_by_layer: list[torch.Tensor], layout: tuple[tuple[int, ...], int, int],
                 dtype: torch.dtype, page_width: int):
        offsets, stride, chunk = layout
        row_bytes = page_width * torch.empty((), dtype=dtype).element_size()
        if chunk % row_bytes or stride % row_bytes or any(o % row_bytes for o in offsets):
            raise ValueError(f"KV block chunks of {chunk} bytes do not split into pages "
                             f"of {row_bytes} bytes (D={page_width})")
        self.kv_tensors = list(kv_by_layer)
        self.pools: list[torch.Tensor] = []
        for kv in self.kv_tensors:
            storage = kv.untyped_storage()
            pool = torch.empty(0, dtype=dtype, device=kv.device)
            pool.set_(storage, 0, (storage.nbytes() // row_bytes, page_width))
            self.pools.append(pool)
        rows = [o // row_bytes + j for o in offsets for j in range(chunk // row_bytes)]
        self.rows_per_block = len(rows)
        self._block0_rows = np.asarray(rows, dtype=np.int64)
        self._block_stride_rows = stride // row_bytes

    def block_rows(self, block_ids: list[int]) -> np.ndarray:
        """Pool rows (int64, host) of ``block_ids``, in block order."""
        ids = np.asarray(block_ids, dtype=np.int64)
        return (ids[:, None] * self._block_stride_rows + self._block0_rows[None, :]).reshape(-1)
