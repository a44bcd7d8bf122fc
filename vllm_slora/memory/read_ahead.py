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
import queue
import threading
import weakref
from collections import OrderedDict
from pathlib import Path

from vllm_slora.memory.adapter_files import ADAPTER_FILE, read_adapter_meta
from vllm_slora.memory.layout import AdapterMeta

# Paths remembered as read ahead (the oldest are forgotten first).
REMEMBERED = 1 << 16


class ReadAhead:
    def __init__(self, workers: int = 2):
        self.lock = threading.Lock()
        self.asked: OrderedDict[str, None] = OrderedDict()
        self.counters = dict(prefetched=0, hits=0, misses=0)
        # Paths go to the workers through a C queue: the engine's thread never
        # waits there for a Python lock (ThreadPoolExecutor.submit's) that a
        # worker holds while it waits for the GIL.
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        threads = [threading.Thread(target=_serve, args=(self._todo, self.lock, self.counters),
                                    name=f"slora-prefetch-{i}", daemon=True)
                   for i in range(workers)]
        for thread in threads:
            thread.start()
        weakref.finalize(self, _stop, self._todo, len(threads))

    def prefetch(self, paths: list[str]) -> None:
        with self.lock:
            todo = [p for p in dict.fromkeys(paths) if p not in self.asked]
            for path in todo:
                self.asked[path] = None
            while len(self.asked) > REMEMBERED:
                self.asked.popitem(last=False)
        for path in todo:
            self._todo.put(path)

    def meta(self, path: str) -> AdapterMeta:
        """The adapter's metadata (its files as they are now), counting a
        hit if its file was read ahead."""
        meta = read_adapter_meta(path)
        self.count(path)
        return meta

    def count(self, path: str) -> None:
        """Count a page-in of ``path``: a hit if its file was read ahead."""
        with self.lock:
            hit = path in self.asked
            self.counters["hits" if hit else "misses"] += 1

    def drop(self, path: str) -> None:
        with self.lock:
            self.asked.pop(path, None)

    def stats(self) -> dict:
        return dict(self.counters)


def _serve(todo: queue.SimpleQueue, lock: threading.Lock, counters: dict) -> None:
    """A worker: reads ahead the paths it is given until told to stop (None)."""
    while (path := todo.get()) is not None:
        try:
            fd = os.open(Path(path) / ADAPTER_FILE, os.O_RDONLY)
        except OSError:
            continue  # missing now: the page-in reports it, with its request
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
        with lock:
            counters["prefetched"] += 1


def _stop(todo: queue.SimpleQueue, workers: int) -> None:
    for _ in range(workers):
        todo.put(None)
