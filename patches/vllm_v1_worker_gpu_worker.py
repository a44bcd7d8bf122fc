"""Patch of ``vllm.v1.worker.gpu_worker`` (vLLM 0.26.0): apply the paging plan.

Why: the scheduler decides which KV blocks hold which adapter and sends the
decision as ``scheduler_output.slora`` (see ``vllm_v1_core_sched_scheduler``);
the worker must copy adapters into those blocks before the step's forward.
``Worker.execute_model`` receives every step's scheduler output on CUDA (V1
and V2 runners) and on CPU (``CPUWorker`` inherits it), so one hook there
covers every runner.

What: ``Worker.execute_model`` first hands ``scheduler_output.slora`` (if
present) to the runner's LoRA manager (``PagedLoRAWorkerManager.apply_plan``);
``Worker.slora_stats`` (new) returns the paging counters, so
``LLM.collective_rpc("slora_stats")`` reads them without pickled callables.

Guard: vLLM 0.26.x; ``Worker.execute_model``. Goes away if vLLM gains a
per-step hook for LoRA managers.
"""

from __future__ import annotations

import functools

from vllm_slora.patches import guard

TARGET = "vllm.v1.worker.gpu_worker"


def apply() -> None:
    from vllm.v1.worker import gpu_worker

    guard(gpu_worker, "Worker.execute_model")
    from vllm_slora.memory.plan import ATTR

    Worker = gpu_worker.Worker
    stock_execute = Worker.execute_model

    @functools.wraps(stock_execute)
    def execute_model(self, scheduler_output, *args, **kwargs):
        plan = getattr(scheduler_output, ATTR, None)
        if plan is not None:
            self.model_runner.lora_manager.apply_plan(plan)
        return stock_execute(self, scheduler_output, *args, **kwargs)

    def slora_stats(self) -> dict:
        return self.model_runner.lora_manager.stats()

    Worker.execute_model = execute_model
    Worker.slora_stats = slora_stats
