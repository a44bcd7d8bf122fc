"""The plugin's settings: one frozen dataclass, read from the environment once.

Settings are environment variables because vLLM starts engine-core and
worker processes that inherit the environment but not Python state. Users
give them the vLLM way, as ``--additional-config '{"vllm_slora": {...}}'``
(``LLM(additional_config=...)`` offline): ``apply_settings`` turns that dict
into the variables while vLLM builds its config, before it starts those
processes (``patches/vllm_engine_arg_utils.py``). The variables stay as a
fallback.
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


def _fraction(name: str, default: float) -> float:
    value = float(os.environ.get(name, default))
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} must be within [0, 1]")
    return value


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
    # off (VLLM_SLORA_CUDAGRAPH), kept for comparison. "captured" passes the
    # GPU parity workload (tests/gpu/test_graphs_parity.py;
    # benchmarks/results/graphs-parity-diag-h200.json).
    cudagraph: str = "captured"
    # Adapters pinned by users (``pin_lora``) may hold at most this share of
    # the KV blocks (VLLM_SLORA_PIN_FRACTION), so that pins cannot starve
    # the KV cache.
    pin_fraction: float = 0.5

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
            separate_fraction=_fraction("VLLM_SLORA_SEPARATE_FRACTION", cls.separate_fraction),
            pin_fraction=_fraction("VLLM_SLORA_PIN_FRACTION", cls.pin_fraction),
        )


@functools.cache
def slora_config() -> SLoraConfig:
    return SLoraConfig.from_env()


# --additional-config '{"vllm_slora": {KEY: VALUE}}' -> the variable it sets.
SETTINGS = {
    "kernels": "VLLM_SLORA_KERNELS",
    "cudagraph": "VLLM_SLORA_CUDAGRAPH",
    "unify_mem": "VLLM_SLORA_UNIFY_MEM",
    "separate_fraction": "VLLM_SLORA_SEPARATE_FRACTION",
    "pin_fraction": "VLLM_SLORA_PIN_FRACTION",
}
SETTINGS_KEY = "vllm_slora"


def apply_settings(settings: dict) -> SLoraConfig:
    """Set the plugin's variables from ``additional_config["vllm_slora"]`` and
    return the settings they give; a ``ValueError`` names an unknown key or
    a bad value, and then nothing is changed."""
    if not isinstance(settings, dict):
        raise ValueError(f"additional_config['{SETTINGS_KEY}'] must be a dict of "
                         f"{', '.join(SETTINGS)}; got {settings!r}")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown vllm_slora setting(s) {', '.join(unknown)} in --additional-config; "
                         f"known: {', '.join(SETTINGS)}")
    values = {SETTINGS[k]: (("1" if v else "0") if isinstance(v, bool) else str(v)) for k, v in settings.items()}
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    slora_config.cache_clear()
    try:
        return slora_config()
    except ValueError:
        for name, old in before.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
        slora_config.cache_clear()
        raise
