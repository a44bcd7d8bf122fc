"""Every change vllm_slora makes to vLLM internals, one module per patched
vLLM module (installed as ``vllm_slora.patches``; README.md here lists them).

Each patch module has a docstring (why, what, the vLLM versions it targets,
when it can go away), ``TARGET`` (the vLLM module it patches), ``TOUCHES``
(every vLLM attribute it relies on) and ``apply()``, which calls
``guard_touches`` before touching anything so that another vLLM version
fails loudly instead of being patched blindly.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from vllm_slora.versions import FROM_FIRST
from vllm_slora.versions import SPAN as SUPPORTED
from vllm_slora.versions import VllmVersionError, in_span
from vllm_slora.versions import check as check_vllm_version

# Applied in every process, mode on or off: they only add the --plugin flag,
# the checks that go with it and the plugin's variables to vLLM's known ones,
# and, when VLLM_SLORA_STEP_LOG names a file, the benchmarks' step log.
STEP_LOG_PATCHES = ["vllm_v1_engine_core"]
CLI_PATCHES = ["vllm_engine_arg_utils", "vllm_envs", *STEP_LOG_PATCHES]
# Applied in every process when S-LoRA mode is on.
MODE_PATCHES: list[str] = [
    "vllm_v1_core_sched_scheduler",
    "vllm_v1_core_kv_cache_utils",
    "vllm_v1_core_kv_cache_utils:apply_sliding_window_blocks",
    "vllm_v1_worker_lora_model_runner_mixin",
    "vllm_v1_worker_gpu_worker",
    "vllm_v1_engine_input_processor",
    "vllm_entrypoints_openai_models_serving",
    "vllm_v1_engine_output_processor",
    "vllm_entrypoints_generate_base_serving",
    "vllm_v1_engine_core:apply_pins",
    "vllm_v1_engine_core:apply_precheck",
    "vllm_entrypoints_serve_instrumentator_metrics",
    "vllm_config_compilation",
    "vllm_model_executor_layers_fused_moe_config",
]

# Patches only some releases need (vLLM took the rest upstream), with the
# span they are applied in; every other patch applies on every SUPPORTED one.
NEEDED_IN = {
    # unify_hybrid_kv_cache_specs aligns sliding-window block sizes itself since 0.27
    "vllm_v1_core_kv_cache_utils:apply_sliding_window_blocks": "0.26",
    # since 0.33 the scheduler hands vLLM a RequestError with the cause,
    # which the front end raises itself (vllm_v1_core_sched_scheduler._fail)
    "vllm_v1_engine_output_processor": "0.26-0.32",
    "vllm_entrypoints_generate_base_serving": "0.26-0.32",
}

_applied: set[str] = set()


def needed(name: str, version: str | None = None) -> bool:
    """Whether the patch ``name`` applies to the installed vLLM (or ``version``)."""
    return in_span(NEEDED_IN.get(name, SUPPORTED), version)


class PatchTargetChanged(RuntimeError):
    pass


def guard(module: ModuleType, *attrs: str, versions: str = SUPPORTED) -> None:
    """Fail loudly unless the installed vLLM lies in ``versions`` (a span of
    ``vllm_slora.versions.in_span``: the releases this patch was written
    and tested against) and ``module`` has every dotted attr."""
    try:
        version = check_vllm_version()
    except VllmVersionError as e:
        raise PatchTargetChanged(f"refusing to patch {module.__name__}: {e}") from e
    if not in_span(versions, version):
        raise PatchTargetChanged(
            f"vllm_slora cannot patch {module.__name__} of vLLM {version}: this patch "
            f"targets vLLM {versions}")
    for dotted in attrs:
        obj = module
        for part in dotted.split("."):
            if not hasattr(obj, part):
                raise PatchTargetChanged(
                    f"vllm_slora cannot patch {module.__name__} of vLLM {version}: "
                    f"'{dotted}' is missing")
            obj = getattr(obj, part)


def guard_touches(touches: dict[str, tuple[str, ...]], versions: str = SUPPORTED) -> None:
    """``guard`` every vLLM module of a patch's ``TOUCHES`` table (module ->
    attributes, each ``Class.name`` or ``name``, optionally ``@span``: checked
    only where the installed vLLM lies in that span). The same tables are the
    drift check's list of touch points (``python -m vllm_slora.compat``)."""
    for module, attrs in touches.items():
        split = [attr.partition("@") for attr in attrs]
        wanted = [name for name, _, span in split if in_span(span or FROM_FIRST)]
        if wanted or not attrs:
            guard(importlib.import_module(module), *wanted, versions=versions)


def _apply(names: list[str]) -> None:
    """``name``: a patch module, whose ``apply()`` runs, or ``module:function``
    for a part of a module's patch applied on its own (in S-LoRA mode only,
    say, where the rest applies in every process)."""
    for name in names:
        if name in _applied or not needed(name):
            continue
        module, _, function = name.partition(":")
        getattr(importlib.import_module(f"{__name__}.{module}"), function or "apply")()
        _applied.add(name)


def apply_cli_patches() -> None:
    _apply(CLI_PATCHES)


def apply_step_log() -> None:
    """Only the step log (entry point ``vllm_slora_steplog``; no-op unless
    ``VLLM_SLORA_STEP_LOG`` is set)."""
    _apply(STEP_LOG_PATCHES)


def apply_mode_patches() -> None:
    _apply(MODE_PATCHES)
