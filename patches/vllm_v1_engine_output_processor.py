"""Patch of ``vllm.v1.engine.output_processor`` (vLLM 0.26-0.32): keep why a request failed.

Why: a request failed for its adapter ends with ``finish_reason`` "error", and
the scheduler patch puts the cause in the output's ``stop_reason``; vLLM's
front end answers such a request with a bare 500 "Internal server error"
(``GenerateBaseServing._raise_if_error`` sees the finish reason and the
request id only), so the client cannot tell which adapter failed or why.

What: ``OutputProcessor.process_outputs`` first records, for each finished
output with ``finish_reason`` ERROR and a text ``stop_reason``, that text under
its request id (``vllm_slora.fault_causes``), read by the serving patch.

Guard: vLLM 0.26-0.32 (since 0.33 the scheduler's RequestError carries the cause: not applied); ``OutputProcessor.process_outputs``, ``EngineCoreOutput``
with ``finish_reason`` and ``stop_reason``. Goes away if vLLM's error replies
carry the engine's reason.
"""

from __future__ import annotations

import functools

from vllm_slora.patches import PatchTargetChanged, guard_touches

TARGET = "vllm.v1.engine.output_processor"
TOUCHES = {TARGET: ("OutputProcessor.process_outputs",)}


def apply() -> None:
    from vllm.v1.engine import EngineCoreOutput, FinishReason
    from vllm.v1.engine import output_processor

    guard_touches(TOUCHES)
    if not {"finish_reason", "stop_reason"} <= set(EngineCoreOutput.__struct_fields__):
        raise PatchTargetChanged("vllm_slora reads EngineCoreOutput.finish_reason/stop_reason, "
                                 "which this vLLM lacks")
    from vllm_slora import fault_causes

    stock = output_processor.OutputProcessor.process_outputs
    error = FinishReason.ERROR

    @functools.wraps(stock)
    def process_outputs(self, engine_core_outputs, *args, **kwargs):
        for out in engine_core_outputs:
            if out.finish_reason == error and isinstance(out.stop_reason, str):
                fault_causes.record(out.request_id, out.stop_reason)
        return stock(self, engine_core_outputs, *args, **kwargs)

    output_processor.OutputProcessor.process_outputs = process_outputs
