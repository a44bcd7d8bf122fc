"""Patch of ``vllm.v1.engine.core`` (vLLM 0.26-0.34): a per-step log for the benchmarks.

Why: an end-to-end point says how fast a system is, not where its steps'
time goes: how many tokens each step ran, how long each took, and whether
the engine's thread (scheduling, preparing and launching the forward,
processing outputs) or the GPU set the pace. vLLM's iteration stats reach
the front end with token counts but no times. The benchmarks need these for
every system alike (base, stock, the plugin).

What: only when ``VLLM_SLORA_STEP_LOG`` names a file (S-LoRA mode on or
off): the first ``EngineCore.step`` or ``step_with_batch_queue`` wraps, on
its own instance, the scheduler's ``schedule`` and ``update_from_output`` and the
executor's ``execute_model`` and ``sample_tokens`` with timers. Each
``update_from_output`` (a step's results are in) adds one record to a list
that is appended to the file every half second as JSON lines:
``[time, tokens, requests, decode requests, host seconds, and those of
each call, CPU seconds, plugin figures]``. The calls are the step's own:
its ``schedule`` (the call that returned its scheduler output), its
``execute_model`` (called with that output), the ``sample_tokens`` after it
and its ``update_from_output``. With async scheduling the next step is
scheduled and launched before this one's results are processed; until
2026-12-07 a record held the calls made since the previous record, so a
decode step's record carried the next step's launch (an eager prefill's
~20-45 ms on a 7B model) and the "slow decode steps" of the logs before
then are those launches. Host seconds are the engine thread's time in the
step's calls, CPU seconds the CPU time it used in them (host seconds well
above it: the thread waited, for an upload, a lock or the GIL; CUDA's
default sync spins, so a wait for the GPU counts as CPU), and plugin
figures, in S-LoRA mode, the plugin's own figures by name
(``vllm_slora.metrics.PER_STEP``: the engine thread's seconds applying
paging plans, building step metadata, waiting for uploads; the upload
lanes' seconds and uploads done): those that changed during the step's
calls, plus those that changed outside any timed call since the previous
record (the lanes work while the engine's thread waits). The step's period
is the time since the previous record; a period close to its host seconds
means the engine's thread, not the GPU, set the pace.
``benchmarks/steplog.py`` reads the file. With ``VLLM_SLORA_STEP_STACKS=1``
a thread also samples the engine thread's Python stack (``StackSampler``),
each sample counted to the step whose call runs (between calls: the oldest
launched step, whose output the thread waits for), the samples of slow
decode steps apart; ``benchmarks/stacks.py`` reads them.

Guard: vLLM 0.26-0.34; ``EngineCore.step`` and ``step_with_batch_queue``; a
scheduler or executor without the four methods wrapped fails the first step.
Goes away if vLLM's iteration stats gain step times.

``apply_pins`` (S-LoRA mode only; registered as
``vllm_v1_engine_core:apply_pins``). Why: vLLM's ``pin_lora`` pins an
adapter in the workers' LoRA slots, but in S-LoRA mode the scheduler's
``AdapterPool`` decides which adapters are resident, and the workers follow
its plans. What: ``EngineCore.add_lora`` tells the pool the adapter's path,
``pin_lora`` pins it there (``AdapterPool.pin_user``: paged in now, never
evicted, pins bounded by ``VLLM_SLORA_PIN_FRACTION`` of the blocks, a
``ValueError`` naming the adapter and the bound beyond), ``remove_lora``
unpins it; each then does what stock does. Guard: ``EngineCore.add_lora``,
``remove_lora``, ``pin_lora``. Goes away if vLLM's scheduler learns of pins.

``apply_precheck`` (S-LoRA mode only; registered as
``vllm_v1_engine_core:apply_precheck``). Why: the scheduler validates an
adapter's folder (``vllm_slora.adapters.check_adapter``: its config and
safetensors header, cached per file version) the first time one of its
requests is looked at, on the engine's thread; at 2,000 adapters that is
about one cold check (~1 ms, 7B shapes) a step, 3.6% of the engine thread
(H100, vLLM 0.34, stack samples), while the thread that receives requests
waits for the next one. What: ``EngineCore.preprocess_add_request``, which
vLLM runs in the engine core's input thread (in-process engines: in the
caller's), runs the same check on the request's adapter once the request is
built, so the scheduler's check finds it cached. An error is dropped there:
the scheduler's check raises it again and fails only that request, with
the cause, as before. Guard: ``EngineCore.preprocess_add_request``. Goes
away if vLLM validates LoRA adapters when a request arrives.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time

from vllm_slora.patches import guard_touches

TARGET = "vllm.v1.engine.core"
TOUCHES = {TARGET: ("EngineCore.step", "EngineCore.step_with_batch_queue")}
PIN_TOUCHES = {TARGET: ("EngineCore.add_lora", "EngineCore.remove_lora", "EngineCore.pin_lora")}
PRECHECK_TOUCHES = {TARGET: ("EngineCore.preprocess_add_request",)}
ENV = "VLLM_SLORA_STEP_LOG"
STACKS_ENV = "VLLM_SLORA_STEP_STACKS"
FLUSH_S = 0.5
# With stack samples on, the samples of a decode step whose own
# execute_model took longer than this are also counted apart ("slow_stacks"):
# a CUDA-graph decode step launches in ~2-4 ms (7B, H100); one that takes
# longer waited, for an adapter's upload or the GPU.
SLOW_STEP_S = 0.015


# The calls timed, in the order of a record's seconds after the total.
CALLS = ("schedule", "execute_model", "sample_tokens", "update_from_output")
# Steps scheduled and not yet updated, at most (vLLM keeps two in flight);
# older ones (an output never updated) are dropped.
OPEN_MAX = 16


class _Step:
    """One scheduler output's calls so far."""

    __slots__ = ("seconds", "cpu", "plugin", "samples", "launched")

    def __init__(self):
        self.seconds = dict.fromkeys(CALLS, 0.0)
        self.cpu = 0.0
        self.plugin: dict[str, float] = {}
        self.samples: dict[str, int] = {}  # stack samples (StackSampler)
        self.launched = False  # its execute_model ran: the thread may wait for its output


def _add(into: dict[str, float], now: dict[str, float], then: dict[str, float]) -> None:
    for k, v in now.items():
        d = v - then.get(k, 0.0)
        if d:
            into[k] = into.get(k, 0.0) + d


class StepLog:
    """Timers around an engine core's per-step calls, each counted to its
    step (the scheduler output it was called for), and the file they go to."""

    def __init__(self, path: str):
        self.path = path
        self.records: list[list] = []
        self.open: dict[int, tuple[object, _Step]] = {}  # id(scheduler output) -> its step
        self.last: _Step | None = None  # the step of the last execute_model (sample_tokens')
        self.running: _Step | None = None  # the step whose call runs now (the sampler reads it)
        self.mark: dict[str, float] = {}  # vllm_slora.metrics.PER_STEP at the last call's edge
        self.between: dict[str, float] = {}  # plugin figures outside the calls since the last record
        self.flushed = time.monotonic()
        self.sampler: StackSampler | None = None

    def step_of(self, out) -> _Step:
        got = self.open.get(id(out))
        if got is not None and got[0] is out:
            return got[1]
        step = _Step()
        self.open[id(out)] = (out, step)
        while len(self.open) > OPEN_MAX:
            self.open.pop(next(iter(self.open)))
        return step

    def awaited(self) -> _Step | None:
        """The step whose output the engine's thread waits for between
        calls: the oldest launched one."""
        for _, step in list(self.open.values()):
            if step.launched:
                return step
        return None

    def timed(self, fn, call: str, step_of):
        """``fn`` timed; ``step_of(args, result)`` names the step it ran for."""
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            plugin = self._plugin_now()
            _add(self.between, plugin, self.mark)
            step = step_of(args, None)
            # A schedule call's step is its result: its samples (stack
            # samples on) wait in ``pre``.
            pre = step if step is not None or self.sampler is None else _Step()
            self.running = pre
            started, cpu = time.perf_counter(), time.thread_time()
            result = None
            try:
                result = fn(*args, **kwargs)
                return result
            finally:
                seconds, cpu = time.perf_counter() - started, time.thread_time() - cpu
                self.running = None
                if step is None:
                    step = step_of(args, result)
                    if step is not None and pre is not None:
                        for stack, n in list(pre.samples.items()):
                            step.samples[stack] = step.samples.get(stack, 0) + n
                if step is not None:
                    step.seconds[call] += seconds
                    step.cpu += cpu
                    self.mark = self._plugin_now()
                    _add(step.plugin, self.mark, plugin)
                else:
                    self.mark = plugin
        return wrapper

    def step_done(self, scheduler_output) -> None:
        got = self.open.pop(id(scheduler_output), None)
        step = got[1] if got is not None and got[0] is scheduler_output else _Step()
        tokens = scheduler_output.total_num_scheduled_tokens
        if tokens:
            per_request = scheduler_output.num_scheduled_tokens
            decode = sum(1 for n in per_request.values() if n == 1)
            split = [round(step.seconds[c], 6) for c in CALLS]
            if self.sampler is not None:  # slow: a decode step, as benchmarks.steplog counts them
                self.sampler.step_done(step.samples, decode == len(per_request)
                                       and step.seconds["execute_model"] > SLOW_STEP_S)
            plugin = step.plugin
            _add(plugin, self.between, {})
            self.between = {}
            self.records.append([round(time.time(), 6), tokens, len(per_request), decode,
                                 round(sum(split), 6), *split, round(step.cpu, 6),
                                 {k: round(v, 6) for k, v in plugin.items()}])
        if time.monotonic() - self.flushed >= FLUSH_S:
            self.flush()

    @staticmethod
    def _plugin_now() -> dict[str, float]:
        """The plugin's figures (empty where it is not loaded in this process)."""
        metrics = sys.modules.get("vllm_slora.metrics")
        return dict(metrics.PER_STEP) if metrics is not None else {}

    def flush(self) -> None:
        self.flushed = time.monotonic()
        if not self.records:
            return
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in self.records))
        self.records = []


def install(core, path: str) -> StepLog:
    """Wrap ``core``'s scheduler and executor calls (instance attributes only)."""
    log = StepLog(path)
    scheduler, executor = core.scheduler, core.model_executor

    def launched(args, result):
        step = log.step_of(args[0]) if args else None
        if step is not None:
            step.launched = True
            log.last = step
        return step

    scheduler.schedule = log.timed(scheduler.schedule, "schedule",
                                   lambda args, result: None if result is None
                                   else log.step_of(result))
    executor.execute_model = log.timed(executor.execute_model, "execute_model", launched)
    executor.sample_tokens = log.timed(executor.sample_tokens, "sample_tokens",
                                       lambda args, result: log.last)
    stock_update = log.timed(scheduler.update_from_output, "update_from_output",
                             lambda args, result: log.step_of(args[0]) if args else None)

    @functools.wraps(stock_update)
    def update_from_output(scheduler_output, *args, **kwargs):
        out = stock_update(scheduler_output, *args, **kwargs)
        log.step_done(scheduler_output)
        return out

    scheduler.update_from_output = update_from_output
    if os.environ.get(STACKS_ENV, "").strip() not in ("", "0"):
        log.sampler = StackSampler(threading.get_ident(), path + ".stacks", log)
        log.sampler.start()
    return log


class StackSampler(threading.Thread):
    """``VLLM_SLORA_STEP_STACKS=1``: where the engine's thread is, sampled.

    Every ``INTERVAL_S`` it reads the engine thread's Python stack
    (``sys._current_frames``; no privileges, no native frames: a wait inside
    a C call shows as the Python line that made it; the ``DEPTH`` frames
    nearest the leaf) and counts it. A sample is also counted to a step:
    the one whose call runs (``StepLog.running``), else the oldest launched
    one (the thread waits for its output); when the step log closes a step
    (``step_done``), its samples are counted apart if it was a slow decode
    step (``SLOW_STEP_S``). Samples of no step (the engine idle) are only in
    the whole count. Every ``WRITE_S`` the counts go to ``<step log>.stacks`` as one
    JSON line ``{"t": wall time, "samples": n, "stacks": {"leaf;caller;...":
    count}, "slow_samples": m, "slow_stacks": {...}}``. Costs the engine
    about one GIL hand-over per sample: for diagnosis only.
    """

    INTERVAL_S, WRITE_S, DEPTH = 0.001, 2.0, 24

    def __init__(self, thread_id: int, path: str, log: StepLog):
        super().__init__(name="slora-stack-sampler", daemon=True)
        self.thread_id, self.path, self.log = thread_id, path, log
        self.counts: dict[str, int] = {}
        self.slow: dict[str, int] = {}
        self.done: list[tuple[dict[str, int], bool]] = []  # closed steps, not yet counted

    def step_done(self, samples: dict[str, int], slow: bool) -> None:
        """The engine's thread closed a step: its samples are counted as slow or not."""
        self.done.append((samples, slow))

    def sample(self, stack: str) -> None:
        self.counts[stack] = self.counts.get(stack, 0) + 1
        step = self.log.running or self.log.awaited()
        if step is not None:
            step.samples[stack] = step.samples.get(stack, 0) + 1

    def record(self) -> dict:
        """The counts since the last record (the steps closed so far), reset."""
        while self.done:
            step, slow = self.done.pop(0)
            if slow:
                for stack, n in step.items():
                    self.slow[stack] = self.slow.get(stack, 0) + n
        out = {"t": round(time.time(), 3), "samples": sum(self.counts.values()),
               "stacks": self.counts, "slow_samples": sum(self.slow.values()),
               "slow_stacks": self.slow}
        self.counts, self.slow = {}, {}
        return out

    def run(self) -> None:
        written = time.monotonic()
        while True:
            time.sleep(self.INTERVAL_S)
            frame = sys._current_frames().get(self.thread_id)
            if frame is None:
                return  # the engine's thread ended
            key = []
            while frame is not None and len(key) < self.DEPTH:
                code = frame.f_code
                key.append(f"{os.path.basename(code.co_filename)}:{frame.f_lineno}:{code.co_name}")
                frame = frame.f_back
            del frame
            self.sample(";".join(key))
            if time.monotonic() - written >= self.WRITE_S:
                with open(self.path, "a") as f:
                    f.write(json.dumps(self.record()) + "\n")
                written = time.monotonic()


def apply() -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    from vllm.v1.engine import core

    guard_touches(TOUCHES)
    EngineCore = core.EngineCore

    def logged(stock):
        @functools.wraps(stock)
        def step(self, *args, **kwargs):
            if getattr(self, "_slora_step_log", None) is None:
                self._slora_step_log = install(self, path)
            return stock(self, *args, **kwargs)
        return step

    # The engine core's own process loads plugins inside EngineCore.__init__,
    # before it binds step_fn to one of these: wrapping them is in time,
    # wrapping __init__ would not be.
    EngineCore.step = logged(EngineCore.step)
    EngineCore.step_with_batch_queue = logged(EngineCore.step_with_batch_queue)


def _pool_of(engine):
    """The scheduler's ``AdapterPool`` (None: S-LoRA mode off or no LoRA)."""
    scheduler = getattr(engine, "scheduler", None)
    return getattr(getattr(scheduler, "kv_cache_manager", None), "adapters", None)


def precheck(engine, request) -> None:
    """Validate ``request``'s adapter now (``AdapterPool.check``, cached per
    file version) so that the scheduler's check of it is a cache hit. Its
    errors are the scheduler's to report: dropped here."""
    pool = _pool_of(engine)
    lora = getattr(request, "lora_request", None)
    if pool is None or pool.check is None or lora is None or lora.lora_int_id <= 0:
        return
    try:
        pool.check(lora.lora_path)
    except Exception:  # noqa: BLE001 - raised again by the scheduler, for this request only
        pass


def apply_precheck() -> None:
    from vllm.v1.engine import core

    guard_touches(PRECHECK_TOUCHES)
    stock = core.EngineCore.preprocess_add_request

    @functools.wraps(stock)
    def preprocess_add_request(self, request):
        out = stock(self, request)
        precheck(self, out[0])
        return out

    core.EngineCore.preprocess_add_request = preprocess_add_request


def apply_pins() -> None:
    from vllm.v1.engine import core

    guard_touches(PIN_TOUCHES)
    EngineCore = core.EngineCore
    stock_add, stock_remove, stock_pin = EngineCore.add_lora, EngineCore.remove_lora, EngineCore.pin_lora

    @functools.wraps(stock_add)
    def add_lora(self, lora_request):
        if (pool := _pool_of(self)) is not None:
            pool.known[lora_request.lora_int_id] = lora_request.lora_path
        return stock_add(self, lora_request)

    @functools.wraps(stock_remove)
    def remove_lora(self, lora_id: int):
        if (pool := _pool_of(self)) is not None:
            pool.unpin_user(lora_id)
            pool.known.pop(lora_id, None)
        return stock_remove(self, lora_id)

    @functools.wraps(stock_pin)
    def pin_lora(self, lora_id: int):
        if (pool := _pool_of(self)) is not None:
            pool.pin_user(lora_id)
        return stock_pin(self, lora_id)

    EngineCore.add_lora, EngineCore.remove_lora, EngineCore.pin_lora = add_lora, remove_lora, pin_lora
