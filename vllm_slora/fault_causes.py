"""Why a request failed, from the engine core to the front end's error reply.

The scheduler finishes a request whose adapter failed with vLLM's
``FINISHED_ERROR`` and puts the cause in its last output's ``stop_reason``
(``patches/vllm_v1_core_sched_scheduler.py``); ``LLM.generate`` callers find
it there. The front end records it per request as outputs arrive
(``patches/vllm_v1_engine_output_processor.py``) and the error reply, vLLM's
500 "Internal server error" otherwise, names it
(``patches/vllm_entrypoints_generate_base_serving.py``).
"""

from __future__ import annotations

from collections import OrderedDict

# Bounded: a cause nobody asks for (an offline engine's) must not pile up.
LIMIT = 4096
_causes: OrderedDict[str, str] = OrderedDict()


def record(request_id: str, cause: str) -> None:
    _causes[request_id] = cause
    while len(_causes) > LIMIT:
        _causes.popitem(last=False)


def take(request_id: str) -> str | None:
    """The cause recorded for ``request_id``, or for an engine request of it
    (the front end's ids carry suffixes: "<id>-<n>-<random>")."""
    cause = _causes.pop(request_id, None)
    if cause is not None:
        return cause
    key = next((k for k in _causes if k.startswith(request_id + "-")), None)
    return None if key is None else _causes.pop(key)
