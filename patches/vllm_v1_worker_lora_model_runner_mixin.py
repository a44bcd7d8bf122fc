"""Patch of ``vllm.v1.worker.lora_model_runner_mixin`` (vLLM 0.26-0.34): paged LoRA layers and the step's paging plan.

Why: stock LoRA gives every LoRA layer stacked ``max_loras x max_lora_rank``
weights at model load and copies adapters into those slots; S-LoRA mode
keeps adapters in KV-cache pages instead and must allocate nothing up front.
Every model runner (V1 on CPU up to 0.33, V2 on CUDA, 0.34's CPU runners)
gets all its LoRA machinery from one place,
``LoRAModelRunnerMixin.load_lora_model``, which builds
``LRUCacheWorkerLoRAManager`` and then only calls that manager's methods.
The scheduler decides which KV blocks hold which adapter and sends the
decision with each step (``scheduler_output.slora``, see
``vllm_v1_core_sched_scheduler``); the worker must copy adapters into those
blocks before the step's forward. The runner's ``execute_model`` is the
one call every executor makes for a step: ``Worker.execute_model`` (every
worker, CPU and CUDA) and, up to 0.32, Ray's compiled graph
(``RayWorkerWrapper.execute_model_ray``), which calls the runner directly.

What:
- the module's ``LRUCacheWorkerLoRAManager`` name ->
  ``vllm_slora.memory.worker_manager.PagedLoRAWorkerManager`` (same
  methods; wraps the projections in ``PagedLoRALinear``, no slots, no
  punica wrapper);
- ``LoRAModelRunnerMixin.load_lora_model``, when it built that manager,
  wraps the runner's ``execute_model`` and ``sample_tokens`` (``serve_steps``):
  the first hands ``scheduler_output.slora`` (if present) to
  ``PagedLoRAWorkerManager.apply_plan``; both attach the adapters whose
  upload failed during the step (``take_faults``: lora id -> cause) to the
  step's ``ModelRunnerOutput`` as ``.slora_faults`` (a plain attribute: it
  survives the pickling to the engine core; an ``AsyncModelRunnerOutput``
  gets it when its output is taken; vLLM's shared empty output is copied
  first), where the scheduler patch fails those adapters' requests.

Guard: vLLM 0.26-0.34; ``LRUCacheWorkerLoRAManager``,
``LoRAModelRunnerMixin.load_lora_model``, ``ModelRunnerOutput`` a dataclass
without slots. Goes away if vLLM lets a plugin choose the worker LoRA
manager and gains a per-step hook for it and a worker-to-scheduler error
channel.
"""

from __future__ import annotations

import copy
import functools

from vllm_slora.patches import PatchTargetChanged, guard_touches

TARGET = "vllm.v1.worker.lora_model_runner_mixin"
TOUCHES = {TARGET: ("LRUCacheWorkerLoRAManager", "LoRAModelRunnerMixin.load_lora_model"),
           "vllm.v1.outputs": ("ModelRunnerOutput", "EMPTY_MODEL_RUNNER_OUTPUT")}


def serve_steps(runner, manager) -> None:
    """Wrap ``runner``'s ``execute_model`` and ``sample_tokens`` (on the
    instance) with the paging plan and the fault report."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

    from vllm_slora.memory.messages import ATTR, FAULTS_ATTR

    def with_faults(out):
        if out is None:
            return out  # faults wait for the step's output
        faults = manager.take_faults()
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

    stock_execute, stock_sample = runner.execute_model, runner.sample_tokens

    @functools.wraps(stock_execute)
    def execute_model(scheduler_output, *args, **kwargs):
        plan = getattr(scheduler_output, ATTR, None)
        if plan is not None:
            manager.apply_plan(plan)
        return with_faults(stock_execute(scheduler_output, *args, **kwargs))

    @functools.wraps(stock_sample)
    def sample_tokens(*args, **kwargs):
        return with_faults(stock_sample(*args, **kwargs))

    runner.execute_model = execute_model
    runner.sample_tokens = sample_tokens


def apply() -> None:
    from vllm.v1.worker import lora_model_runner_mixin as mixin

    guard_touches(TOUCHES)
    from vllm.v1.outputs import ModelRunnerOutput

    if hasattr(ModelRunnerOutput, "__slots__"):
        raise PatchTargetChanged("vllm_slora attaches .slora_faults to ModelRunnerOutput, "
                                 "which has __slots__ in this vLLM")
    from vllm_slora.memory.worker_manager import PagedLoRAWorkerManager

    mixin.LRUCacheWorkerLoRAManager = PagedLoRAWorkerManager
    stock_load = mixin.LoRAModelRunnerMixin.load_lora_model

    @functools.wraps(stock_load)
    def load_lora_model(self, *args, **kwargs):
        model = stock_load(self, *args, **kwargs)
        manager = getattr(self, "lora_manager", None)
        if isinstance(manager, PagedLoRAWorkerManager):
            serve_steps(self, manager)
        return model

    mixin.LoRAModelRunnerMixin.load_lora_model = load_lora_model
