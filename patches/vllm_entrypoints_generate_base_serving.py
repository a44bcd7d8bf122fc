"""Patch of ``vllm.entrypoints.generate.base.serving`` (vLLM 0.26-0.32): say why a request failed.

Why: see ``vllm_v1_engine_output_processor``: a request failed for its
adapter gets vLLM's bare 500 "Internal server error".

What: ``GenerateBaseServing._raise_if_error`` (completions, chat, responses)
raises vLLM's ``GenerationError`` (HTTP 500) with the recorded cause, which
names the adapter's folder and what went wrong ("adapter '/path' could not be
paged in: OSError: ..."), where one was recorded; otherwise it is stock.

Guard: vLLM 0.26-0.32 (since 0.33 the scheduler's RequestError carries the cause: not applied); ``GenerateBaseServing._raise_if_error`` and
``GenerationError``. Goes away with the output-processor patch.
"""

from __future__ import annotations

import functools

from vllm_slora.patches import guard_touches

TARGET = "vllm.entrypoints.generate.base.serving"
TOUCHES = {TARGET: ("GenerateBaseServing._raise_if_error", "GenerationError")}


def apply() -> None:
    from vllm.entrypoints.generate.base import serving

    guard_touches(TOUCHES)
    from vllm_slora import fault_causes

    stock = serving.GenerateBaseServing._raise_if_error

    @functools.wraps(stock)
    def _raise_if_error(self, finish_reason, request_id):
        if finish_reason == "error":
            cause = fault_causes.take(request_id)
            if cause is not None:
                raise serving.GenerationError(f"Request failed: {cause}")
        return stock(self, finish_reason, request_id)

    serving.GenerateBaseServing._raise_if_error = _raise_if_error
