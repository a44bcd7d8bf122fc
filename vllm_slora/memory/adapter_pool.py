"""Scheduler side of unified paging: which adapters hold which KV blocks.

``AdapterPool`` takes blocks for adapters from vLLM's own ``BlockPool`` (the
one the KV cache uses) with ``get_new_blocks`` and gives them back with
``free_blocks``. A resident adapter is referenced by the running requests
that use it; when the last one finishes it stays resident (cached, like a
prefix-cached KV block) in an LRU, and is evicted only when the pool needs
its blocks. Every change is recorded as a plan event for the workers.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from vllm_slora import metrics
from vllm_slora.memory.adapter_files import read_adapter_meta
from vllm_slora.memory.layout import AdapterMeta, PageGeometry
from vllm_slora.memory.messages import Evict, Load, PagingPlan
from vllm_slora.memory.vectors import vector_capacity


class AdapterFault(Exception):
    """An adapter that cannot be paged in: its files are gone, unreadable or
    no longer a valid adapter of this model (replaced after registration),
    or it needs more blocks than the KV cache has. Only the requests that
    use it fail (``PagedKVCacheManager``); the engine goes on."""


def adapter_meta(path: str, check=None) -> AdapterMeta:
    """The ``AdapterMeta`` of an adapter (rank, module kinds, scale, file
    version): from ``check(path)`` where given (the header checks of
    ``vllm_slora.adapters``, cached per file version, which read all of it),
    else ``read_adapter_meta``; any error (disk, JSON, safetensors,
    validation) turned into an ``AdapterFault``. It travels to the workers
    with the adapter's ``Load``, so they do not read the files again."""
    try:
        return check(path).meta(path) if check is not None else read_adapter_meta(path)
    except Exception as e:  # noqa: BLE001 - every cause is the adapter's fault
        raise AdapterFault(f"adapter '{path}' cannot be paged in: {e}") from e


@dataclass
class AdapterBlocks:
    """An adapter resident in the scheduler's pool: its KV blocks and the
    running requests that reference it."""

    path: str
    blocks: list  # KVCacheBlock
    rank: int  # rank-vectors it takes in the workers' vector tables
    requests: set[str] = field(default_factory=set)


class SeparateRegion:
    """``VLLM_SLORA_UNIFY_MEM=0`` (S-LoRA's ablation): a fixed share of the
    blocks, taken from the ``BlockPool`` once at start and used for adapters
    only; KV blocks never come from it and adapters never leave it."""

    def __init__(self, block_pool, num_blocks: int):
        if not 0 < num_blocks < block_pool.get_num_free_blocks():
            raise ValueError(f"VLLM_SLORA_SEPARATE_FRACTION gives {num_blocks} adapter blocks "
                             f"of {block_pool.num_gpu_blocks}; choose a fraction in (0, 1)")
        self.held = block_pool.get_new_blocks(num_blocks)
        self.free = list(self.held)
        self.capacity = num_blocks
        # Block ids still address the whole KV buffer: the workers map pages
        # with the pool's full block count.
        self.num_gpu_blocks = block_pool.num_gpu_blocks

    def get_new_blocks(self, n: int) -> list:
        if n > len(self.free):
            raise ValueError(f"Cannot get {n} free blocks from the adapter region")
        out, self.free = self.free[:n], self.free[n:]
        return out

    def free_blocks(self, blocks) -> None:
        self.free.extend(blocks)

    def get_num_free_blocks(self) -> int:
        return len(self.free)


def usable_blocks(block_pool, whole: bool = False) -> int:
    """Blocks adapters may use (block 0 is vLLM's null block; a separate
    region holds only its share); unless ``whole``, the share users' pins may
    hold (``VLLM_SLORA_PIN_FRACTION`` of them)."""
    usable = getattr(block_pool, "capacity", block_pool.num_gpu_blocks - 1)
    if whole:
        return usable
    from vllm_slora.config import slora_config

    return int(slora_config().pin_fraction * usable)


class AdapterPool:
    """``block_pool``: vLLM's ``BlockPool`` (unified paging) or a ``SeparateRegion``."""

    def __init__(self, block_pool, geometry: PageGeometry, check=None,
                 kinds: frozenset[str] | None = None):
        self.block_pool = block_pool
        # The module kinds LoRA applies to (``layout.deployment_kinds`` of
        # --lora-target-modules; None: all): an adapter's others take no pages.
        self.kinds = kinds
        # check(path) validates the adapter's files for this model and returns
        # an ``adapters.AdapterInfo`` (see ``adapter_meta``); None: headers are
        # only read.
        self.check = check
        self.unified = not isinstance(block_pool, SeparateRegion)
        self.geo = geometry
        # The workers' vector tables hold this many resident rank-vectors.
        self.vector_capacity = vector_capacity(geometry, block_pool.num_gpu_blocks)
        self.resident: dict[int, AdapterBlocks] = {}
        self.unreferenced: OrderedDict[int, None] = OrderedDict()  # LRU, oldest first
        self.request_lora: dict[str, int] = {}
        # Pin counts: an adapter pinned by two callers stays pinned until both unpin.
        self.pinned: Counter[int] = Counter()
        # Users' pins (``pin_lora``): lora id -> its blocks; they hold at most
        # ``pin_limit`` blocks. ``known``: paths of registered adapters
        # (``add_lora``), which a pin pages in.
        self.user_pins: dict[int, int] = {}
        self.pin_limit = usable_blocks(block_pool)
        self.known: dict[int, str] = {}
        self.ever_evicted: set[int] = set()
        self.seen: set[int] = set()
        self.events: list[Load | Evict] = []
        self._step_meta: dict = {}  # path -> adapter_meta, this scheduling step's reads
        self._blocks = self._vectors = 0  # of the resident adapters: kept, not summed
        # Blocks of the unreferenced (cached) adapters, kept: ``evictable_blocks``
        # runs every step, and summing them scanned every cached adapter
        # (1.2 of the plugin's 5.3 ms of scheduling a step at 2,000 adapters,
        # ``benchmarks/sched_profile.py``). Changed only by _cache/_uncache.
        self._cached_blocks = 0
        # Loaded ahead and not yet used by a request; ``ahead_wasted`` counts
        # those evicted before any request used them (an upload for nothing).
        self.ahead: set[int] = set()
        # Loaded ahead and evicted unused: not loaded ahead again until a
        # request of theirs is admitted (they page in then). With the KV
        # cache full (2,000 adapters, H100), the next admission's adapter was
        # loaded, evicted by the running requests' growth before the
        # request could be admitted, and loaded again, step after step: 171
        # of 286 early loads were wasted and the uploads doubled.
        self.wasted: set[int] = set()
        self.counters = dict(loads=0, loaded_ahead=0, ahead_wasted=0, evictions=0, evictions_spared=0,
                             reloads=0, faults=0,
                             peak_adapters=0, peak_blocks=0, max_distinct_in_step=0,
                             schedules=0, schedule_s=0.0)  # steps scheduled, their seconds

    # -- queries ---------------------------------------------------------
    def meta(self, path: str):
        """``adapter_meta`` of ``path``, read (checked) once per scheduling
        step: admission, early loads and page-in ask for the same adapters
        several times a step (``take_plan`` forgets the step's reads)."""
        meta = self._step_meta.get(path)
        if meta is None:
            meta = adapter_meta(path, self.check).restricted(self.kinds)
            if not meta.kinds:
                raise AdapterFault(
                    f"adapter '{path}' has no LoRA weights on the modules --lora-target-modules "
                    f"names ({', '.join(sorted(self.kinds))}); load it into an engine whose "
                    f"--lora-target-modules covers its modules")
            self._step_meta[path] = meta
        return meta

    def blocks_for(self, path: str, meta=None) -> int:
        """KV blocks the adapter's pages take (``meta``: its ``adapter_meta``, if read)."""
        meta = meta or self.meta(path)
        blocks = self.geo.blocks_for(meta.rank, meta.kinds)
        usable = usable_blocks(self.block_pool, whole=True)
        if blocks > usable:
            raise AdapterFault(f"adapter '{path}' (rank {meta.rank}) needs {blocks} KV blocks, "
                             f"the KV cache has {usable}; give vLLM more KV cache memory "
                             f"or use a smaller rank")
        return blocks

    def holds(self, request_id: str) -> bool:
        return request_id in self.request_lora

    def blocks_missing(self, lora_id: int, path: str) -> int:
        """Blocks still to take before ``lora_id`` is resident."""
        return 0 if lora_id in self.resident else self.blocks_for(path)

    def evictable_blocks(self) -> int:
        """Blocks of cached adapters no request uses and nobody pinned
        (the cached blocks, kept, less the pinned ones: pins are few)."""
        pinned = sum(len(self.resident[i].blocks) for i in self.pinned if i in self.unreferenced)
        return self._cached_blocks - pinned

    def _cache(self, lora_id: int) -> None:
        """``lora_id`` (resident) is now unreferenced: most recently used if new there."""
        if lora_id not in self.unreferenced:
            self.unreferenced[lora_id] = None
            self._cached_blocks += len(self.resident[lora_id].blocks)

    def _uncache(self, lora_id: int) -> None:
        """``lora_id`` leaves the unreferenced adapters (used, evicted or dropped)."""
        if lora_id in self.unreferenced:
            del self.unreferenced[lora_id]
            self._cached_blocks -= len(self.resident[lora_id].blocks)

    @property
    def resident_blocks(self) -> int:
        return self._blocks

    # -- references --------------------------------------------------------
    def acquire(self, request_id: str, lora_id: int, path: str) -> None:
        """Reference ``lora_id`` for a request, paging it in if needed.

        The caller has checked that the missing blocks are free.
        """
        res = self.resident.get(lora_id) or self._page_in(lora_id, path)
        self.ahead.discard(lora_id)
        self.wasted.discard(lora_id)
        self._uncache(lora_id)
        res.requests.add(request_id)
        self.request_lora[request_id] = lora_id
        self.counters["peak_adapters"] = max(self.counters["peak_adapters"], len(self.resident))
        self.counters["peak_blocks"] = max(self.counters["peak_blocks"], self.resident_blocks)

    def load_ahead(self, upcoming: list[tuple[int, str]], keep_free: int,
                   protect: tuple[int, ...] = ()) -> None:
        """Page in adapters of the next waiting requests early (S-LoRA's prefetch).

        Cached adapters no upcoming request needs (nor one in ``protect``:
        those of requests further back) are evicted (LRU) to make
        room, as long as ``keep_free`` blocks stay free or evictable for KV.
        The early adapters wait cached (unreferenced, most recently used) and
        the worker copies them during the current step, off its critical path.
        One loaded ahead and evicted unused (``wasted``) waits for its request.
        """
        wanted = {lora_id for lora_id, _ in upcoming} | set(protect)
        for lora_id in wanted & self.unreferenced.keys():
            self.unreferenced.move_to_end(lora_id)
        missing = [(lora_id, path) for lora_id, path in upcoming
                   if lora_id not in self.resident and lora_id not in self.wasted]
        if not missing:
            return
        for lora_id in wanted:
            self.pin(lora_id)
        try:
            room = self.block_pool.get_num_free_blocks() + self.evictable_blocks()
            if room <= keep_free:
                return  # no adapter fits (each takes a block at least): none read or checked
            for lora_id, path in missing:
                try:
                    need = self.blocks_for(path)
                except AdapterFault:
                    continue  # its request fails at admission, with the cause
                if room - need < keep_free:
                    continue
                if not self._page_in_cached(lora_id, path, need):
                    break
                self.counters["loaded_ahead"] += 1
                self.ahead.add(lora_id)
                room -= need
        finally:
            for lora_id in wanted:
                self.unpin(lora_id)

    @property
    def resident_vectors(self) -> int:
        return self._vectors

    def kv_reserve(self, fraction: float) -> int:
        """Blocks that early loads must leave free for KV: ``fraction`` of the
        whole pool when adapters share it (unified paging), none in a
        separate region, which holds adapters only."""
        return int(fraction * self.block_pool.num_gpu_blocks) if self.unified else 0

    def _page_in_cached(self, lora_id: int, path: str, need: int) -> bool:
        """Page ``lora_id`` in as a cached (unreferenced, most recently used)
        adapter, evicting LRU cached ones until its ``need`` blocks are free;
        False, with nothing paged in, if they cannot be freed."""
        while self.block_pool.get_num_free_blocks() < need and self.evict_one():
            pass
        if self.block_pool.get_num_free_blocks() < need:
            return False
        self._page_in(lora_id, path)
        self._cache(lora_id)
        return True

    def _page_in(self, lora_id: int, path: str) -> AdapterBlocks:
        meta = self.meta(path)
        rank = meta.rank
        while self.resident_vectors + rank > self.vector_capacity:
            if not self.evict_one():
                raise RuntimeError(f"adapter '{path}' (rank {rank}) does not fit the vector "
                                   f"tables: {self.resident_vectors} of {self.vector_capacity} "
                                   f"rank-vectors are held by running requests")
        blocks = self.block_pool.get_new_blocks(self.blocks_for(path, meta))
        res = self.resident[lora_id] = AdapterBlocks(path, blocks, rank)
        self._blocks += len(blocks)
        self._vectors += rank
        self.events.append(Load(lora_id, path, [b.block_id for b in blocks], meta))
        self.counters["loads"] += 1
        self.counters["reloads"] += lora_id in self.ever_evicted
        self.seen.add(lora_id)
        return res

    def release(self, request_id: str) -> None:
        """Drop a finished or preempted request's reference; the adapter stays cached."""
        lora_id = self.request_lora.pop(request_id, None)
        if lora_id is None or lora_id not in self.resident:  # dropped by ``fault``
            return
        res = self.resident[lora_id]
        res.requests.discard(request_id)
        if not res.requests:
            self._cache(lora_id)

    def pin_user(self, lora_id: int) -> None:
        """Keep a registered adapter resident until ``unpin_user`` (vLLM's
        ``pin_lora``): paged in now if it is not, never evicted. Raises
        ``ValueError``, naming the adapter and the bound, if it is unknown or
        if pins would hold more than ``pin_limit`` blocks or do not fit now."""
        if lora_id in self.user_pins:
            return
        path = self.known.get(lora_id)
        if path is None:
            raise ValueError(f"cannot pin adapter {lora_id}: it is not registered (add_lora first)")
        need = len(self.resident[lora_id].blocks) if lora_id in self.resident else self.blocks_for(path)
        held = sum(self.user_pins.values())
        if held + need > self.pin_limit:
            raise ValueError(
                f"cannot pin adapter {lora_id} ('{path}'): it takes {need} KV blocks and pinned "
                f"adapters hold {held}; pins may hold at most {self.pin_limit} of the "
                f"{usable_blocks(self.block_pool, whole=True)} blocks (VLLM_SLORA_PIN_FRACTION)")
        if lora_id not in self.resident and not self._page_in_cached(lora_id, path, need):
            raise ValueError(f"cannot pin adapter {lora_id} ('{path}') now: its {need} KV blocks "
                             f"are not free (running requests hold them); try again later")
        self.pin(lora_id)
        self.user_pins[lora_id] = need

    def unpin_user(self, lora_id: int) -> None:
        """Undo ``pin_user``: the adapter stays cached, evictable again."""
        if self.user_pins.pop(lora_id, None) is not None:
            self.unpin(lora_id)

    def pin(self, lora_id: int) -> None:
        self.pinned[lora_id] += 1

    def unpin(self, lora_id: int) -> None:
        self.pinned[lora_id] -= 1
        if self.pinned[lora_id] <= 0:
            del self.pinned[lora_id]

    # -- eviction ------------------------------------------------------------
    def evict_one(self) -> bool:
        """Evict the least recently used unreferenced, unpinned adapter."""
        for lora_id in self.unreferenced:
            if lora_id not in self.pinned:
                break
        else:
            return False
        self._drop(lora_id)
        self.counters["evictions"] += 1
        return True

    def _drop(self, lora_id: int) -> AdapterBlocks:
        """Take ``lora_id`` out of the pool (and of the cached ones): its blocks
        back, an ``Evict`` for the workers."""
        self._uncache(lora_id)
        res = self.resident.pop(lora_id)
        if lora_id in self.ahead:
            self.ahead.discard(lora_id)
            self.wasted.add(lora_id)
            self.counters["ahead_wasted"] += 1
        self._blocks -= len(res.blocks)
        self._vectors -= res.rank
        self.block_pool.free_blocks(res.blocks)
        self.events.append(Evict(lora_id))
        self.ever_evicted.add(lora_id)
        return res

    def fault(self, lora_id: int) -> set[str]:
        """A worker could not page ``lora_id`` in (``Pager.take_faults``): drop
        it now (its blocks back to the pool, an ``Evict`` for the workers)
        and return the requests that were using it, which must fail. A later
        request of the adapter pages it in afresh, checking its files again."""
        if lora_id not in self.resident:
            return set()
        self.unpin_user(lora_id)  # a pin keeps a working adapter, not a broken one
        self.counters["faults"] += 1
        return set(self._drop(lora_id).requests)

    def evict_unreferenced(self) -> int:
        n = 0
        while self.evict_one():
            n += 1
        return n

    # -- per step ------------------------------------------------------------
    def take_plan(self, prefetch: list[str], distinct_in_step: int) -> PagingPlan:
        self.counters["max_distinct_in_step"] = max(
            self.counters["max_distinct_in_step"], distinct_in_step)
        events, self.events = self.events, []
        self._step_meta.clear()
        stats = self.stats()
        metrics.record("scheduler", stats)
        return PagingPlan(events=events, prefetch=prefetch, stats=stats)

    def stats(self) -> dict:
        blocks = self.resident_blocks
        return dict(self.counters,
                    schedule_s=round(self.counters["schedule_s"], 3),
                    resident_adapters=len(self.resident),
                    resident_blocks=blocks,
                    resident_pages=blocks * self.geo.rows_per_block,
                    cached_unreferenced=len(self.unreferenced),
                    distinct_adapters_seen=len(self.seen),
                    free_blocks=self.block_pool.get_num_free_blocks(),
                    num_gpu_blocks=self.block_pool.num_gpu_blocks,
                    page_width=self.geo.page_width,
                    rows_per_block=self.geo.rows_per_block)
