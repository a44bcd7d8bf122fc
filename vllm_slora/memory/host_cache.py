"""Worker-side host cache of packed adapters, with a byte budget.

Adapters wait here (pinned memory on CUDA, so copies to the device can be
asynchronous) until the scheduler pages them in. An entry is a packed
adapter (``layout.read_packed``: the PEFT folder's safetensors file copied
once into its pages). Least recently used entries are dropped when the
budget is exceeded; a dropped adapter is simply read from disk again, and
so is one whose files changed on disk since it was read
(``layout.file_version``): a folder replaced in place is never served from
its old packing. ``prefetch`` reads folders on background threads, several
at once, so that cold adapters' disk reads overlap the current step and
each other.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from vllm_slora.memory.layout import (AdapterMeta, PageGeometry, file_version,
                                      read_adapter_meta, read_packed)


class HostCache:
    def __init__(self, geometry: PageGeometry, budget_bytes: int, pin: bool,
                 workers: int | None = None):
        self.geo = geometry
        self.budget = budget_bytes
        self.pin = pin
        self.entries: OrderedDict[str, tuple[AdapterMeta, torch.Tensor]] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()
        self.pending: dict[str, Future] = {}
        # Reading and packing an adapter is mostly memory copies that release
        # the GIL: several run at once (a step that pages in hundreds of cold
        # adapters waits for the slowest of a few batches, not for all in turn).
        workers = workers or min(8, max(1, (os.cpu_count() or 2) // 2))
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="slora-prefetch")
        self.counters = dict(disk_reads=0, hits=0, misses=0, prefetched=0, dropped=0)

    def get(self, path: str, _count: bool = True) -> tuple[AdapterMeta, torch.Tensor]:
        """The packed adapter of ``path``, read from disk if not cached.

        ``hits``/``misses``: lookups found cached / not (a miss waits for the
        read, or for a background prefetch of it still in flight).
        """
        with self.lock:
            entry = self.entries.get(path)
            if entry is not None and entry[0].version != file_version(path):
                self.bytes -= self.entries.pop(path)[1].nbytes  # replaced on disk: stale
                entry = None
            if entry is not None:
                self.entries.move_to_end(path)
                if _count:
                    self.counters["hits"] += 1
                return entry
            future = self.pending.get(path)
            if _count:
                self.counters["misses"] += 1
        if future is not None:
            future.result()
            return self.get(path, _count=False)
        return self._load(path)

    def prefetch(self, paths: list[str]) -> None:
        with self.lock:
            todo = [p for p in paths if p not in self.entries and p not in self.pending]
            for path in todo:
                self.pending[path] = self.executor.submit(self._prefetch_one, path)

    def drop(self, path: str) -> None:
        with self.lock:
            entry = self.entries.pop(path, None)
            if entry is not None:
                self.bytes -= entry[1].nbytes

    def __contains__(self, path: str) -> bool:
        return path in self.entries

    def _prefetch_one(self, path: str) -> None:
        try:
            self._load(path)
            with self.lock:
                self.counters["prefetched"] += 1
        finally:
            with self.lock:
                self.pending.pop(path, None)

    def _load(self, path: str) -> tuple[AdapterMeta, torch.Tensor]:
        meta = read_adapter_meta(path)
        entry = (meta, read_packed(meta, self.geo, pin=self.pin))
        with self.lock:
            self.counters["disk_reads"] += 1
            old = self.entries.pop(path, None)
            if old is not None:
                self.bytes -= old[1].nbytes
            self.entries[path] = entry
            self.bytes += entry[1].nbytes
            self._shrink(keep=path)
        return entry

    def _shrink(self, keep: str) -> None:
        while self.bytes > self.budget and len(self.entries) > 1:
            path = next(iter(self.entries))
            if path == keep:
                self.entries.move_to_end(path)
                path = next(iter(self.entries))
            self.bytes -= self.entries.pop(path)[1].nbytes
            self.counters["dropped"] += 1

    def stats(self) -> dict:
        return dict(self.counters, host_adapters=len(self.entries), host_bytes=self.bytes)
