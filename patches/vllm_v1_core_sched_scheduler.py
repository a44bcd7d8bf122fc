"""Patch of ``vllm.v1.core.sched.scheduler`` (vLLM 0.26-0.34): adapters in the KV pool.

Why: unified paging needs the scheduler's ``BlockPool`` to hold adapter pages
next to KV blocks, admission to count both, cached adapters to be evicted
before a running request is preempted, and the workers to learn which blocks
hold which adapter. vLLM has no hook for any of this; the scheduler code
itself stays unchanged (design: docs/unified-paging.md).

What:
- the module's ``KVCacheManager`` name -> ``PagedKVCacheManager`` (a subclass:
  ``allocate_slots`` with adapter admission and eviction, ``free`` releasing
  the request's adapter reference);
- ``Scheduler.__init__``: attaches the ``AdapterPool`` (paging only the
  module kinds ``--lora-target-modules`` names, if given) and gives the scheduler
  its own copy of ``lora_config`` with ``max_loras`` = the most requests it
  may run at once (``max_num_seqs``; since 0.31 ``max_num_active_reqs``), so the
  user's ``max_loras`` no longer bounds a batch (free pages do); workers keep
  the user's value, where it only sizes warm-up and CUDA-graph cases;
- ``Scheduler.schedule``: pages in the adapters of the next waiting requests
  (the scheduler's waiting queues, which differ between releases:
  ``WAITING_QUEUES``) early (prefetch; the workers copy them during the
  step, and the request that uses one a step later finds it uploaded): the
  next ``HEAD_AHEAD`` missing ones whenever vLLM's admission watermark stays
  free or evictable and the step did not preempt, those up to the
  ``LOAD_AHEAD``-th while a quarter of the blocks does and the step did not
  have to evict either (``load_early``; one loaded early and evicted
  unused waits for its request's admission); then it attaches this step's ``PagingPlan`` to the
  ``SchedulerOutput`` as ``.slora``; requests whose adapter could not be
  paged in (``PagedKVCacheManager.faults``: files removed or replaced after
  registration) go into the requests vLLM finishes with ``FINISHED_ERROR``
  at the end of the step (``grammar_compile_error_reqs``, which vLLM uses
  for grammars that fail to compile: a set up to 0.32; since 0.33 a dict of
  ``RequestError``, whose message, the cause, the front end raises as HTTP
  500): the request ends with finish reason ``error``, its blocks are
  freed, the engine goes on;
- ``Scheduler.update_from_output``: adapters a worker could not page in
  (``ModelRunnerOutput.slora_faults``, see ``vllm_v1_worker_lora_model_runner_mixin``) are
  dropped from the pool and the requests using them join the same set before
  stock ``update_from_output`` finishes it; the last output of each request
  failed for its adapter carries the cause as ``stop_reason`` (read by
  ``LLM.generate`` callers and, up to 0.32, by the front end's error reply,
  see ``vllm_v1_engine_output_processor``).

Guard: vLLM 0.26-0.34; ``TOUCHES`` and the ``allocate_slots`` parameters
used; ``KVCacheManager.watermark_blocks`` and ``LoRAConfig.target_modules``
read where present (without them: the quarter rule for every early load,
no restriction). Goes away
if vLLM gains a pluggable KV-cache manager and a scheduler-output extension.
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import time

from vllm_slora.activation import announce
from vllm_slora.patches import PatchTargetChanged, guard_touches

TARGET = "vllm.v1.core.sched.scheduler"
TOUCHES = {TARGET: ("KVCacheManager", "Scheduler.__init__", "Scheduler.schedule",
                    "Scheduler.update_from_output"),
           "vllm.v1.core.kv_cache_manager": ("KVCacheManager.allocate_slots",),
           "vllm.v1.engine": ("FinishReason.ERROR",),
           "vllm.outputs": ("RequestError@0.33-",)}
# Prefetch: the adapters of the next waiting requests, up to the LOAD_AHEAD-th
# not resident, are paged in early while KEEP_FREE of the blocks stay free
# or evictable (the resident ones among them kept); the files of those up to
# the HINT_AHEAD-th are read into the workers' host cache in the background.
# 12 ahead: at 2,000 adapters a step that finishes several requests admits
# several new adapters at once, and with 4 paged in early the engine's
# thread waited for uploads (9% of its time, H200).
# The first HEAD_AHEAD of them, the next admissions' adapters, need only
# vLLM's admission watermark left free or evictable, and are paged in after
# steps that evicted too: with the KV cache full (2,000 adapters) the
# quarter was never free, only 10% of the loads came early, and the engine's
# thread waited for uploads 26% of its time (H100, vLLM 0.34, stack samples).
# Measured (H100, before/after in one call): the upload wait fell (5.0 ->
# 3.7 ms a decode step at 2,000) but 171 of 286 early loads were evicted
# unused and loaded again, so an adapter evicted so now waits for its
# request (``AdapterPool.wasted``).
LOAD_AHEAD, HINT_AHEAD, KEEP_FREE, HEAD_AHEAD = 12, 32, 0.25, 2
SCAN_LIMIT = 256  # waiting requests looked at per step
# The scheduler's queues of waiting requests, roughly in the order it admits
# them: 0.26-0.30 ``waiting``, then ``skipped_waiting``; since 0.31 the
# requests that hold KV blocks first (``kv_holding_waiting``; skipped ones
# stay in their queue); 0.34 adds ``async_kv_waiting``.
WAITING_QUEUES = ("kv_holding_waiting", "waiting", "async_kv_waiting", "skipped_waiting")


def _waiting(scheduler):
    return itertools.chain.from_iterable(
        getattr(scheduler, name) for name in WAITING_QUEUES if hasattr(scheduler, name))


def _waiting_adapters(scheduler):
    """(lora id, path) of the adapters of the next waiting requests (the
    first ``SCAN_LIMIT``), in queue order, each once."""
    seen = set()
    for request in itertools.islice(_waiting(scheduler), SCAN_LIMIT):
        lora = request.lora_request
        if lora and lora.lora_int_id > 0 and lora.lora_int_id not in seen:
            seen.add(lora.lora_int_id)
            yield lora.lora_int_id, lora.lora_path


def _through_missing(adapters, pool, depth: int) -> list[tuple[int, str]]:
    """The first of ``adapters`` up to the ``depth``-th that is not resident.
    The resident ones are in it too: ``AdapterPool.load_ahead`` pins them
    while it pages the others in, so that an adapter further back in the
    queue is never paged in by evicting one that a nearer request waits for
    (which that request would then page in again)."""
    out, missing = [], 0
    for lora_id, path in adapters:
        out.append((lora_id, path))
        missing += lora_id not in pool.resident
        if missing >= depth:
            break
    return out


def _upcoming(scheduler, pool, depth: int) -> list[tuple[int, str]]:
    """The next waiting requests' adapters up to the ``depth``-th not resident."""
    return _through_missing(_waiting_adapters(scheduler), pool, depth)


def load_early(manager, upcoming: list[tuple[int, str]], evicted: bool) -> None:
    """Page in the adapters of the next waiting requests (``upcoming``, in
    queue order) before their requests are admitted: the first ``HEAD_AHEAD``
    missing ones while vLLM's admission watermark stays free or evictable,
    those up to the ``LOAD_AHEAD``-th, if this step did not have to evict
    (``evicted``), while ``KEEP_FREE`` of the blocks does."""
    pool = manager.adapters
    near = _through_missing(upcoming, pool, LOAD_AHEAD)
    watermark = getattr(manager, "watermark_blocks", None) if pool.unified else 0
    # The next admissions', never by evicting one a request up to the LOAD_AHEAD-th needs.
    if HEAD_AHEAD and watermark is not None:
        pool.load_ahead(_through_missing(upcoming, pool, HEAD_AHEAD), watermark,
                        protect=tuple(lora_id for lora_id, _ in near))
    if not evicted:
        pool.load_ahead(_through_missing(upcoming, pool, LOAD_AHEAD), pool.kv_reserve(KEEP_FREE))


def _distinct_adapters(scheduler, output) -> int:
    ids = set()
    for req_id in output.num_scheduled_tokens:
        lora = scheduler.requests[req_id].lora_request
        if lora is not None and lora.lora_int_id > 0:
            ids.add(lora.lora_int_id)
    return len(ids)


def _cause(scheduler, request_id: str, why: str) -> str:
    """The text a request failed for its adapter ends with: the adapter's name, then why."""
    request = scheduler.requests.get(request_id)
    lora = request.lora_request if request is not None else None
    return f"adapter '{lora.lora_name}' failed: {why}" if lora is not None else why


def _fail(scheduler, causes: dict[str, str]) -> None:
    """Have vLLM finish these requests (id -> why) with ``FINISHED_ERROR`` at
    the end of the step, through the requests it fails for grammars that do
    not compile: a set of ids up to 0.32; since 0.33 a dict of each one's
    ``RequestError``, which the front end raises (HTTP 500 with the cause)."""
    failed = scheduler.grammar_compile_error_reqs
    if isinstance(failed, set):
        failed.update(causes)
        return
    from vllm.outputs import RequestError

    for request_id, why in causes.items():
        failed.setdefault(request_id, RequestError(code="lora_adapter_error",
                                                   message=_cause(scheduler, request_id, why)))


def apply() -> None:
    from vllm.v1.core import kv_cache_manager
    from vllm.v1.core.sched import scheduler as sched

    guard_touches(TOUCHES)
    params = list(inspect.signature(kv_cache_manager.KVCacheManager.allocate_slots).parameters)
    if params[:2] != ["self", "request"] or "reserved_blocks" not in params:
        raise PatchTargetChanged(
            f"vllm_slora cannot patch KVCacheManager.allocate_slots: parameters {params} "
            f"lack 'request'/'reserved_blocks'; this patch targets vLLM 0.26-0.34")

    from vllm.v1.engine import FinishReason

    from vllm_slora.memory.manager import PagedKVCacheManager
    from vllm_slora.memory.messages import ATTR, FAULTS_ATTR

    sched.KVCacheManager = PagedKVCacheManager
    Scheduler = sched.Scheduler
    stock_init, stock_schedule = Scheduler.__init__, Scheduler.schedule
    stock_update = Scheduler.update_from_output

    @functools.wraps(stock_init)
    def __init__(self, vllm_config, *args, **kwargs):
        stock_init(self, vllm_config, *args, **kwargs)
        announce()  # the engine core's mode-on line, once vLLM's logging is set up
        if self.lora_config is None:
            return
        self.kv_cache_manager.enable_adapters(
            vllm_config.model_config.hf_text_config, self.lora_config.lora_dtype,
            tp_size=vllm_config.parallel_config.tensor_parallel_size,
            max_lora_rank=self.lora_config.max_lora_rank,
            target_modules=getattr(self.lora_config, "target_modules", None))
        if not isinstance(getattr(self, "grammar_compile_error_reqs", None), (set, dict)):
            raise PatchTargetChanged("vllm_slora fails requests through "
                                     "Scheduler.grammar_compile_error_reqs (a set up to vLLM "
                                     "0.32, a dict since 0.33), which this vLLM lacks")
        self.lora_config = copy.copy(self.lora_config)
        # Every request the scheduler may run at once (since 0.31 that can
        # exceed max_num_seqs: max_num_active_reqs).
        self.lora_config.max_loras = max(self.scheduler_config.max_num_seqs,
                                         getattr(self, "max_num_active_reqs", 0),
                                         self.lora_config.max_loras)

    @functools.wraps(stock_schedule)
    def schedule(self, *args, **kwargs):
        pool = self.kv_cache_manager.adapters
        evictions = pool.counters["evictions"] if pool is not None else 0
        started = time.perf_counter()
        output = stock_schedule(self, *args, **kwargs)
        if pool is not None:
            upcoming = _upcoming(self, pool, HINT_AHEAD)
            # A step that preempted is short of KV: no early loads. One that
            # evicted (admission made room) loads only the next admissions'.
            if not output.preempted_req_ids:
                load_early(self.kv_cache_manager, upcoming,
                           evicted=pool.counters["evictions"] != evictions)
            hints = [path for lora_id, path in upcoming if lora_id not in pool.resident]
            # Scheduling time per step, paging included (the plan's stats
            # carry the total so far, hence it stops before take_plan).
            pool.counters["schedule_s"] += time.perf_counter() - started
            pool.counters["schedules"] += 1
            setattr(output, ATTR, pool.take_plan(hints, _distinct_adapters(self, output)))
            _fail(self, self.kv_cache_manager.faults)
        return output

    @functools.wraps(stock_update)
    def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
        manager = self.kv_cache_manager
        faults = getattr(model_runner_output, FAULTS_ATTR, None)
        if faults and manager.adapters is not None:
            _fail(self, {r: manager.faults[r] for r in manager.worker_faults(faults)})
        # The causes of the requests failed for their adapter (finishing them frees them).
        causes = {r: _cause(self, r, manager.faults[r])
                  for r in self.grammar_compile_error_reqs if r in manager.faults}
        outputs = stock_update(self, scheduler_output, model_runner_output, *args, **kwargs)
        if causes:
            for batch in outputs.values():
                for out in batch.outputs:
                    if out.request_id in causes and out.finish_reason == FinishReason.ERROR:
                        out.stop_reason = causes[out.request_id]
        return outputs

    Scheduler.__init__ = __init__
    Scheduler.schedule = schedule
    Scheduler.update_from_output = update_from_output
