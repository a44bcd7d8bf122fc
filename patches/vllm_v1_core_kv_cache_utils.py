"""Patch of ``vllm.v1.core.kv_cache_utils`` (vLLM 0.26-0.34): prefix-cache keys name the adapter's weights.

Why: vLLM keys a LoRA request's KV blocks in the prefix cache by the
adapter's *name* (``_gen_lora_extra_hash_keys``; since 0.31 by its name and
path). An adapter unloaded and loaded again under the same name with other
weights (before 0.31), or whose folder is rewritten in place (every
release), then reuses KV computed with the old weights: stale prefix hits,
wrong outputs. S-LoRA mode reads adapter files per file version
everywhere else (``vllm_slora.memory.adapter_files.file_version``), so its cache
keys must too.

What: ``_gen_lora_extra_hash_keys`` returns the adapter's name, its LoRA id
(vLLM gives a re-loaded adapter a new id), its path and its folder's file
version (sizes, mtimes, inodes of ``adapter_config.json`` and the weights),
in the shape of the release's own keys: strings before 0.31, one tagged
tuple ``("lora", name, path, ...)`` since (0.31 tags every extra key and
publishes ``key[1]``, the name, in KV events). The same prompt on the same
adapter still hits; different adapters, or one adapter's old and new
weights, never share a block.

Guard: vLLM 0.26-0.34; ``_gen_lora_extra_hash_keys`` (looked up by name at
call time by ``generate_block_hash_extra_keys``). Goes away if vLLM keys LoRA
blocks by the adapter's identity (id or content), not its name.

``apply_sliding_window_blocks`` (registered as
``vllm_v1_core_kv_cache_utils:apply_sliding_window_blocks``; vLLM 0.26 only:
since 0.27 ``unify_hybrid_kv_cache_specs`` gives sliding-window specs the
full-attention block size itself, ``_promote_local_kv_cache_specs``). Why: S-LoRA
mode turns the hybrid KV cache manager off (``vllm_engine_arg_utils.py``),
so that ``unify_hybrid_kv_cache_specs`` makes a model's sliding-window
layers (Gemma 2) full-attention specs of the one KV-cache group. vLLM 0.26
gives sliding-window layers a block size of their own (the attention
backend's smallest, 16 tokens on CPU, beside full attention's 128), which
it then cannot unify ("Hybrid KV cache manager is disabled but failed to
convert the KV cache specs to one unified type"). What:
``unify_hybrid_kv_cache_specs`` first gives unpadded sliding-window specs
the block size of the full-attention layers, when they all have one (the
block size the backend serves them with already); the window is still
applied by the attention. Guard: vLLM 0.26; ``unify_hybrid_kv_cache_specs`` (looked
up by name at call time by ``get_kv_cache_groups``),
``kv_cache_interface.SlidingWindowSpec`` and ``FullAttentionSpec``. Goes
away when vLLM unifies the block sizes itself, or when paged LoRA can use
the pages of several KV-cache groups.
"""

from __future__ import annotations

import dataclasses
import functools

from vllm_slora.patches import guard_touches
from vllm_slora.versions import at_least

TARGET = "vllm.v1.core.kv_cache_utils"
TOUCHES = {TARGET: ("_gen_lora_extra_hash_keys", "generate_block_hash_extra_keys",
                    "to_event_extra_keys@0.31-")}
SLIDING_WINDOW_TOUCHES = {
    TARGET: ("unify_hybrid_kv_cache_specs@0.26", "get_kv_cache_groups@0.26"),
    "vllm.v1.kv_cache_interface": ("SlidingWindowSpec.page_size_padded@0.26", "FullAttentionSpec@0.26"),
}


def lora_extra_hash_keys(request) -> list:
    """Once per request (vLLM asks per block): the files are read as of its
    arrival, as the rest of the engine reads them."""
    lora = request.lora_request
    if not lora:
        return []
    keys = getattr(request, "_slora_lora_keys", None)
    if keys is None:
        from vllm_slora.memory.adapter_files import file_version

        path = lora.lora_path or ""
        identity = [lora.lora_name, str(lora.lora_int_id), f"{path}@{file_version(path) if path else ''}"]
        # Since 0.31 every extra key of a block hash is a tuple tagged with its kind.
        keys = [("lora", *identity)] if at_least("0.31") else identity
        request._slora_lora_keys = keys
    return keys


def apply() -> None:
    from vllm.v1.core import kv_cache_utils

    guard_touches(TOUCHES)
    kv_cache_utils._gen_lora_extra_hash_keys = lora_extra_hash_keys


def align_sliding_window_blocks(kv_cache_spec: dict) -> None:
    """Sliding-window specs (unpadded) take the block size of the
    full-attention specs, in place, where those have one block size."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    full = {spec.block_size for spec in kv_cache_spec.values() if isinstance(spec, FullAttentionSpec)}
    if len(full) != 1:
        return
    block_size = full.pop()
    for name, spec in kv_cache_spec.items():
        if (isinstance(spec, SlidingWindowSpec) and spec.page_size_padded is None
                and spec.block_size != block_size):
            kv_cache_spec[name] = dataclasses.replace(spec, block_size=block_size)


def apply_sliding_window_blocks() -> None:
    from vllm.v1.core import kv_cache_utils

    guard_touches(SLIDING_WINDOW_TOUCHES, versions="0.26")
    stock = kv_cache_utils.unify_hybrid_kv_cache_specs

    @functools.wraps(stock)
    def unify_hybrid_kv_cache_specs(kv_cache_spec):
        align_sliding_window_blocks(kv_cache_spec)
        return stock(kv_cache_spec)

    kv_cache_utils.unify_hybrid_kv_cache_specs = unify_hybrid_kv_cache_specs
