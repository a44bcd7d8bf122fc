"""Adapter pages inside vLLM's KV buffers: where a block's pages lie.

A touch point of vLLM internals (listed in ``patches/README.md``): each
attention layer's ``static_forward_context[...].kv_cache`` tensor, whose
storage is viewed, from where that layer's view begins, as a pool
``[num_rows, D]`` (same storage, no copy). Up to 0.31 each layer has a
buffer of its own; since 0.32 every layer's KV is a view into one shared
allocation, each at its own offset. The layout of one block relative to
its layer's start (``block_chunks``), the same in every layer, gives the
pool rows of any block; a layout that cannot be split into whole pages per
block stops start-up with its shapes.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

# vLLM internals this module relies on (the drift check's list): where the
# KV buffers the layers view are allocated.
TOUCHES = {
    "vllm.v1.worker.utils": ("allocate_kv_cache@0.29-", "bind_kv_cache"),
}


def block_chunks(kv: torch.Tensor, num_blocks: int) -> tuple[tuple[int, ...], int, int]:
    """Where a KV block lives in ``kv``, in bytes from where ``kv`` begins in
    its storage (``base_bytes``).

    Returns (offset of each chunk of block 0, block stride, chunk size). CPU_ATTN
    and FlashAttention keep a block in one chunk; a ``(2, num_blocks, ...)``
    layout gives two (K and V). A backend that splits the scheduler's block
    into k kernel blocks has a dimension of ``k * num_blocks``; block b is then
    kernel blocks ``b*k .. b*k+k-1``, adjacent in that dimension. The block
    stride may exceed the chunk (blocks of every layer interleaved in one
    allocation, padded pages): the bytes between belong to others.
    """
    dims = [d for d in range(kv.dim()) if kv.shape[d] % num_blocks == 0]
    if not dims:
        raise ValueError(f"KV cache of shape {tuple(kv.shape)} has no dimension of "
                         f"{num_blocks} blocks; vllm_slora cannot page adapters into it")
    bd = max(dims, key=lambda d: kv.stride(d))
    per_block = kv.shape[bd] // num_blocks
    es = kv.element_size()
    outer = [d for d in range(kv.dim()) if d != bd and kv.stride(d) > kv.stride(bd)]
    inner = sorted((d for d in range(kv.dim()) if d != bd and d not in outer),
                   key=lambda d: kv.stride(d))
    dense = 1
    for d in inner:
        if kv.shape[d] > 1 and kv.stride(d) != dense:
            dense = -1
            break
        dense *= kv.shape[d]
    if dense < 0 or (per_block > 1 and kv.stride(bd) != dense):
        raise ValueError(f"KV cache of shape {tuple(kv.shape)}, strides {kv.stride()} does not "
                         f"keep a block's bytes dense; vllm_slora cannot page adapters into it")
    offsets = tuple(
        sum(i * kv.stride(d) for i, d in zip(idx, outer)) * es
        for idx in itertools.product(*[range(kv.shape[d]) for d in outer]))
    return offsets, kv.stride(bd) * per_block * es, dense * per_block * es


def base_bytes(kv: torch.Tensor) -> int:
    """Where ``kv`` begins in its storage, in bytes."""
    return kv.storage_offset() * kv.element_size()


class KVPools:
    """Every layer's KV buffer viewed, from where the layer's view begins, as
    a pool of pages, and the pool rows of a KV block (the same in every
    layer)."""

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
            storage, base = kv.untyped_storage(), base_bytes(kv)
            if base % row_bytes:
                raise ValueError(f"a layer's KV view begins {base} bytes into its buffer, "
                                 f"not a whole number of pages of {row_bytes} bytes")
            pool = torch.empty(0, dtype=dtype, device=kv.device)
            pool.set_(storage, base // pool.element_size(),
                      ((storage.nbytes() - base) // row_bytes, page_width))
            self.pools.append(pool)
        rows = [o // row_bytes + j for o in offsets for j in range(chunk // row_bytes)]
        self.rows_per_block = len(rows)
        self._block0_rows = np.asarray(rows, dtype=np.int64)
        self._block_stride_rows = stride // row_bytes

    def block_rows(self, block_ids: list[int]) -> np.ndarray:
        """Pool rows (int64, host) of ``block_ids``, in block order."""
        ids = np.asarray(block_ids, dtype=np.int64)
        return (ids[:, None] * self._block_stride_rows + self._block0_rows[None, :]).reshape(-1)
