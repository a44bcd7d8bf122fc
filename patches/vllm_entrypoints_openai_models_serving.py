"""Patch of ``vllm.entrypoints.openai.models.serving`` (vLLM 0.26-0.34): refuse bad adapters at load.

Why: stock ``OpenAIServingModels.load_lora_adapter`` (used by
``/v1/load_lora_adapter`` and, at start-up, by ``--lora-modules``) asks the
engine to load the adapter and turns any error but "not found" into HTTP 500.
In S-LoRA mode the worker only registers the folder (its weights are read
when the scheduler first pages it in), so without a check here a broken
adapter would be accepted and fail later.

What: ``OpenAIServingModels.load_lora_adapter`` first runs
``vllm_slora.adapters.check_adapter`` with ``weights=True`` (every check,
NaN/inf included) in the API process; an ``AdapterError`` becomes HTTP 404
(``NotFoundError``: folder or file missing) or 400 (``BadRequestError``)
with the message naming the adapter, the problem and the fix, and the engine
is not asked. A bad ``--lora-modules`` adapter therefore stops start-up with
that message (stock's behaviour for a failed static adapter). Good adapters
go on to stock unchanged.

Guard: vLLM 0.26-0.34; ``OpenAIServingModels.load_lora_adapter``. Goes away if
vLLM validates adapters through the LoRA manager before loading.
"""

from __future__ import annotations

import functools
from http import HTTPStatus

from vllm_slora.patches import guard_touches

TARGET = "vllm.entrypoints.openai.models.serving"
TOUCHES = {TARGET: ("OpenAIServingModels.load_lora_adapter", "create_error_response")}


def apply() -> None:
    try:
        from vllm.entrypoints.openai.models import serving
    except ImportError:  # a CPU-only engine process without the server extras
        return
    guard_touches(TOUCHES)
    from vllm_slora.adapters import AdapterError, check_adapter, engine_geometry

    Models = serving.OpenAIServingModels
    stock = Models.load_lora_adapter

    @functools.wraps(stock)
    async def load_lora_adapter(self, request, base_model_name=None):
        if request.lora_name and request.lora_path:
            config = self.engine_client.vllm_config
            geo, usable = engine_geometry(config)
            try:
                check_adapter(request.lora_path, request.lora_name,
                              config.model_config.hf_text_config,
                              config.lora_config.max_lora_rank,
                              geometry=geo, usable_blocks=usable, weights=True)
            except AdapterError as e:
                serving.logger.error("%s", e)
                if e.not_found:
                    return serving.create_error_response(
                        str(e), err_type="NotFoundError", status_code=HTTPStatus.NOT_FOUND)
                return serving.create_error_response(str(e))
        return await stock(self, request, base_model_name)

    Models.load_lora_adapter = load_lora_adapter
