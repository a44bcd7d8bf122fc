"""How the plugin is loaded and how S-LoRA mode is switched on.

vLLM calls ``register()`` (entry point group ``vllm.general_plugins``) in
every process it starts: the API server, the engine core and each worker.
S-LoRA mode is one environment variable, ``VLLM_SLORA=1``, because vLLM's
engine-core and worker processes inherit the environment of the process that
starts them; ``--plugin vllm_slora`` and ``enable()`` both set it.

With the mode off the plugin only adds the ``--plugin`` flag to vLLM's CLI.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from vllm_slora.versions import RANGE as SUPPORTED_VLLM
from vllm_slora.versions import VllmVersionError
from vllm_slora.versions import check as check_vllm_version

ENV_MODE = "VLLM_SLORA"
# Tests point this at a file to see which processes loaded the plugin.
ENV_TRACE = "VLLM_SLORA_TRACE"
PLUGIN_NAME = "vllm_slora"

logger = logging.getLogger("vllm_slora")
# Under vLLM's "vllm" logger, so that the mode-on line reaches vLLM's log
# (INFO) like the engine's own start-up lines.
vllm_log = logging.getLogger("vllm.plugins.vllm_slora")
_activated = False
# The mode-on line, while vLLM's logging is not configured yet in this
# process (since 0.31 vLLM configures it when it builds an engine, after
# plugins are loaded): ``announce`` prints it then.
_pending_line: str | None = None


def is_enabled() -> bool:
    return os.environ.get(ENV_MODE, "0").strip().lower() in ("1", "true", "yes", "on")


def plugin_version() -> str:
    """The installed distribution's version (the package's own if not installed)."""
    from importlib import metadata

    try:
        return metadata.version("vllm-slora")
    except metadata.PackageNotFoundError:
        from vllm_slora import __version__

        return __version__


def patches():
    """``vllm_slora.patches`` (``patches/`` at the top of the source tree,
    which pip installs under the package). Imported from the source tree
    itself (Python puts the current directory first: ``python -c`` or ``-m``
    run from the repository's root with a non-editable install), the package
    has no ``patches``: say so and how to fix it, instead of a bare
    ``ModuleNotFoundError`` deep in vLLM's plugin loading."""
    try:
        import vllm_slora.patches as found
    except ModuleNotFoundError as e:
        if e.name != "vllm_slora.patches":
            raise
        here = Path(__file__).resolve().parent
        raise ImportError(
            f"vllm_slora is imported from its source tree ({here}), which has no "
            f"vllm_slora.patches (pip installs them from patches/); run from another "
            f"directory, or install the tree editable: pip install -e {here.parent}") from e
    return found


def register() -> None:
    """Entry point of ``vllm.general_plugins``; vLLM calls it in each process."""
    apply_cli_patches = patches().apply_cli_patches

    _trace("register")
    if is_enabled():
        activate()
        return
    try:
        check_vllm_version()
    except VllmVersionError as e:
        # Mode off: leave this vLLM exactly as it is, but say why.
        logger.warning("%s; the --plugin flag is not added", e)
        return
    apply_cli_patches()


def register_step_log() -> None:
    """Entry point ``vllm_slora_steplog``: the engine core's per-step log
    (``VLLM_SLORA_STEP_LOG``) and nothing else, for the benchmarks' engines
    that run without the plugin (base, stock)."""
    apply_step_log = patches().apply_step_log

    try:
        check_vllm_version()
    except VllmVersionError as e:
        logger.warning("%s; no step log", e)
        return
    apply_step_log()


def enable() -> None:
    """Switch S-LoRA mode on for this process and the vLLM processes it starts.

    Call it before creating ``vllm.LLM``; it is what ``--plugin vllm_slora``
    does for ``vllm serve``.
    """
    os.environ[ENV_MODE] = "1"
    activate()


def activate() -> None:
    """Apply the S-LoRA patches in this process (idempotent)."""
    global _activated, _pending_line
    if _activated:
        return
    version = check_vllm_version()
    found = patches()
    found.apply_cli_patches()
    found.apply_mode_patches()
    _activated = True
    _trace("activate")
    _pending_line = f"vllm_slora {plugin_version()}: S-LoRA mode on (vLLM {version}, pid {os.getpid()})"
    announce()


def announce() -> None:
    """Log the mode-on line once vLLM's logging would show it (the patches
    call this again where an engine's parts are built)."""
    global _pending_line
    if _pending_line and vllm_log.isEnabledFor(logging.INFO) and vllm_log.hasHandlers():
        vllm_log.info("%s", _pending_line)
        _pending_line = None


def _trace(event: str) -> None:
    path = os.environ.get(ENV_TRACE)
    if not path:
        return
    record = {"event": event, "pid": os.getpid(), "ppid": os.getppid(),
              "mode": is_enabled(), "time": time.time()}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
