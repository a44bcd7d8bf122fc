"""Unified paging: adapter weights in vLLM's KV-cache block pool.

Design: docs/unified-paging.md. Vocabulary: ``layout.py``.

Both sides:

- ``layout.py``: page geometry (D, pages per block, pages per adapter) and
  the vocabulary; ``adapter_files.py``: an adapter folder's metadata from its
  headers; ``packing.py``: an adapter's pages, packed per layer.
- ``messages.py``: the per-step scheduler -> worker message (``PagingPlan``)
  and the worker's answer (upload faults).

Scheduler side (engine core):

- ``adapter_pool.py``: which adapters hold which KV blocks (refcounts, LRU of
  cached adapters, eviction, prefetch, pins, counters).
- ``manager.py``: ``PagedKVCacheManager``, vLLM's KV-cache manager with
  adapter admission and eviction before "no room".

Worker side:

- ``worker_manager.py``: the model runner's LoRA manager in S-LoRA mode
  (wraps the projections, feeds the pager each step).
- ``pager.py``: applies plans, keeps the resident adapters, writes each
  step's batch metadata (``step.py``: static buffers, CUDA-graph safe).
- ``kv_pools.py``: the KV buffers viewed as pools of pages; a block's rows.
- ``vectors.py``: the vector tables (fixed capacity, compaction).
- ``uploads.py``: adapter files to their pool rows, packed on the device, on
  threads of their own; ``read_ahead.py``: files read ahead into the OS page
  cache.
- ``stats.py``: the counters of a running ``vllm.LLM``.
"""
