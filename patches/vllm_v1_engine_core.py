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
each call, CPU seconds, plugin seconds]``, where host seconds are the
engine thread's time in those four calls since the previous record (with
async scheduling the next step's schedule and launch run before this
step's results are processed, so a record holds one step's worth of host
work, not exactly this step's), CPU seconds the CPU time the engine's thread
used in them (host seconds well above it: the thread waited, for the GPU,
a lock or the GIL), and plugin figures, in S-LoRA mode, the plugin's own
figures by name since the previous record (``vllm_slora.metrics.PER_STEP``:
the engine thread's seconds applying paging plans, building step metadata,
waiting for uploads; the upload lanes' seconds and uploads done). The step's
period is the time since the previous record; a period close to its host
seconds means the engine's thread, not the GPU, set the pace.
``benchmarks/steplog.py`` reads the file. With ``VLLM_SLORA_STEP_STACKS=1``
a thread also samples the engine thread's Python stack (``StackSampler``),
counting the samples of slow decode steps apart; ``benchmarks/stacks.py``
reads them.

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
# With stack samples on, the samples of a decode step whose execute_model
# took longer than this are also counted apart ("slow_stacks"): the steps that
# wait for the GPU to drain after requests end, or for an adapter's upload,
# took 46 ms of execute_model at n = 2,000 against ~10 in the others.
SLOW_STEP_S = 0.015


# The calls timed, in the order of a record's seconds after the total.
CALLS = ("schedule", "execute_model", "sample_tokens", "update_from_output")


class StepLog:
    """Timers around an engine core's per-step calls, and the file they go to."""

    def __init__(self, path: str):
        self.path = path
        self.records: list[list] = []
        self.seconds = dict.fromkeys(CALLS, 0.0)
        self.cpu = 0.0
        self.plugin: dict[str, float] = {}  # vllm_slora.metrics.PER_STEP at the last record
        self.flushed = time.monotonic()
        self.sampler: StackSampler | None = None

    def timed(self, fn, call: str):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[call] += time.perf_counter() - started
                self.cpu += time.thread_time() - cpu
        return wrapper

    def step_done(self, scheduler_output) -> None:
        tokens = scheduler_output.total_num_scheduled_tokens
        if tokens:
            per_request = scheduler_output.num_scheduled_tokens
            decode = sum(1 for n in per_request.values() if n == 1)
            split = [round(self.seconds[c], 6) for c in CALLS]
            if self.sampler is not None:  # slow: a decode step, as benchmarks.steplog counts them
                self.sampler.step_done(decode == len(per_request)
                                       and self.seconds["execute_model"] > SLOW_STEP_S)
            self.records.append([round(time.time(), 6), tokens, len(per_request), decode,
                                 round(sum(split), 6), *split, round(self.cpu, 6),
                                 self._plugin_figures()])
            self.seconds = dict.fromkeys(CALLS, 0.0)
            self.cpu = 0.0
        if time.monotonic() - self.flushed >= FLUSH_S:
            self.flush()

    def _plugin_figures(self) -> dict[str, float]:
        """The plugin's figures by name since the last record (empty where
        the plugin is not loaded in this process)."""
        metrics = sys.modules.get("vllm_slora.metrics")
        if metrics is None:
            return {}
        now = dict(metrics.PER_STEP)
        out = {k: round(v - self.plugin.get(k, 0.0), 6) for k, v in now.items()}
        self.plugin = now
        return out

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
    timed_schedule = log.timed(scheduler.schedule, "schedule")

    @functools.wraps(timed_schedule)
    def schedule(*args, **kwargs):
        if log.sampler is not None:  # a step's samples start here, not while the engine idles
            log.sampler.step_begin()
        return timed_schedule(*args, **kwargs)

    scheduler.schedule = schedule
    executor.execute_model = log.timed(executor.execute_model, "execute_model")
    executor.sample_tokens = log.timed(executor.sample_tokens, "sample_tokens")
    stock_update = log.timed(scheduler.update_from_output, "update_from_output")

    @functools.wraps(stock_update)
    def update_from_output(scheduler_output, *args, **kwargs):
        out = stock_update(scheduler_output, *args, **kwargs)
        log.step_done(scheduler_output)
        return out

    scheduler.update_from_output = update_from_output
    if os.environ.get(STACKS_ENV, "").strip() not in ("", "0"):
        log.sampler = StackSampler(threading.get_ident(), path + ".stacks")
        log.sampler.start()
    return log


class StackSampler(threading.Thread):
    """``VLLM_SLORA_STEP_STACKS=1``: where the engine's thread is, sampled.

    Every ``INTERVAL_S`` it reads the engine thread's Python stack
    (``sys._current_frames``; no privileges, no native frames: a wait inside
    a C call shows as the Python line that made it) and counts it; the
    samples of each step, from its ``schedule`` call (``step_begin``) until
    the step log closes it (``step_done``), are also kept, and those of a
    slow decode step (``SLOW_STEP_S``) counted apart. Every ``WRITE_S`` the counts go to ``<step log>.stacks`` as one
    JSON line ``{"t": wall time, "samples": n, "stacks": {"leaf;caller;...":
    count}, "slow_samples": m, "slow_stacks": {...}}``. Costs the engine
    about one GIL hand-over per sample: for diagnosis only.
    """

    INTERVAL_S, WRITE_S, DEPTH = 0.001, 2.0, 14

    def __init__(self, thread_id: int, path: str):
        super().__init__(name="slora-stack-sampler", daemon=True)
        self.thread_id, self.path = thread_id, path
        self.counts: dict[str, int] = {}
        self.slow: dict[str, int] = {}
        self.step: dict[str, int] = {}  # this step's samples so far
        self.done: list[tuple[dict[str, int], bool]] = []  # closed steps, not yet counted

    def step_begin(self) -> None:
        """The engine's thread starts a step: samples since the last step
        closed (waiting for requests, between steps) are not its own."""
        self.step = {}

    def step_done(self, slow: bool) -> None:
        """The engine's thread closed a step: its samples are counted as slow or not."""
        self.done.append((self.step, slow))
        self.step = {}

    def sample(self, stack: str) -> None:
        self.counts[stack] = self.counts.get(stack, 0) + 1
        step = self.step
        step[stack] = step.get(stack, 0) + 1

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
