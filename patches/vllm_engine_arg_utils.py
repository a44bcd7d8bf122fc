"""Patch of ``vllm.engine.arg_utils`` (vLLM 0.26-0.34): the ``--plugin`` switch.

Why: vLLM has no per-run switch for a general plugin; an installed
plugin is loaded in every process. S-LoRA mode must be opt-in per run, so
``vllm serve MODEL --enable-lora --plugin vllm_slora`` switches it on and a
plain ``vllm serve`` stays stock.

Hook: ``AsyncEngineArgs.add_cli_args`` calls ``load_general_plugins()`` before
it calls ``EngineArgs.add_cli_args`` to build the engine flags, so a general
plugin can wrap ``EngineArgs.add_cli_args`` and its flag appears in every
command that takes engine flags (``serve``, ``bench``, ``run-batch``) and in
``--help``. The alternative hook, ``Platform.pre_register_and_update``, belongs
to platform plugins and would tie the flag to one platform.

What:
- ``EngineArgs.add_cli_args`` gains ``--plugin NAME``; its argparse action
  rejects unknown names and, for ``vllm_slora``, calls ``vllm_slora.enable()``
  at parse time, which sets ``VLLM_SLORA=1`` before vLLM starts its
  engine-core and worker processes (they inherit it) and patches this one.
- ``EngineArgs.create_engine_config`` refuses S-LoRA mode without
  ``--enable-lora``, with the fix in the message (also for ``vllm.LLM``),
  and applies the plugin's settings given as ``--additional-config
  '{"vllm_slora": {...}}'`` (``vllm_slora.config.apply_settings``: the
  environment variables the engine's processes read, set before they start).
  In S-LoRA mode it also turns vLLM's hybrid KV cache manager off unless the
  user chose (``keep_one_kv_cache_group``): adapters are paged in one
  KV-cache group, and a model that mixes sliding-window and full-attention
  layers (Gemma 2) gets one group only without it. Since 0.34, where vLLM
  makes the CUDA KV cache extensible by default (sized after warm-up and
  CUDA-graph capture, and released while the engine sleeps), S-LoRA mode
  turns that off unless the user chose (``keep_kv_cache_fixed``): adapter
  pages are bound once, at the KV cache's final size, and must stay where
  they are while resident. An explicit ``--enable-extensible-kv-cache`` is
  refused with the reason.

Guard: ``guard`` checks vLLM 0.26-0.34 and the attributes used. Goes away if
vLLM gains a per-run plugin switch (and, for the hybrid manager, when paged
LoRA can use the pages of several KV-cache groups).
"""

from __future__ import annotations

import argparse
import functools
import logging

from vllm_slora.activation import announce
from vllm_slora.config import SETTINGS, SETTINGS_KEY, apply_settings
from vllm_slora.patches import guard_touches

TARGET = "vllm.engine.arg_utils"
TOUCHES = {TARGET: ("EngineArgs.add_cli_args", "EngineArgs.create_engine_config",
                    "EngineArgs.disable_hybrid_kv_cache_manager",
                    "EngineArgs.enable_extensible_kv_cache@0.34-")}
KNOWN_PLUGINS = ("vllm_slora",)
# Under vLLM's logger, so that the line reaches vLLM's log at INFO.
logger = logging.getLogger("vllm.plugins.vllm_slora")


class PluginAction(argparse.Action):
    """``--plugin NAME``: switch a plugin's mode on at parse time."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values not in KNOWN_PLUGINS:
            parser.error(
                f"unknown plugin '{values}' for --plugin; known: {', '.join(KNOWN_PLUGINS)}"
            )
        from vllm_slora.activation import enable

        enable()
        setattr(namespace, self.dest, values)


def add_plugin_flag(parser: argparse.ArgumentParser) -> None:
    if "--plugin" in parser._option_string_actions:
        return
    group = parser.add_argument_group("Plugins", "Per-run switches of installed vLLM plugins.")
    group.add_argument(
        "--plugin",
        action=PluginAction,
        default=None,
        metavar="NAME",
        help="Switch an installed plugin's mode on for this run. 'vllm_slora': "
        "S-LoRA mode (adapter weights paged in the KV-cache pool, "
        "heterogeneous-rank LoRA kernels); needs --enable-lora. Its settings: "
        "--additional-config '{\"vllm_slora\": {...}}' with keys " + ", ".join(SETTINGS) +
        " (kernels: auto|triton|torch|bmm; unify_mem: false keeps adapters in a "
        "separate region of separate_fraction of the blocks; pin_fraction: the "
        "share of blocks pin_lora may hold; cudagraph: captured|between-pieces).",
    )


def check_lora_enabled(engine_args) -> None:
    from vllm_slora.activation import is_enabled

    if is_enabled() and not engine_args.enable_lora:
        raise ValueError(
            "vllm_slora: S-LoRA mode (--plugin vllm_slora / VLLM_SLORA=1) serves LoRA "
            "adapters but LoRA is off; add --enable-lora to `vllm serve` "
            "(enable_lora=True for vllm.LLM), or drop --plugin vllm_slora"
        )


def keep_one_kv_cache_group(engine_args, vllm_config) -> None:
    """In S-LoRA mode, unless the user chose: vLLM's hybrid KV cache manager
    off, so that sliding-window layers beside full-attention ones join their
    group (``kv_cache_utils.unify_hybrid_kv_cache_specs``), whose blocks hold
    the adapters' pages. Those layers then keep their full KV (memory stock
    frees); the attention still applies the window. Left on for models with
    Mamba layers, which need it; ``PagedKVCacheManager.enable_adapters``
    refuses them by name."""
    from vllm_slora.activation import is_enabled

    model, scheduler = vllm_config.model_config, vllm_config.scheduler_config
    if (not is_enabled() or engine_args.disable_hybrid_kv_cache_manager is not None
            or scheduler.disable_hybrid_kv_cache_manager or model is None
            or model.is_hybrid or model.is_attention_free):
        return
    scheduler.disable_hybrid_kv_cache_manager = True
    logger.info("vllm_slora: hybrid KV cache manager off, so that adapter pages share one "
                "KV-cache group with every layer; sliding-window layers beside full-attention "
                "ones (Gemma 2) keep their full KV, more KV memory than stock")


def keep_kv_cache_fixed(engine_args) -> None:
    """In S-LoRA mode, vLLM 0.34's extensible KV cache off (the field does not
    exist before 0.34): the pager views the KV buffers it binds to as pages
    for as long as the engine runs."""
    from vllm_slora.activation import is_enabled

    if not is_enabled() or not hasattr(engine_args, "enable_extensible_kv_cache"):
        return
    if engine_args.enable_extensible_kv_cache:
        raise ValueError(
            "vllm_slora: S-LoRA mode keeps adapter pages in the KV cache, which must keep its "
            "size and place while the engine runs; drop --enable-extensible-kv-cache "
            "(enable_extensible_kv_cache=True for vllm.LLM), or drop --plugin vllm_slora")
    if engine_args.enable_extensible_kv_cache is None:
        engine_args.enable_extensible_kv_cache = False
        logger.info("vllm_slora: extensible KV cache off (adapter pages live in the KV cache, "
                    "which keeps its size); vLLM's default --gpu-memory-utilization is then 0.92")


def apply() -> None:
    from vllm.engine import arg_utils

    guard_touches(TOUCHES)
    EngineArgs = arg_utils.EngineArgs

    stock_add_cli_args = EngineArgs.add_cli_args

    @functools.wraps(stock_add_cli_args)
    def add_cli_args(parser, *args, **kwargs):
        parser = stock_add_cli_args(parser, *args, **kwargs)
        add_plugin_flag(parser)
        return parser

    stock_create = EngineArgs.create_engine_config

    @functools.wraps(stock_create)
    def create_engine_config(self, *args, **kwargs):
        check_lora_enabled(self)
        keep_kv_cache_fixed(self)
        settings = (getattr(self, "additional_config", None) or {}).get(SETTINGS_KEY)
        if settings is not None:
            apply_settings(settings)
        config = stock_create(self, *args, **kwargs)
        keep_one_kv_cache_group(self, config)
        announce()  # the mode-on line, if vLLM's logging was not set up at activation
        return config

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.create_engine_config = create_engine_config
