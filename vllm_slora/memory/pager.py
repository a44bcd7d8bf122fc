"""Worker side of unified paging: which adapters fill which pages, per step.

The ``Pager`` binds to the KV buffers viewed as pools (``kv_pools.py``),
applies the scheduler's plan (an adapter is uploaded into the pool rows of
the blocks the scheduler chose, ``uploads.py``; evicted ones are dropped),
keeps the vector tables (``vectors.py``), and writes each step's batch
metadata into the static buffers the layers read (``step.py``).
Vocabulary: ``vllm_slora/memory/layout.py``.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
import torch

from vllm.logger import init_logger

from vllm_slora import metrics
from vllm_slora.kernels import replay
from vllm_slora.memory.kv_pools import KVPools, block_chunks
from vllm_slora.memory.layout import GROUPS, AdapterMeta, PageGeometry
from vllm_slora.memory.messages import Evict, Load, PagingPlan
from vllm_slora.memory.read_ahead import ReadAhead
from vllm_slora.memory.step import StepBuffers, StepLimits
from vllm_slora.memory.uploads import RING_ELEMENTS, PinnedRing, Upload, Uploader
from vllm_slora.memory.vectors import VectorSpace, vector_capacity

logger = init_logger("vllm.plugins.vllm_slora")


@dataclass
class PagedAdapter:
    """An adapter in a worker's pages: its pool rows and vector range."""

    meta: AdapterMeta  # path, rank, kinds, scale
    start: int  # first vector
    rows: np.ndarray  # int64, the pool rows it fills (same in every layer)
    block_ids: list[int]
    copied: Upload | None = None  # its upload, until the engine's stream waited for it

    path = property(lambda self: self.meta.path)
    rank = property(lambda self: self.meta.rank)
    kinds = property(lambda self: self.meta.kinds)
    scale = property(lambda self: self.meta.scale)

    @functools.cached_property
    def group_ranks(self) -> tuple[int, ...]:
        """Its rank in each layer group (``GROUPS`` order), 0 where it has none."""
        return tuple(self.rank if kinds[0] in self.kinds else 0 for kinds in GROUPS.values())


@dataclass
class Batch:
    """The adapters of one step; their tensors are the pager's ``StepBuffers``."""

    lora_ids: list[int]
    # Largest rank per layer group this step (0: no adapter has the group, so
    # an eager forward skips it). For a capture, the static R_MAX everywhere:
    # a captured graph must launch every group's kernels.
    max_rank: dict[str, int]


class Pager:
    """Created with the model; ``bind`` (first plan, KV cache allocated) makes it usable."""

    def __init__(self, hf_config, dtype: torch.dtype, device: torch.device,
                 tp_size: int = 1, tp_rank: int = 0, kinds: frozenset[str] | None = None):
        self.hf_config = hf_config
        self.tp_size, self.tp_rank = tp_size, tp_rank
        metrics.set_tp_rank(tp_rank)
        self.dtype = dtype
        self.device = device
        self.geo: PageGeometry | None = None
        self.read_ahead = ReadAhead()
        # The module kinds LoRA applies to (--lora-target-modules; None: all).
        self.kinds = kinds
        self.vectors: VectorSpace | None = None
        self.resident: dict[int, PagedAdapter] = {}
        self.batch: Batch | None = None
        self.step: StepBuffers | None = None
        # This forward's kernels.group_by_adapter view of step.meta (or None),
        # set by the forward's first LoRA layer, read by all.
        self.meta: torch.Tensor | None = None
        self.scheduler_stats: dict = {}
        # lora_replays: LoRA calls of eager steps replayed (kernels/replay.py)
        self.counters = dict(loads=0, evictions=0, pages_written=0, lora_replays=0, upload_faults=0)
        # Adapters whose upload failed (a file changed or unreadable after the
        # scheduler checked it): their tokens get no LoRA until the scheduler
        # evicts them; the causes wait in ``_reports`` for ``take_faults``,
        # which the worker sends with its step output.
        self.faulted: dict[int, str] = {}
        self._reports: dict[int, str] = {}
        # Engine-thread seconds: applying the scheduler's plans, building
        # step metadata, and, within that, blocked on uploads (file reads
        # not done when the adapter is first used).
        self.seconds = dict(apply_s=0.0, set_batch_s=0.0, upload_wait_s=0.0)
        # The last recorded LoRA launches of an eager step per layer group:
        # group -> ((tokens, knobs), Replay) (kernels/replay.py); None where
        # the kernels are not Triton's.
        self.replays: dict | None = None
        self.kv: KVPools | None = None
        self.uploader: Uploader | None = None

    # -- binding to the KV buffers ------------------------------------------
    @property
    def bound(self) -> bool:
        return self.kv is not None

    @property
    def pools(self) -> list[torch.Tensor]:
        """Each layer's KV buffer viewed as a pool of pages (none before ``bind``)."""
        return self.kv.pools if self.kv is not None else []

    @property
    def kv_tensors(self) -> list[torch.Tensor]:
        return self.kv.kv_tensors if self.kv is not None else []

    def bind(self, kv_by_layer: dict[int, torch.Tensor], num_blocks: int,
             limits: StepLimits) -> None:
        """View every layer's KV buffer as a pool; fix the page geometry;
        allocate the vector tables and the per-step buffers (once)."""
        num_layers = self.hf_config.num_hidden_layers
        if sorted(kv_by_layer) != list(range(num_layers)):
            raise ValueError(f"vllm_slora found KV caches for layers {sorted(kv_by_layer)}, "
                             f"the model has {num_layers} layers")
        layouts = {block_chunks(kv, num_blocks) for kv in kv_by_layer.values()}
        if len(layouts) != 1:
            raise ValueError("vllm_slora needs the same KV block layout in every layer")
        layout = layouts.pop()
        offsets, _, chunk = layout
        self.geo = PageGeometry.create(self.hf_config, self.dtype, chunk * len(offsets),
                                       tp_size=self.tp_size, tp_rank=self.tp_rank)
        self.kv = KVPools([kv_by_layer[i] for i in range(num_layers)], layout, self.dtype,
                          self.geo.page_width)
        assert self.kv.rows_per_block == self.geo.rows_per_block
        self.vectors = VectorSpace(self.geo, self.device, vector_capacity(self.geo, num_blocks))
        self.step = StepBuffers(limits, self.device)
        self.uploader = Uploader(self.geo, self.pools)
        self._ring = PinnedRing(RING_ELEMENTS, self.device) if self.device.type == "cuda" else None
        if replay.enabled(self.step.token_lora):
            self.replays = {}

    def check_scheduler_geometry(self, stats: dict) -> None:
        mine = (self.geo.page_width, self.geo.rows_per_block)
        theirs = (stats.get("page_width"), stats.get("rows_per_block"))
        if mine != theirs:
            raise RuntimeError(f"page geometry differs: worker (D, pages per block) = {mine}, "
                               f"scheduler = {theirs}; this KV cache layout is not supported")

    def _send(self, values: np.ndarray) -> torch.Tensor:
        """int64 host values on the device, without waiting for queued steps:
        from pinned memory (a pageable copy would wait for them), through a
        ring made once (pinning a new tensor per copy cost ~1 ms of the
        engine's thread, cudaHostAlloc)."""
        if self._ring is None:
            return torch.from_numpy(values).to(self.device)
        return self._ring.send(values)

    # -- the scheduler's plan -----------------------------------------------
    def apply(self, plan: PagingPlan) -> None:
        started = time.perf_counter()
        try:
            self._apply(plan)
        finally:
            self._spent("apply_s", started)

    def _apply(self, plan: PagingPlan) -> None:
        """Evictions and loads in the plan's order. A load is reserved at once
        (vector range, table entries, on the host) and paged in with the
        plan's other loads (``_page_in``): one copy of rows and entries to
        the device and one table write per plan, not per adapter."""
        self.check_scheduler_geometry(plan.stats)
        self.scheduler_stats = plan.stats
        pending: list[tuple[int, PagedAdapter, float]] = []  # lora id, reserved, seconds
        for event in plan.events:
            if isinstance(event, Evict):
                if any(event.lora_id == lid for lid, *_ in pending):
                    self._page_in(pending)  # loaded and evicted in one plan
                self._evict(event.lora_id)
            else:
                started = time.perf_counter()
                res = self._reserve(event, pending)
                pending.append((event.lora_id, res, time.perf_counter() - started))
        self._page_in(pending)
        if plan.prefetch:
            self.read_ahead.prefetch(plan.prefetch)
        if plan.events:
            metrics.record("worker", self.read_ahead.counters)

    def _reserve(self, event: Load, pending: list[tuple[int, PagedAdapter, float]]) -> PagedAdapter:
        """A load's host side: metadata, pool rows, its vector range (the
        table entries queued); resident from now on, its upload not yet asked for."""
        if event.lora_id in self.resident:
            raise RuntimeError(f"scheduler paged in adapter {event.lora_id} twice")
        if event.meta is not None:  # as the scheduler read it when it checked the adapter
            meta = event.meta
            self.read_ahead.count(event.path)
        else:
            meta = self.read_ahead.meta(event.path).restricted(self.kinds)
        rows = self.kv.block_rows(event.block_ids)
        n = meta.rows(self.geo)
        if n > rows.size:
            raise RuntimeError(f"adapter '{event.path}' needs {n} pages, the scheduler gave "
                               f"{len(event.block_ids)} blocks = {rows.size} pages")
        rows = rows[:n]
        if self.vectors.find(meta.rank) is None and self.vectors.fits(meta.rank):
            self._page_in(pending)  # compaction moves written entries only
            moves = self.vectors.compact()
            for res in self.resident.values():
                res.start = moves[res.start]
        start = self.vectors.add(meta, rows)
        res = PagedAdapter(meta, start, rows, list(event.block_ids))
        self.resident[event.lora_id] = res
        return res

    def _page_in(self, pending: list[tuple[int, PagedAdapter, float]]) -> None:
        """The device side of the reserved loads in ``pending`` (emptied):
        their rows and table entries in one copy, the entries in place, the
        uploads queued (``uploads.py``: the upload overlaps this step's
        forward, off this thread; the engine's stream waits for it only
        where the adapter is first used, ``set_batch``, or its blocks are
        given back, ``_evict``. This is what makes the scheduler's early
        loads, prefetch, cost no step time)."""
        if not pending:
            return
        started = time.perf_counter()
        loads = [res for _, res, _ in pending]
        positions, values = self.vectors.pending()
        sizes = [res.rows.size for res in loads]
        n = sum(sizes)
        sent = self._send(np.concatenate([res.rows for res in loads] + [positions, values]))
        self.vectors.write(*sent[n:].split([positions.size, values.size]))
        uploads = self.uploader.submit_many([(res.meta, r)
                                             for res, r in zip(loads, sent[:n].split(sizes))])
        for res, upload in zip(loads, uploads):
            res.copied = upload
        self.counters["loads"] += len(loads)
        self.counters["pages_written"] += n * len(self.pools)
        share = (time.perf_counter() - started) / len(loads)
        for _, _, reserve_s in pending:
            metrics.observe_load(reserve_s + share)
        pending.clear()

    def _wait_copied(self, res: PagedAdapter, lora_id: int) -> None:
        if res.copied is None:
            return
        started = time.perf_counter()
        try:
            res.copied.wait(self.device)
        except Exception as e:  # noqa: BLE001 - the adapter's fault, not the engine's
            cause = f"adapter '{res.path}' could not be paged in: {type(e).__name__}: {e}"
            self.faulted[lora_id] = self._reports[lora_id] = cause
            self.counters["upload_faults"] += 1
            logger.error("vllm_slora: %s; its requests fail", cause)
        finally:
            res.copied = None
            self._spent("upload_wait_s", started)

    def take_faults(self) -> dict[int, str]:
        """Adapters whose upload failed since the last call: lora id -> cause."""
        out, self._reports = self._reports, {}
        return out

    def _evict(self, lora_id: int) -> None:
        res = self.resident.pop(lora_id)
        self._wait_copied(res, lora_id)
        self.faulted.pop(lora_id, None)
        self.vectors.remove(res.start)
        self.counters["evictions"] += 1

    # -- per step -----------------------------------------------------------
    def set_batch(self, token_ids: np.ndarray, dummy_ids: set[int]) -> None:
        """Batch metadata from the per-token LoRA ids the runner gives (0 = none).

        ``dummy_ids`` are the runner's dummy adapters (warm-up, CUDA-graph
        capture): their tokens get no LoRA, but the step still counts as a
        LoRA step, so that a capture records every layer's kernels.
        """
        started = time.perf_counter()
        try:
            self._set_batch(token_ids, dummy_ids)
        finally:
            self._spent("set_batch_s", started)

    def _set_batch(self, token_ids: np.ndarray, dummy_ids: set[int]) -> None:
        # The body of set_batch. Per adapter only dict lookups: a step of
        # 256 requests may hold 256 adapters.
        self.meta = None
        uniq, inverse = np.unique(token_ids, return_inverse=True)
        used = uniq > 0
        dummy = False
        if dummy_ids:
            dummies = used & np.isin(uniq, list(dummy_ids))
            dummy, used = bool(dummies.any()), used & ~dummies
        lora_ids = uniq[used].tolist()
        if not lora_ids and not dummy:
            self.batch = None
            return
        missing = [i for i in lora_ids if i not in self.resident]
        if missing:
            raise RuntimeError(f"adapters {missing} are used by this batch but not paged in; "
                               f"the scheduler's paging plan did not reach this worker")
        for i in lora_ids:
            self._wait_copied(self.resident[i], i)
        if self.faulted:  # their rows are not the adapter's: no LoRA for their tokens
            used &= ~np.isin(uniq, list(self.faulted))
            lora_ids = uniq[used].tolist()
            if not lora_ids and not dummy:
                self.batch = None
                return
        lut = np.full(uniq.size, -1, dtype=np.int32)
        lut[used] = np.arange(len(lora_ids), dtype=np.int32)
        res = [self.resident[i] for i in lora_ids]
        by_group = np.array([r.group_ranks for r in res], dtype=np.int32).reshape(-1, len(GROUPS))
        ranks = {g: by_group[:, j] for j, g in enumerate(GROUPS)}
        ranks_a = ranks
        if self.tp_size > 1:
            ranks_a = {g: [self.geo.a_vectors(kinds[0], int(r)) for r in ranks[g]]
                       for g, kinds in GROUPS.items()}
        self.step.write(lut[inverse.reshape(-1)], [r.start for r in res], ranks, ranks_a,
                        [r.scale for r in res])
        if dummy:
            max_rank = {g: self.step.limits.max_rank for g in GROUPS}
        else:
            max_rank = {g: int(v.max()) for g, v in ranks.items()}
        self.batch = Batch(lora_ids, max_rank)

    def _spent(self, name: str, started: float) -> None:
        seconds = time.perf_counter() - started
        self.seconds[name] += seconds
        metrics.add(name, seconds)

    def stats(self) -> dict:
        out = dict(self.counters, worker_resident_adapters=len(self.resident),
                   **{k: round(v, 3) for k, v in self.seconds.items()})
        if self.bound:
            out.update(vector_capacity=self.vectors.capacity, **self.read_ahead.stats(),
                       **self.uploader.counters)
        return out

