"""The plugin's settings: one frozen dataclass, read from the environment once.

Settings are environment variables because vLLM starts engine-core and
worker processes that inherit the environment but not Python state.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from vllm_slora.activation import is_enabled

KERNEL_CHOICES = ("auto", "triton", "torch", "bmm")
CUDAGRAPH_CHOICES = ("captured", "between-pieces")


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class SLoraConfig:
    enabled: bool
    # "auto": Triton MBGMV/MBGMM on CUDA, the PyTorch reference elsewhere;
    # "bmm": padded gather + bmm (S-LoRA's ablation).
    kernels: str
    # Off: adapters in a separate, statically reserved region instead of the
    # KV pool (S-LoRA's "no unified memory" ablation).
    unify_mem: bool
    # With unify_mem off: the share of KV blocks set aside for adapters at
    # start (VLLM_SLORA_SEPARATE_FRACTION, default 0.25).
    separate_fraction: float = 0.25
    # "captured": the paged LoRA op inside vLLM's CUDA graphs (full and
    # piecewise); "between-pieces": run between piecewise graphs, full graphs
    # off (VLLM_SLORA_CUDAGRAPH), kept for comparison. "captured" passed
    # the GPU parity workload on 2026-12-02 (89/96 identical to the plugin
    # eager, no clear difference, PDL on and off) once the expand waited
    # for the shrink before its rank loop (grouped.py);
    # benchmarks/results/graphs-parity-diag-h200.json.
    cudagraph: str = "captured"

    @classmethod
    def from_env(cls) -> "SLoraConfig":
        kernels = os.environ.get("VLLM_SLORA_KERNELS", "auto").strip().lower()
        if kernels not in KERNEL_CHOICES:
            raise ValueError(
                f"VLLM_SLORA_KERNELS={kernels!r} is not one of {', '.join(KERNEL_CHOICES)}"
            )
        cudagraph = os.environ.get("VLLM_SLORA_CUDAGRAPH", cls.cudagraph).strip().lower()
        if cudagraph not in CUDAGRAPH_CHOICES:
            raise ValueError(f"VLLM_SLORA_CUDAGRAPH={cudagraph!r} is not one of "
                             f"{', '.join(CUDAGRAPH_CHOICES)}")
        return cls(
            enabled=is_enabled(),
            cudagraph=cudagraph,
            kernels=kernels,
            unify_mem=_flag("VLLM_SLORA_UNIFY_MEM", True),
            separate_fraction=float(os.environ.get("VLLM_SLORA_SEPARATE_FRACTION", "0.25")),
        )


@functools.cache
def slora_config() -> SLoraConfig:
    return SLoraConfig.from_env()
