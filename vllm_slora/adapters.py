"""Adapter validation in S-LoRA mode: one error naming the adapter, the problem and the fix.

An adapter is checked where it is first seen, before any engine state depends
on it, so that a bad adapter fails its own load or request and nothing else:

- ``/v1/load_lora_adapter`` and ``--lora-modules`` (API process,
  ``patches/vllm_entrypoints_openai_models_serving.py``): every check,
  weights included, so a broken adapter is refused at load time (HTTP 404
  for a missing folder, 400 for everything else);
- every request naming an adapter (``InputProcessor._validate_lora``, API
  process or the ``vllm.LLM`` process, ``patches/vllm_v1_engine_input_processor.py``):
  the header checks (config, rank, target modules, tensor shapes, pool
  size), cached per file version, so an adapter broken or replaced after it
  was loaded fails the request (HTTP 400, ``ValueError`` from
  ``LLM.generate``) before it reaches the engine; the engine keeps serving.

Checks: folder; ``adapter_config.json`` (present, JSON, ``peft_type`` LORA,
``r`` a positive int, no DoRA / ``modules_to_save`` / bias / per-module
ranks); ``r`` <= ``--max-lora-rank`` (S-LoRA mode enforces it like stock
vLLM does: it bounds the pages one adapter may take); ``adapter_model.safetensors``
(present, readable); each tensor a LoRA A/B of a projection the base model
has (or of a fused qkv_proj / gate_up_proj, as Phi-3 adapters have, but not
both for one layer group), of a layer it has, of the shape it needs at rank
``r`` (a fused B: the slices' rows in turn); the adapter's
pages fit the KV pool; with ``weights=True`` no NaN or inf. NaN/inf weights
are rejected: the paged kernels would add them to every token of the
request, whose outputs would be NaN logits, i.e. garbage.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

from vllm.exceptions import VLLMValidationError

# vLLM internals this module relies on (the drift check's list).
TOUCHES = {
    "vllm.exceptions": ("VLLMValidationError",),
    "vllm.utils.torch_utils": ("STR_DTYPE_TO_TORCH_DTYPE",),
    "vllm.v1.kv_cache_interface": ("AttentionSpec.page_size_bytes",),
}

from vllm_slora.memory.adapter_files import (ADAPTER_FILE, CONFIG_FILE, file_version, lora_scale,
                                             tensor_shapes)
from vllm_slora.memory.layout import (KINDS, PACKED, AdapterMeta, PageGeometry, adapter_kinds,
                                      lora_shape, lora_targets, module_widths, slice_rows,
                                      split_key)


class AdapterError(VLLMValidationError, ValueError):
    """A bad adapter. ``not_found``: the folder or a file is missing (HTTP 404
    from the load endpoint).

    A ``VLLMValidationError``, so that vLLM's server answers a request naming
    it with HTTP 400 and the message: since 0.27 ``AsyncLLM.generate``
    re-raises only client errors (``VLLMClientError``) and turns any other
    into a bare 500. Still a ``ValueError`` for ``LLM.generate`` callers
    (0.26's ``VLLMValidationError`` is one; later ones are not)."""

    def __init__(self, name: str | None, path: str, problem: str, not_found: bool = False):
        self.name, self.path, self.problem, self.not_found = name, str(path), problem, not_found
        label = f"adapter '{name}' ({path})" if name and name != str(path) else f"adapter '{path}'"
        super().__init__(f"{label} {problem}")

    def __reduce__(self):
        return type(self), (self.name, self.path, self.problem, self.not_found)


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    kinds: tuple[str, ...]  # as layout.read_adapter_meta: fused groups completed
    blocks: int | None  # KV blocks its pages take (None: geometry unknown)
    scale: float = 1.0  # as layout.read_adapter_meta: lora_alpha / r (rslora: / sqrt(r))
    version: tuple = ()  # layout.file_version of the folder checked

    def meta(self, path: str) -> AdapterMeta:
        """The ``layout.AdapterMeta`` of the folder checked: what the pager
        would read from its files, without reading them again."""
        return AdapterMeta(path=str(path), rank=self.rank, kinds=self.kinds, scale=self.scale,
                           version=self.version)


def check_adapter(path: str, name: str | None, hf_config, max_rank: int, *,
                  geometry: PageGeometry | None = None, usable_blocks: int | None = None,
                  weights: bool = False, kinds: frozenset[str] | None = None) -> AdapterInfo:
    """Validate a PEFT folder for this base model; raise ``AdapterError``.

    Header checks are cached per (path, file sizes and mtimes), so a request
    pays a few ``stat`` calls; ``weights=True`` also reads every tensor.
    ``kinds``: the module kinds the engine applies LoRA to
    (``layout.deployment_kinds`` of ``--lora-target-modules``; None: all):
    the adapter must have one of them, and only theirs take pages.
    """
    key = _version(path, name)
    info = _check_headers(path, name, key, _model_key(hf_config), max_rank)
    if weights:
        _check_finite(path, name, key)
    kept = info.meta(path).restricted(kinds).kinds  # the pool's restriction (AdapterMeta)
    if not kept:
        raise AdapterError(name, path, (
            f"has no LoRA weights on the modules --lora-target-modules names "
            f"({', '.join(sorted(kinds))}); its modules: {', '.join(info.kinds)}"))
    blocks = None
    if geometry is not None:
        blocks = geometry.blocks_for(info.rank, kept)
        if usable_blocks is not None and blocks > usable_blocks:
            raise AdapterError(name, path, (
                f"needs {blocks} KV blocks for its pages (rank {info.rank}), the KV cache has "
                f"{usable_blocks}; give vLLM more KV cache memory (--gpu-memory-utilization, "
                f"VLLM_CPU_KVCACHE_SPACE) or use a smaller rank"))
    return dataclasses.replace(info, blocks=blocks, version=key[1:])


def _version(path: str, name: str | None) -> tuple:
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(name, path, "was not found: no such folder; check the path",
                           not_found=True)
    return (_resolved(path), *file_version(path))


@functools.lru_cache(maxsize=65536)
def _resolved(path: str) -> str:
    # Path.resolve walks every component (~40 us; 3% of the engine's thread
    # at 2,000 adapters): once per path. A folder swapped under the same
    # path still gets a new version from its files' stats.
    return str(Path(path).resolve())


# hf_config objects are not hashable: key the cache by the widths and layers.
# Computed once per config object (~50 us through transformers' attribute
# lookups; the scheduler checks a dozen adapters a step at 2,000 adapters).
_MODEL_KEYS: dict[int, tuple] = {}  # id(hf_config) -> (hf_config, key): the object kept alive


def _model_key(hf_config) -> tuple:
    got = _MODEL_KEYS.get(id(hf_config))
    if got is not None and got[0] is hf_config:
        return got[1]
    arch = ", ".join(getattr(hf_config, "architectures", None) or ["this base model"])
    key = (tuple(sorted(module_widths(hf_config).items())), hf_config.num_hidden_layers,
           lora_targets(hf_config), arch)
    if len(_MODEL_KEYS) >= 64:
        _MODEL_KEYS.clear()
    _MODEL_KEYS[id(hf_config)] = (hf_config, key)
    return key


@functools.lru_cache(maxsize=4096)
def _check_headers(path: str, name: str | None, version: tuple, model: tuple,
                   max_rank: int) -> AdapterInfo:
    widths, num_layers, targets, arch = dict(model[0]), model[1], model[2], model[3]
    folder = Path(path)
    cfg_file, weights = folder / CONFIG_FILE, folder / ADAPTER_FILE

    def fail(problem: str, not_found: bool = False):
        raise AdapterError(name, path, problem, not_found)

    if not cfg_file.is_file():
        fail(f"has no {CONFIG_FILE}; save the adapter with PEFT's save_pretrained",
             not_found=True)
    try:
        cfg = json.loads(cfg_file.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        fail(f"has an invalid {CONFIG_FILE} ({e}); re-save it with PEFT")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        fail(f"has peft_type '{peft_type}' in {CONFIG_FILE}; only LoRA adapters can be served")
    rank = cfg.get("r")
    if rank is None:
        fail(f"has no 'r' (the LoRA rank) in {CONFIG_FILE}; re-save it with PEFT")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        fail(f"has 'r' = {rank!r} in {CONFIG_FILE}; the LoRA rank must be a positive integer")
    if rank > max_rank:
        fail(f"has rank {rank} > --max-lora-rank {max_rank}; start vLLM with "
             f"--max-lora-rank {_pow2_at_least(rank)} or use an adapter of rank <= {max_rank}")
    if cfg.get("use_dora"):
        fail("is a DoRA adapter (use_dora); vLLM serves plain LoRA only")
    if cfg.get("modules_to_save"):
        fail(f"has modules_to_save {cfg['modules_to_save']}; vLLM supports only "
             f"modules_to_save = None")
    if cfg.get("bias", "none") != "none":
        fail(f"has bias = {cfg['bias']!r}; vLLM supports only bias = 'none'")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        fail("has rank_pattern/alpha_pattern; paged LoRA needs one rank per adapter: "
             "re-save it without per-module ranks")

    if not weights.is_file():
        other = [p.name for p in folder.glob("adapter_model.*")]
        hint = (f" (found {', '.join(other)}: convert it to safetensors)" if other
                else "; save the adapter with PEFT's save_pretrained")
        fail(f"has no {ADAPTER_FILE}{hint}", not_found=True)
    modules = set()
    try:
        shapes = tensor_shapes(weights)
    except Exception as e:  # safetensors raises its own error types
        fail(f"has a corrupt {ADAPTER_FILE} ({type(e).__name__}: {e}); re-save or "
             f"re-download the adapter")
    supported = ", ".join(KINDS + tuple(PACKED))
    for key, shape in shapes.items():
        parts = split_key(key)
        if parts is None:
            fail(f"has tensor '{key}', which is not a LoRA A/B weight of a projection; "
                 f"paged LoRA serves LoRA of {supported} only")
        layer, module, ab = parts
        if module not in KINDS and module not in PACKED:
            fail(f"targets module '{module}' ('{key}'), which this base model does not have "
                 f"as a LoRA target; supported: {supported}")
        rows = slice_rows(module, widths)
        if rows[0][0] not in targets:
            fail(f"targets module '{module}' ('{key}'); {arch} is a mixture-of-experts model, "
                 f"where vllm_slora serves LoRA on {', '.join(targets)} only")
        if layer >= num_layers:
            fail(f"has '{key}' for layer {layer}, the base model has {num_layers} layers; "
                 f"was it trained for another base model?")
        want = lora_shape(module, ab, rank, widths)
        if shape != want:
            fail(f"has '{key}' of shape {shape}, the base model needs {want} at rank {rank}; "
                 f"was it trained for another base model?")
        modules.add(module)
    if not modules:
        fail(f"has no LoRA weights in {ADAPTER_FILE}")
    try:
        kinds = adapter_kinds(modules)
    except ValueError as e:
        fail(str(e))
    return AdapterInfo(rank, kinds, None, lora_scale(cfg, rank))


@functools.lru_cache(maxsize=4096)
def _check_finite(path: str, name: str | None, version: tuple) -> None:
    import torch
    from safetensors import safe_open

    with safe_open(str(Path(path) / ADAPTER_FILE), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = "NaN" if bool(torch.isnan(t).any()) else "inf"
                raise AdapterError(name, path, (
                    f"has {bad} values in '{key}'; NaN/inf weights are rejected (they would "
                    f"make every output of its requests NaN): fix or retrain the adapter"))


def _pow2_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


def engine_geometry(vllm_config) -> tuple[PageGeometry | None, int | None]:
    """Page geometry and usable KV blocks as the scheduler will have them, from
    the front end's copy of the config (None, None before the engine started).

    The KV block of a Llama-style attention layer holds K and V of
    ``block_size`` tokens: ``2 * block_size * kv_heads * head_dim`` elements of
    the KV-cache dtype (``AttentionSpec.page_size_bytes``).
    """
    import torch

    cache, model = vllm_config.cache_config, vllm_config.model_config
    lora = vllm_config.lora_config
    if not cache.num_gpu_blocks or not cache.block_size or lora is None:
        return None, None
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    hf = model.hf_text_config
    kv_dtype = (model.dtype if cache.cache_dtype == "auto"
                else STR_DTYPE_TO_TORCH_DTYPE.get(cache.cache_dtype))
    if kv_dtype is None:
        return None, None
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    esize = torch.empty((), dtype=kv_dtype).element_size()
    tp = vllm_config.parallel_config.tensor_parallel_size
    page_bytes = 2 * cache.block_size * (kv_heads // tp) * head_dim * esize
    lora_dtype = lora.lora_dtype if isinstance(lora.lora_dtype, torch.dtype) else model.dtype
    try:
        geo = PageGeometry.create(hf, lora_dtype, page_bytes, tp_size=tp)
    except ValueError:
        return None, None
    return geo, cache.num_gpu_blocks - 1  # block 0 is vLLM's null block
