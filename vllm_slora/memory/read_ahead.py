"""``ReadAhead``: adapter files read ahead into the OS page cache, off the engine's thread.

Adapters wait in host memory as their safetensors files, in the page cache
that the kernel keeps of them; the uploader (``uploads.py``) packs them on
the device when they are paged in. So that its read is a memory copy and
not a disk read, ``prefetch`` asks the kernel to read a file ahead
(``posix_fadvise(WILLNEED)``: asynchronous readahead, no copy, no memory
of ours) as soon as the adapter is registered or the scheduler plans to
page it in. Counters: ``prefetched`` (files read ahead), ``hits`` /
``misses`` (page-ins of adapters whose files were / were not read ahead
before). An adapter's metadata is read with its file version
(``layout.read_adapter_meta``), so a folder replaced in place is paged in
as it is now.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_slora.memory.layout import ADAPTER_FILE, AdapterMeta, read_adapter_meta

# Paths remembered as read ahead (the oldest are forgotten first).
REMEMBERED = 1 << 16


class ReadAhead:
    def __init__(self, workers: int = 2):
        self.lock = threading.Lock()
        self.asked: OrderedDict[str, None] = OrderedDict()
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="slora-prefetch")
        self.counters = dict(prefetched=0, hits=0, misses=0)

    def prefetch(self, paths: list[str]) -> None:
        with self.lock:
            todo = [p for p in dict.fromkeys(paths) if p not in self.asked]
            for path in todo:
                self.asked[path] = None
            while len(self.asked) > REMEMBERED:
                self.asked.popitem(last=False)
        for path in todo:
            self.executor.submit(self._read_ahead, path)

    def meta(self, path: str) -> AdapterMeta:
        """The adapter's metadata (its files as they are now), counting a
        hit if its file was read ahead."""
        meta = read_adapter_meta(path)
        with self.lock:
            hit = path in self.asked
            self.counters["hits" if hit else "misses"] += 1
        return meta

    def drop(self, path: str) -> None:
        with self.lock:
            self.asked.pop(path, None)

    def _read_ahead(self, path: str) -> None:
        try:
            fd = os.open(Path(path) / ADAPTER_FILE, os.O_RDONLY)
        except OSError:
            return  # missing now: the page-in reports it, with its request
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
        with self.lock:
            self.counters["prefetched"] += 1

    def stats(self) -> dict:
        return dict(self.counters)
