"""Unified paging: adapter weights in vLLM's KV-cache block pool.

Design: docs/unified-paging.md. Vocabulary: ``layout.py``.

- ``layout.py``: page geometry (D, pages per block, pages per adapter), PEFT
  metadata and packing.
- ``pool.py``: scheduler side, which adapters hold which blocks (refcounts,
  LRU of cached adapters, eviction, prefetch, counters).
- ``manager.py``: ``PagedKVCacheManager``, vLLM's KV-cache manager with
  adapter admission and eviction before "no room".
- ``plan.py``: the per-step scheduler -> worker message.
- ``read_ahead.py``: adapter files read ahead into the OS page cache.
- ``uploads.py``: adapter files to their pool rows, packed on the device,
  on a thread of its own.
- ``pager.py``: worker side, pools as views of the KV buffers, uploads, batch
  metadata. ``vectors.py``: the vector tables.
- ``worker_manager.py``: the model runner's LoRA manager in S-LoRA mode.
- ``stats.py``: the counters of a running ``vllm.LLM``.
"""
