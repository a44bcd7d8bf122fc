"""Patch of ``vllm.v1.worker.gpu_worker`` (vLLM 0.26-0.34): bind to the engine's KV cache; paging counters.

Why: the pager views the KV cache's blocks as adapter pages and binds to
the KV tensors once (before CUDA-graph capture, which records the LoRA
kernels on its static buffers). Since 0.29 the CUDA runner first captures
CUDA graphs on a small KV cache of its own to measure their memory, then
frees it: the pager must not bind to that one. ``Worker.initialize_from_config``
allocates the KV cache the engine serves with, on CUDA and on CPU
(``CPUWorker`` inherits it).

What: ``Worker.initialize_from_config`` then tells the runner's LoRA
manager that this KV cache exists (``PagedLoRAWorkerManager.kv_ready``);
``Worker.slora_stats`` (new) returns the paging counters, so
``LLM.collective_rpc("slora_stats")`` reads them without pickled callables.
(The step's paging plan reaches the runner through
``vllm_v1_worker_lora_model_runner_mixin``.)

Guard: vLLM 0.26-0.34; ``Worker.initialize_from_config``. Goes away if vLLM
tells LoRA managers when the KV cache is allocated.
"""

from __future__ import annotations

import functools

from vllm_slora.patches import guard_touches

TARGET = "vllm.v1.worker.gpu_worker"
TOUCHES = {TARGET: ("Worker.initialize_from_config",)}


def apply() -> None:
    from vllm.v1.worker import gpu_worker

    guard_touches(TOUCHES)
    Worker = gpu_worker.Worker
    stock_init_kv = Worker.initialize_from_config

    @functools.wraps(stock_init_kv)
    def initialize_from_config(self, *args, **kwargs):
        stock_init_kv(self, *args, **kwargs)
        manager = getattr(self.model_runner, "lora_manager", None)
        if hasattr(manager, "kv_ready"):
            manager.kv_ready()

    def slora_stats(self) -> dict:
        return self.model_runner.lora_manager.stats()

    Worker.initialize_from_config = initialize_from_config
    Worker.slora_stats = slora_stats
