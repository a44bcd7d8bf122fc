"""Patch of ``vllm.v1.engine.input_processor`` (vLLM 0.26-0.34): check a request's adapter.

Why: in S-LoRA mode the scheduler reads an adapter's header when it first
admits a request (to size its pages) and the worker reads its weights when
paging it in; a bad adapter found there would stop the engine core and every
request with it. ``InputProcessor._validate_lora`` runs for every request in
the front end (the API server, or the ``vllm.LLM`` process) before the
request reaches the engine, and an error there fails that request only:
``AdapterError`` is a ``VLLMValidationError`` (OpenAI server: HTTP 400 with
the message, which since 0.27 only client errors get) and a ``ValueError``
(``LLM.generate``: raised).

What: ``InputProcessor._validate_lora`` first runs stock, then
``vllm_slora.adapters.check_adapter`` on the request's adapter: config, rank
<= ``--max-lora-rank``, target modules, tensor shapes (safetensors header
only, cached per file version), that it has weights on a module
``--lora-target-modules`` keeps (if given) and, once the engine reported its
KV block count, whether the pages of those modules fit the pool. NaN/inf weights are checked
where weights are read at load time (``/v1/load_lora_adapter``, see
``vllm_entrypoints_openai_models_serving``), not per request.

Guard: vLLM 0.26-0.34; ``InputProcessor._validate_lora``; ``LoRAConfig.target_modules``
read where present (without it: every module kept). Goes away if vLLM
lets a LoRA manager validate adapters in the front end.
"""

from __future__ import annotations

import functools

from vllm_slora.patches import guard_touches

TARGET = "vllm.v1.engine.input_processor"
TOUCHES = {TARGET: ("InputProcessor._validate_lora",)}


def apply() -> None:
    from vllm.v1.engine import input_processor

    guard_touches(TOUCHES)
    from vllm_slora.adapters import check_adapter, engine_geometry
    from vllm_slora.memory.layout import deployment_kinds

    InputProcessor = input_processor.InputProcessor
    stock = InputProcessor._validate_lora

    @functools.wraps(stock)
    def _validate_lora(self, lora_request) -> None:
        stock(self, lora_request)
        if lora_request is None or not self.lora_config or lora_request.lora_int_id <= 0:
            return
        geo, usable = engine_geometry(self.vllm_config)
        check_adapter(lora_request.lora_path, lora_request.lora_name,
                      self.model_config.hf_text_config, self.lora_config.max_lora_rank,
                      geometry=geo, usable_blocks=usable,
                      kinds=deployment_kinds(getattr(self.lora_config, "target_modules", None)))

    InputProcessor._validate_lora = _validate_lora
