"""Patch of ``vllm.model_executor.layers.fused_moe.config`` (vLLM 0.26-0.34): experts run as the base model's.

Why: vLLM builds every mixture-of-experts layer with ``is_lora_enabled``
whenever LoRA is on (``FusedMoEConfig``, from ``vllm_config.lora_config``),
and then picks the expert kernels stock LoRA can wrap: the Triton ones, on
any platform (since 0.32 on CPU too, where Triton does not run: "module
'triton.language' has no attribute 'float32'"). S-LoRA mode applies LoRA to
attention only on such models: adapters on expert projections are refused
at registration (``vllm_slora.adapters.check_adapter``), so the experts
need no LoRA support and should run the kernels the base model runs.

What: ``FusedMoEConfig.__post_init__`` sets ``is_lora_enabled`` to False
in S-LoRA mode before vLLM's own checks, so that its kernel choice is the
base model's (CPU experts on CPU; on CUDA whatever vLLM picks without LoRA).

Guard: vLLM 0.26-0.34; ``FusedMoEConfig.__post_init__`` and the field
``is_lora_enabled``. Goes away when vLLM picks expert kernels from whether
experts carry LoRA rather than whether LoRA is on.
"""

from __future__ import annotations

import functools

from vllm_slora.patches import guard_touches

TARGET = "vllm.model_executor.layers.fused_moe.config"
TOUCHES = {TARGET: ("FusedMoEConfig.__post_init__", "FusedMoEConfig.is_lora_enabled")}


def apply() -> None:
    from vllm.model_executor.layers.fused_moe import config

    guard_touches(TOUCHES)
    stock = config.FusedMoEConfig.__post_init__

    @functools.wraps(stock)
    def __post_init__(self, *args, **kwargs):
        self.is_lora_enabled = False  # no LoRA on experts in S-LoRA mode
        return stock(self, *args, **kwargs)

    config.FusedMoEConfig.__post_init__ = __post_init__
