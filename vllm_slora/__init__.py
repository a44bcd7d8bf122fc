"""vllm_slora: S-LoRA for vLLM 0.26 to 0.34, as a plugin.

Adapter weights live in pages of vLLM's KV-cache block pool (unified paging)
and heterogeneous-rank kernels (MBGMV, MBGMM) read them from there.

Switch it on with ``vllm serve MODEL --enable-lora --plugin vllm_slora`` or,
offline, ``vllm_slora.enable()`` (or ``VLLM_SLORA=1``) before ``vllm.LLM``.
Without the switch vLLM behaves exactly as stock.
"""

from vllm_slora.activation import (
    SUPPORTED_VLLM,
    VllmVersionError,
    enable,
    is_enabled,
    register,
)

__all__ = ["SUPPORTED_VLLM", "VllmVersionError", "enable", "is_enabled", "register"]
__version__ = "0.1.0"
