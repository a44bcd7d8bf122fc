"""Patch of ``vllm.v1.worker.gpu_worker`` (vLLM 0.26-0.34): apply the paging plan.

Why: the scheduler decides which KV blocks hold which adapter and sends the
decision as ``scheduler_output.slora`` (see ``vllm_v1_core_sched_scheduler``);
the worker must copy adapters into those blocks before the step's forward.
``Worker.execute_model`` receives every step's scheduler output on CUDA (V1
and V2 runners) and on CPU (``CPUWorker`` inherits it), so one hook there
covers every runner.

What: ``Worker.execute_model`` first hands ``scheduler_output.slora`` (if
present) to the runner's LoRA manager (``PagedLoRAWorkerManager.apply_plan``);
``Worker.execute_model`` and ``Worker.sample_tokens`` attach the adapters whose
upload failed during the step (``PagedLoRAWorkerManager.take_faults``: lora id
-> cause) to the step's ``ModelRunnerOutput`` as ``.slora_faults`` (a plain
attribute: it survives the pickling to the engine core; an
``AsyncModelRunnerOutput`` gets it when its output is taken), where the
scheduler patch fails those adapters' requests; ``Worker.slora_stats`` (new)
returns the paging counters, so ``LLM.collective_rpc("slora_stats")`` reads
them without pickled callables. ``Worker.initialize_from_config`` (which
allocates the KV cache the engine serves with) tells the LoRA manager that
this KV cache exists: since 0.29 the CUDA runner first captures CUDA graphs
on a small KV cache of its own to measure their memory, then frees it, and
the pager must not bind to that one (``PagedLoRAWorkerManager.kv_ready``).

Guard: vLLM 0.26-0.34; ``Worker.execute_model``, ``Worker.sample_tokens``,
``Worker.initialize_from_config``, ``ModelRunnerOutput`` a dataclass without
slots. Goes away if vLLM gains a
per-step hook for LoRA managers and a worker-to-scheduler error channel.
"""

from __future__ import annotations

import copy
import functools

from vllm_slora.patches import PatchTargetChanged, guard_touches

TARGET = "vllm.v1.worker.gpu_worker"
TOUCHES = {TARGET: ("Worker.execute_model", "Worker.sample_tokens", "Worker.initialize_from_config"),
           "vllm.v1.outputs": ("ModelRunnerOutput", "EMPTY_MODEL_RUNNER_OUTPUT")}


def apply() -> None:
    from vllm.v1.worker import gpu_worker

    guard_touches(TOUCHES)
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

    if hasattr(ModelRunnerOutput, "__slots__"):
        raise PatchTargetChanged("vllm_slora attaches .slora_faults to ModelRunnerOutput, "
                                 "which has __slots__ in this vLLM")
    from vllm_slora.memory.messages import ATTR, FAULTS_ATTR

    Worker = gpu_worker.Worker
    stock_execute, stock_sample = Worker.execute_model, Worker.sample_tokens
    stock_init_kv = Worker.initialize_from_config

    def with_faults(self, out):
        take = getattr(getattr(self.model_runner, "lora_manager", None), "take_faults", None)
        if out is None or take is None:
            return out  # faults wait for the step's output
        faults = take()
        if not faults:
            return out
        def attach(got):
            setattr(got, FAULTS_ATTR, {**getattr(got, FAULTS_ATTR, {}), **faults})
            return got

        if out is EMPTY_MODEL_RUNNER_OUTPUT:  # vLLM's shared empty output: not ours to mark
            return attach(copy.copy(out))
        if isinstance(out, ModelRunnerOutput):
            return attach(out)
        inner = out.get_output  # AsyncModelRunnerOutput: when its output is taken
        out.get_output = lambda: attach(inner())
        return out

    @functools.wraps(stock_execute)
    def execute_model(self, scheduler_output, *args, **kwargs):
        plan = getattr(scheduler_output, ATTR, None)
        if plan is not None:
            self.model_runner.lora_manager.apply_plan(plan)
        return with_faults(self, stock_execute(self, scheduler_output, *args, **kwargs))

    @functools.wraps(stock_sample)
    def sample_tokens(self, *args, **kwargs):
        return with_faults(self, stock_sample(self, *args, **kwargs))

    @functools.wraps(stock_init_kv)
    def initialize_from_config(self, *args, **kwargs):
        stock_init_kv(self, *args, **kwargs)
        manager = getattr(self.model_runner, "lora_manager", None)
        if hasattr(manager, "kv_ready"):
            manager.kv_ready()

    def slora_stats(self) -> dict:
        return self.model_runner.lora_manager.stats()

    Worker.execute_model = execute_model
    Worker.sample_tokens = sample_tokens
    Worker.initialize_from_config = initialize_from_config
    Worker.slora_stats = slora_stats
