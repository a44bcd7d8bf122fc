"""The systems compared, and the engine configuration of each.

A configuration is one engine: ``base``, one ``stock`` per ``max_loras`` tried,
and each plugin system. Plugin systems and their ablations differ only in
environment variables (they reach every vLLM process); stock and base run
with this plugin not loaded at all.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field

from vllm_slora.testing.runner import STOCK_PLUGINS
from vllm_slora.versions import at_least

SYSTEMS = {
    "base": "no LoRA at all (enable_lora=False): the upper bound",
    "stock": "vLLM's own multi-LoRA: max_loras GPU slots padded to max_lora_rank, "
             "an LRU CPU cache of max_cpu_loras adapters, punica kernels",
    "slora": "this plugin (VLLM_SLORA=1): adapters paged in the KV-cache pool, MBGMV/MBGMM kernels",
    "slora-bmm": "the plugin with a padded gather + bmm instead of MBGMV/MBGMM "
                 "(VLLM_SLORA_KERNELS=bmm; S-LoRA's ablation)",
    "slora-no-unifymem": "the plugin with adapters in a separate, statically reserved region "
                         "instead of the KV pool (VLLM_SLORA_UNIFY_MEM=0; S-LoRA's ablation)",
}
PLUGIN_ENV = {
    "slora": {"VLLM_SLORA": "1"},
    "slora-bmm": {"VLLM_SLORA": "1", "VLLM_SLORA_KERNELS": "bmm"},
    "slora-no-unifymem": {"VLLM_SLORA": "1", "VLLM_SLORA_UNIFY_MEM": "0"},
}
# Removed from the caller's environment so that only the configuration sets them.
PLUGIN_VARS = ("VLLM_SLORA", "VLLM_SLORA_KERNELS", "VLLM_SLORA_UNIFY_MEM")
# Run order when all are asked for, by importance: when the time budget
# runs short (run.py), the configurations at the end are the ones cut; they
# also inherit what earlier ones left unused. ``--systems`` gives its own
# order (a call that must not lose stock names it first).
ORDER = ("base", "slora", "stock", "slora-bmm", "slora-no-unifymem")
# Boolean engine flags whose False ``vllm serve`` takes as ``--no-FLAG``.
NEGATABLE = ("enable_prefix_caching", "enable_extensible_kv_cache")


@dataclass(frozen=True)
class Config:
    system: str
    label: str
    env: dict = field(default_factory=dict)
    max_loras: int | None = None  # stock only; the plugin ignores max_loras


def configs(systems, stock_max_loras) -> list[Config]:
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    out = []
    for system in dict.fromkeys(systems):  # the caller's order, once each
        if system == "stock":
            out += [Config("stock", f"stock (max_loras={m})", {"VLLM_PLUGINS": STOCK_PLUGINS}, m)
                    for m in sorted(stock_max_loras, reverse=True)]
        elif system == "base":
            out.append(Config("base", "base", {"VLLM_PLUGINS": STOCK_PLUGINS}))
        else:
            out.append(Config(system, system, dict(PLUGIN_ENV[system])))
    return out


def engine_kwargs(config: Config, *, model: str, dummy: bool, max_lora_rank: int, max_cpu_loras: int,
                  slora_max_loras: int, max_model_len: int, eager: bool, extra: dict) -> dict:
    """``vllm.LLM`` keyword arguments (and, through ``serve_flags``, ``vllm serve`` flags).

    Prefix caching is off everywhere: every measurement of an engine replays
    the same prompts (with other adapters), which must not hit cached blocks.
    Stats logging is on: offline first-token latencies come from its request
    metrics (``vllm serve`` logs stats by default). From vLLM 0.34 on, the
    extensible KV cache is off everywhere: S-LoRA mode turns it off (its
    pages must keep their place), and with it vLLM sizes the KV cache from
    another memory budget (1.0 of the GPU instead of 0.92), so every system
    gets the KV memory the plugin gets.
    """
    kw = dict(model=model, skip_tokenizer_init=True, seed=0, max_model_len=max_model_len,
              enable_prefix_caching=False, enforce_eager=eager, disable_log_stats=False)
    if at_least("0.34"):
        kw["enable_extensible_kv_cache"] = False
    if dummy:
        kw["load_format"] = "dummy"
    if config.system != "base":
        max_loras = config.max_loras or slora_max_loras
        kw |= dict(enable_lora=True, max_loras=max_loras, max_lora_rank=max_lora_rank,
                   max_cpu_loras=max(max_cpu_loras, max_loras))
    kw |= extra
    return kw


def serve_flags(kwargs: dict) -> list[str]:
    """``vllm serve`` arguments for ``engine_kwargs``'s dict."""
    args = [kwargs["model"]]
    for key, value in kwargs.items():
        if key == "model" or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            if key in NEGATABLE:
                args.append(f"--no-{flag[2:]}")
        else:
            args += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return args


def describe(config: Config, kwargs: dict) -> str:
    env = " ".join(f"{k}={v}" for k, v in config.env.items())
    return f"{env} vllm serve {shlex.join(serve_flags(kwargs))}".strip()
