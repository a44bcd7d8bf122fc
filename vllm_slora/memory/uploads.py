"""Uploads: adapter files into their pool rows, packed on the device, off the engine's thread.

An adapter waits in host memory as its safetensors file, in the OS page
cache (``read_ahead.py`` asks the kernel to read it ahead). Paging it in
takes one host copy: the uploader thread reads the file a chunk at a time
into a ring of ``SLOTS`` pinned staging buffers (allocated once), sends each
chunk to a device buffer on the copy stream, packs the adapter there
(``layout.pack_file_bytes``: one gather over the file's bytes on the
device, or one per module kind and A or B where the file lacks some: B
transposed, dtype converted, this TP rank's shard) and scatters the pages
into their pool rows (one scatter for every layer where the layers' KV
share one allocation, vLLM 0.32+). Each launch is a hand-over of the GIL
between the lane and the engine's thread, which holds it most of a step:
inside the engine an upload took 21 ms of a lane where alone it took 7. The
engine's thread only queues the upload and, where the adapter is first
used, makes its stream wait for the upload's event (``Upload.wait``).

Why not a host cache of packed adapters: packing on the host wrote every
adapter into fresh memory, and first-touch page faults (or pinning it,
``cudaHostAlloc``) cost more than the copy and did not scale over threads:
about 17 adapters/s of 64 MB on 8 threads of an H200 host, where n = 1000
needs about 30/s (``benchmarks/adapter_load.py``). The engine's steps then
waited for reads.

Several uploads run at once, one per *lane* (a thread's ring of slots and
its own copy stream): one thread reading 64 MB files from the page cache
managed about 24 adapters/s inside an engine (H200, n = 2000), where
admissions asked for about 30/s, and the steps waited. The lanes take
uploads from one ``queue.SimpleQueue`` (a C queue: putting one in never
makes the engine's thread wait for a Python lock that a lane holds while
it waits for the GIL, as ``ThreadPoolExecutor.submit`` can), in the order
they were asked for; ``submit`` takes a plan's adapters at once, behind one
CUDA event.

Within an upload, the file's chunks are read by a pool of *reader*
threads shared by the lanes (``os.preadv`` at the chunk's offset, the GIL
let go), half the ring at a time, each half sent in one copy while the
other is read: one thread's copy from the page cache (about 3 GB/s) set an
upload's latency, ~22 ms for a 60 MB adapter at n = 2,000 on an H100,
where a step that admits a request waits for its adapter.

Ordering on CUDA: a lane's stream first waits for the work the engine had
queued when the upload was asked for (it may still read the adapter's
blocks as KV of finished requests); a slot is refilled only after the copy
that read it is done (its event). Uploads on different lanes may finish in
any order; rows are only reused after the pager has waited for the upload
that last wrote them (``Pager._evict``), so a later upload to the same rows
is queued behind it. Without CUDA (CPU, tests) the same chunks, slots and
packing run with plain copies, done by the time ``wait`` returns.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from vllm_slora import metrics
from vllm_slora.memory.adapter_files import ADAPTER_FILE
from vllm_slora.memory.layout import AdapterMeta, PageGeometry
from vllm_slora.memory.packing import pack_file_bytes, read_header

# Staging slots in a lane's ring: enough to overlap reading one with sending others.
SLOTS = 8
SLOT_BYTES = 8 << 20
# Uploads at once (lanes): 3 x 8 x 8 MB = 192 MB of pinned host memory.
LANES = 3
# Threads reading chunks into the lanes' slots (0: each lane reads its
# chunks itself, one after another).
READERS = 6
# Test hook: uploads of adapters whose path contains this fail as a disk
# error would, after the scheduler's checks passed (tests/paging/test_faults.py).
FAIL_UPLOADS = os.environ.get("VLLM_SLORA_TEST_FAIL_UPLOADS", "")


class Upload:
    """One adapter's upload, until the engine's stream has waited for it."""

    __slots__ = ("_done", "_event", "_error")

    def __init__(self):
        self._done = threading.Event()
        self._event: torch.cuda.Event | None = None
        self._error: BaseException | None = None

    def _finish(self, event=None, error: BaseException | None = None) -> None:
        self._event, self._error = event, error
        self._done.set()

    def wait(self, device: torch.device) -> None:
        """Block until the upload is queued (the file read), then make the
        current stream of ``device`` wait for its device work. Raises what
        the upload raised (a file that no longer matches its metadata)."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        if self._event is not None:
            torch.cuda.current_stream(device).wait_event(self._event)


class _Lane:
    """One upload at a time: a ring of pinned staging slots and a copy stream."""

    def __init__(self, device: torch.device, slots: int, slot_bytes: int):
        cuda = device.type == "cuda"
        # One pinned buffer cut into slots: adjacent slots go to the device in one copy.
        self.ring = torch.empty(slots * slot_bytes, dtype=torch.uint8, pin_memory=cuda)
        self.slots, self.slot_bytes = slots, slot_bytes
        ring = memoryview(self.ring.numpy())  # the slots the readers fill:
        self.views = [ring[i * slot_bytes:(i + 1) * slot_bytes] for i in range(slots)]
        self.freed: list[torch.cuda.Event | None] = [None] * slots
        self.next = 0
        self.stream = torch.cuda.Stream(device) if cuda else None


def _serve(todo: queue.SimpleQueue, lane: _Lane) -> None:
    """A lane's thread: uploads one at a time until told to stop (None).
    Inference mode (the pools are inference tensors), the device and the
    lane's stream are per thread: set once.

    A queued upload holds its uploader (the item's first field), so an
    uploader lives until every upload it queued is done; an idle lane holds
    none (``del``), so an uploader nobody else holds is then collected and
    its ``close`` queues the lanes' stops behind those uploads."""
    with torch.inference_mode(), contextlib.ExitStack() as scope:
        if lane.stream is not None:
            scope.enter_context(torch.cuda.device(lane.stream.device))
            scope.enter_context(torch.cuda.stream(lane.stream))
        while (item := todo.get()) is not None:
            owner, *args = item
            del item
            owner._one(lane, *args)
            del owner, args


def _stop(todo: queue.SimpleQueue, threads: list[threading.Thread],
          readers: ThreadPoolExecutor | None) -> None:
    """Stop the lanes once the uploads queued so far are done, then the readers."""
    for _ in threads:
        todo.put(None)
    for thread in threads:
        if thread is not threading.current_thread():  # the uploader freed by a lane
            thread.join(timeout=10)
    if readers is not None:
        readers.shutdown(wait=False)


def _as_one_tensor(pools: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Where every pool is rows of one storage (vLLM 0.32+: every layer's KV
    in one allocation): that storage as one ``[rows, D]`` tensor and each
    pool's first row in it (int64, on the pools' device); else None (one
    buffer per layer: a scatter per layer)."""
    first = pools[0]
    d, storage = first.shape[1], first.untyped_storage()
    if any(p.untyped_storage().data_ptr() != storage.data_ptr() or p.dtype != first.dtype
           or p.shape[1] != d or p.stride() != (d, 1) or p.storage_offset() % d
           for p in pools):
        return None
    flat = torch.empty(0, dtype=first.dtype, device=first.device)
    flat.set_(storage, 0, (storage.nbytes() // (d * first.element_size()), d))
    rows = torch.tensor([p.storage_offset() // d for p in pools], dtype=torch.int64)
    return flat, rows.to(first.device)


def _pread(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """``view`` filled from the file ``fd`` at ``offset`` (the GIL let go while reading)."""
    got, n = 0, len(view)
    while got < n:
        k = os.preadv(fd, [view[got:]], offset + got)
        if not k:
            raise ValueError(f"adapter file '{path}' ended {n - got} bytes early "
                             f"(changed while being read?)")
        got += k


class Uploader:
    def __init__(self, geo: PageGeometry, pools: list[torch.Tensor], slots: int = SLOTS,
                 slot_bytes: int = SLOT_BYTES, lanes: int = LANES, readers: int = READERS):
        """``pools``: each layer's pool [num_rows, D] in the adapter dtype."""
        self.geo = geo
        self.pools = pools
        self.device = pools[0].device
        self.cuda = self.device.type == "cuda"
        self.counters = dict(uploads=0, upload_chunks=0, upload_bytes=0, upload_latency_s=0.0,
                             upload_busy_s=0.0, uploads_done=0)
        self._lock = threading.Lock()
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        # The lanes' threads hold the uploader only through the uploads it
        # queued (``_serve``): once it is collected, or at exit, ``close``
        # stops them after those uploads (no lane inside a CUDA call while
        # the process ends).
        threads = [threading.Thread(target=_serve, name=f"slora-upload-{i}", daemon=True,
                                    args=(self._todo, _Lane(self.device, slots, slot_bytes)))
                   for i in range(lanes)]
        for thread in threads:
            thread.start()
        self._readers = (ThreadPoolExecutor(readers, thread_name_prefix="slora-read")
                         if readers else None)
        self._flat = _as_one_tensor(pools)
        self.close = weakref.finalize(self, _stop, self._todo, threads, self._readers)

    def submit(self, meta: AdapterMeta, rows: torch.Tensor) -> Upload:
        """Queue the adapter of ``meta`` into rows ``rows`` (int64 [meta.rows(geo)],
        on the pools' device, the same in every layer) of every pool."""
        return self.submit_many([(meta, rows)])[0]

    def submit_many(self, items: list[tuple[AdapterMeta, torch.Tensor]]) -> list[Upload]:
        """``submit`` of several adapters, uploaded in this order (as lanes
        free up), after the work queued on the current stream so far."""
        for meta, rows in items:
            if rows.numel() != meta.rows(self.geo):
                raise ValueError(f"adapter '{meta.path}' has {meta.rows(self.geo)} pages per "
                                 f"layer, got {rows.numel()} rows")
        queued = None
        if self.cuda and items:
            queued = torch.cuda.Event()
            queued.record(torch.cuda.current_stream(self.device))
        out, now = [], time.perf_counter()
        for meta, rows in items:
            upload = Upload()
            self._todo.put((self, upload, meta, rows, queued, now))
            out.append(upload)
        return out

    def _one(self, lane: _Lane, upload: Upload, meta, rows, queued, submitted: float) -> None:
        started = time.perf_counter()
        try:
            if not self.cuda:
                self._write(lane, meta, rows)
                upload._finish()
            else:
                lane.stream.wait_event(queued)
                rows.record_stream(lane.stream)  # made on the engine's stream
                self._write(lane, meta, rows)
                done = torch.cuda.Event()
                done.record(lane.stream)
                upload._finish(event=done)
        except Exception as e:  # the request's error, raised where it is waited for
            upload._finish(error=e)
        finished = time.perf_counter()
        with self._lock:
            # From submit to queued on the device, and of that, the lane's own
            # time (the rest: waiting for a free lane).
            for name, value in (("upload_latency_s", finished - submitted),
                                ("upload_busy_s", finished - started), ("uploads_done", 1)):
                self.counters[name] += value
                metrics.add(name, value)

    def _write(self, lane: _Lane, meta: AdapterMeta, rows: torch.Tensor) -> None:
        path = Path(meta.path) / ADAPTER_FILE
        if FAIL_UPLOADS and FAIL_UPLOADS in meta.path:
            raise OSError(f"[Errno 5] Input/output error: '{path}' (injected: VLLM_SLORA_TEST_FAIL_UPLOADS)")
        step = lane.slot_bytes
        with open(path, "rb", buffering=0) as f:
            header, start = read_header(f)
            size = max((e["data_offsets"][1] for e in header.values()), default=0)
            data = torch.empty(size, dtype=torch.uint8, device=self.device)
            self._read(lane, f.fileno(), start, size, data, path)
        packed = pack_file_bytes(meta, self.geo, data, header, device=self.device)
        if self._flat is not None:  # every layer's pages in one scatter
            flat, first_rows = self._flat
            index = (first_rows[:, None] + rows[None, :]).view(-1)
            flat.index_copy_(0, index, packed.view(-1, packed.shape[-1]))
        else:
            for layer, pool in enumerate(self.pools):
                pool.index_copy_(0, rows, packed[layer])
        with self._lock:
            self.counters["uploads"] += 1
            self.counters["upload_bytes"] += size
            self.counters["upload_chunks"] += -(-size // step)

    def _read(self, lane: _Lane, fd: int, start: int, size: int, data: torch.Tensor,
              path: Path) -> None:
        """The file's ``size`` bytes from ``start`` into ``data``, a chunk per
        slot, read by the readers (without readers, by this lane, one after
        another) and sent in runs: half the ring's slots, or up to its end,
        or the file's end, in one copy, while the next run is read into the
        other half."""
        step, half = lane.slot_bytes, max(1, lane.slots // 2)
        run: list = []  # (slot, lo, n, read) read or being read, not sent: adjacent slots
        try:
            for lo in range(0, size, step):
                i, n = self._free_slot(lane), min(step, size - lo)
                view = lane.views[i][:n]
                read = self._submit_read(fd, view, start + lo, path)
                if read is None:  # no readers (or stopped at exit): this lane reads it
                    _pread(fd, view, start + lo, path)
                run.append((i, lo, n, read))
                if len(run) == half or i == lane.slots - 1 or lo + n == size:
                    self._send(lane, data, run)
                    run = []
        finally:  # an error: no reader may still fill a slot (or use the file) after it
            for *_, read in run:
                if read is not None:
                    read.exception()

    def _submit_read(self, fd: int, view: memoryview, offset: int, path: Path):
        """The read queued to the readers, or None where there are none: at
        interpreter exit ``concurrent.futures`` stops every pool before
        ``close`` lets the lanes finish the uploads queued so far."""
        if self._readers is None:
            return None
        try:
            return self._readers.submit(_pread, fd, view, offset, path)
        except RuntimeError:  # "cannot schedule new futures after (interpreter) shutdown"
            return None

    @staticmethod
    def _free_slot(lane: _Lane) -> int:
        """The ring's next slot, once the copy that last read it is done."""
        i = lane.next
        lane.next = (i + 1) % lane.slots
        if lane.freed[i] is not None:
            lane.freed[i].synchronize()
            lane.freed[i] = None
        return i

    def _send(self, lane: _Lane, data: torch.Tensor, run: list) -> None:
        """A run of adjacent slots (once read) into ``data``, in one copy."""
        for *_, read in run:
            if read is not None:
                read.result()
        first, lo = run[0][0] * lane.slot_bytes, run[0][1]
        n = sum(n for _, _, n, _ in run)
        data[lo:lo + n].copy_(lane.ring[first:first + n], non_blocking=self.cuda)
        if self.cuda:
            event = torch.cuda.Event()
            event.record(lane.stream)
            for i, *_ in run:
                lane.freed[i] = event


# Elements of each pinned staging buffer of a plan's rows and table entries
# (8 of 512 KB): a plan of up to ~40 adapters of rank 64 on q,k,v,o of 7B.
RING_ELEMENTS = 1 << 16


class PinnedRing:
    """Host-to-device copies of small int64 arrays through pinned buffers
    made once: ``SLOTS`` buffers of ``capacity`` elements used in turn, each
    reused after its previous copy finished (an event; long ago, normally:
    one copy per paging plan). Larger arrays are pinned for their copy."""

    SLOTS = 8

    def __init__(self, capacity: int, device: torch.device):
        self.device = device
        self.host = [torch.empty(capacity, dtype=torch.int64).pin_memory()
                     for _ in range(self.SLOTS)]
        self.sent: list[torch.cuda.Event | None] = [None] * self.SLOTS
        self.next = 0

    def send(self, values: np.ndarray) -> torch.Tensor:
        n = values.size
        if n > self.host[0].numel():
            return torch.from_numpy(values).pin_memory().to(self.device, non_blocking=True)
        i, self.next = self.next, (self.next + 1) % self.SLOTS
        if self.sent[i] is not None:
            self.sent[i].synchronize()
        self.host[i][:n].numpy()[:] = values
        out = self.host[i][:n].to(self.device, non_blocking=True)
        self.sent[i] = torch.cuda.Event()
        self.sent[i].record()
        return out
