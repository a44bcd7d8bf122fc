"""Patch of ``vllm.entrypoints.serve.instrumentator.metrics`` (vLLM 0.26-0.34): S-LoRA metrics on /metrics.

Why: the paging counters live in the engine processes; ``/metrics`` is
served by the API process from the registry that
``get_prometheus_registry`` returns (prometheus_client's global ``REGISTRY``,
or a fresh multiprocess registry with ``--api-server-count`` > 1). How the
counters travel (snapshot files, not vLLM's stats messages) and why:
``vllm_slora/metrics.py``.

What: ``apply()`` makes the snapshot directory (``VLLM_SLORA_METRICS_DIR``,
inherited by the engine processes started afterwards; an engine process
keeps the one it inherited). The module's ``get_prometheus_registry`` name
(used by ``attach_router``, which mounts ``/metrics``) is wrapped to register
``vllm_slora.metrics.SLoraCollector`` on the registry it returns, so the
``vllm_slora:`` metrics sit next to vLLM's in both registry modes.

Guard: vLLM 0.26-0.34; ``get_prometheus_registry`` and ``attach_router``. Goes
away if vLLM's stats messages gain a field for plugins.
"""

from __future__ import annotations

import functools

from vllm_slora.patches import guard_touches

TARGET = "vllm.entrypoints.serve.instrumentator.metrics"
TOUCHES = {TARGET: ("get_prometheus_registry", "attach_router")}


def apply() -> None:
    from vllm_slora import metrics

    metrics.ensure_dir()
    try:
        from vllm.entrypoints.serve.instrumentator import metrics as instrumentator
    except ImportError:  # no server extras in this process
        return
    guard_touches(TOUCHES)
    stock = instrumentator.get_prometheus_registry

    @functools.wraps(stock)
    def get_prometheus_registry():
        registry = stock()
        metrics.register(registry)
        return registry

    instrumentator.get_prometheus_registry = get_prometheus_registry
