"""Every change vllm_slora makes to vLLM internals, one module per patched
vLLM module (installed as ``vllm_slora.patches``; README.md here lists them).

Each patch module has a docstring (why, what, the vLLM version it targets,
when it can go away), ``TARGET`` (the vLLM module it patches) and
``apply()``, which calls ``guard`` before touching anything so that another
vLLM version fails loudly instead of being patched blindly.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from vllm_slora.activation import VllmVersionError, check_vllm_version

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
    "vllm_entrypoints_serve_instrumentator_metrics",
    "vllm_config_compilation",
]

_applied: set[str] = set()


class PatchTargetChanged(RuntimeError):
    pass


def guard(module: ModuleType, *attrs: str) -> None:
    """Fail loudly unless vLLM is 0.26.x and ``module`` has every dotted attr."""
    try:
        check_vllm_version()
    except VllmVersionError as e:
        raise PatchTargetChanged(f"refusing to patch {module.__name__}: {e}") from e
    for dotted in attrs:
        obj = module
        for part in dotted.split("."):
            if not hasattr(obj, part):
                raise PatchTargetChanged(
                    f"vllm_slora cannot patch {module.__name__}: '{dotted}' is missing; "
                    f"this patch targets vLLM 0.26.0"
                )
            obj = getattr(obj, part)


def _apply(names: list[str]) -> None:
    """``name``: a patch module, whose ``apply()`` runs, or ``module:function``
    for a part of a module's patch applied on its own (in S-LoRA mode only,
    say, where the rest applies in every process)."""
    for name in names:
        if name in _applied:
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
