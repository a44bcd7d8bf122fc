"""Patch of ``vllm.v1.core.kv_cache_utils`` (vLLM 0.26.0): prefix-cache keys name the adapter's weights.

Why: vLLM keys a LoRA request's KV blocks in the prefix cache by the
adapter's *name* only (``_gen_lora_extra_hash_keys``). An adapter unloaded
and loaded again under the same name with other weights (or whose folder
is rewritten in place) then reuses KV computed with the old weights: stale
prefix hits, wrong outputs. S-LoRA mode reads adapter files per file version
everywhere else (``vllm_slora.memory.layout.file_version``), so its cache
keys must too.

What: ``_gen_lora_extra_hash_keys`` returns the adapter's name, its LoRA id
(vLLM gives a re-loaded adapter a new id) and its folder's file version
(sizes, mtimes, inodes of ``adapter_config.json`` and the weights). The same
prompt on the same adapter still hits; different adapters, or one adapter's
old and new weights, never share a block.

Guard: vLLM 0.26.x; ``_gen_lora_extra_hash_keys`` (looked up by name at call
time by ``generate_block_hash_extra_keys``). Goes away if vLLM keys LoRA
blocks by the adapter's identity (id or content), not its name.
"""

from __future__ import annotations

from vllm_slora.patches import guard

TARGET = "vllm.v1.core.kv_cache_utils"


def lora_extra_hash_keys(request) -> list[str]:
    """Once per request (vLLM asks per block): the files are read as of its
    arrival, as the rest of the engine reads them."""
    lora = request.lora_request
    if not lora:
        return []
    keys = getattr(request, "_slora_lora_keys", None)
    if keys is None:
        from vllm_slora.memory.layout import file_version

        path = lora.lora_path or ""
        keys = [lora.lora_name, str(lora.lora_int_id), f"{path}@{file_version(path) if path else ''}"]
        request._slora_lora_keys = keys
    return keys


def apply() -> None:
    from vllm.v1.core import kv_cache_utils

    guard(kv_cache_utils, "_gen_lora_extra_hash_keys", "generate_block_hash_extra_keys")
    kv_cache_utils._gen_lora_extra_hash_keys = lora_extra_hash_keys
