"""Patch of ``vllm.v1.worker.lora_model_runner_mixin`` (vLLM 0.26.0): paged LoRA layers.

Why: stock LoRA gives every LoRA layer stacked ``max_loras x max_lora_rank``
weights at model load and copies adapters into those slots; S-LoRA mode
keeps adapters in KV-cache pages instead and must allocate nothing up front.
Both model runners (V1, used on CPU; V2, used on CUDA) get all their LoRA
machinery from one place, ``LoRAModelRunnerMixin.load_lora_model``, which
builds ``LRUCacheWorkerLoRAManager`` and then only calls that manager's
methods.

What: the module's ``LRUCacheWorkerLoRAManager`` name ->
``vllm_slora.memory.worker_manager.PagedLoRAWorkerManager`` (same methods;
wraps the projections in ``PagedLoRALinear``, no slots, no punica wrapper).

Guard: vLLM 0.26.x; ``LRUCacheWorkerLoRAManager`` and
``LoRAModelRunnerMixin.load_lora_model``. Goes away if vLLM lets a plugin
choose the worker LoRA manager.
"""

from __future__ import annotations

from vllm_slora.patches import guard_touches

TARGET = "vllm.v1.worker.lora_model_runner_mixin"
TOUCHES = {TARGET: ("LRUCacheWorkerLoRAManager", "LoRAModelRunnerMixin.load_lora_model")}


def apply() -> None:
    from vllm.v1.worker import lora_model_runner_mixin as mixin

    guard_touches(TOUCHES)
    from vllm_slora.memory.worker_manager import PagedLoRAWorkerManager

    mixin.LRUCacheWorkerLoRAManager = PagedLoRAWorkerManager
