"""An adapter's PEFT folder as the engine reads it: headers, not weights.

``read_adapter_meta`` gives rank, module kinds and scale from the config and
the safetensors header, cached per file version (``file_version``: a folder
rewritten or replaced in place is read again). The front end's full
validation, one message per fault, is ``vllm_slora.adapters``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

from vllm_slora.memory.layout import KINDS, PACKED, AdapterMeta, adapter_kinds, split_key

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a safetensors file, from its header only."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def file_version(path: str) -> tuple:
    """(size, mtime_ns, inode) of an adapter folder's two files, None for a
    missing one: a folder rewritten or replaced in place gets a new version."""
    out = []
    for name in (CONFIG_FILE, ADAPTER_FILE):
        try:
            st = os.stat(Path(path) / name)
            out.append((st.st_size, st.st_mtime_ns, st.st_ino))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def read_adapter_meta(path: str) -> AdapterMeta:
    """Rank, module kinds and scale of a PEFT folder (reads only headers),
    cached per file version: an adapter replaced on disk is read again, so
    every part of the engine budgets and packs the files as they are now."""
    return _read_adapter_meta(str(path), file_version(path))


@functools.lru_cache(maxsize=65536)
def _read_adapter_meta(path: str, version: tuple) -> AdapterMeta:
    # Reads what packing needs, with the checks packing relies on; the front
    # end's full validation, with a message per fault, is
    # ``vllm_slora.adapters.check_adapter``.
    folder = Path(path)
    cfg_file, weights = folder / CONFIG_FILE, folder / ADAPTER_FILE
    if not cfg_file.exists() or not weights.exists():
        raise FileNotFoundError(f"adapter folder '{path}' needs adapter_config.json and "
                                f"{ADAPTER_FILE} (save it with PEFT's save_pretrained)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"adapter '{path}' has rank_pattern/alpha_pattern; paged LoRA needs "
                         f"one rank per adapter: re-save it without per-module ranks")
    modules, rank = set(), None
    for key, shape in tensor_shapes(weights).items():
        parts = split_key(key)
        if parts is None or (parts[1] not in KINDS and parts[1] not in PACKED):
            raise ValueError(f"adapter '{path}' has weight '{key}'; paged LoRA supports "
                             f"only LoRA A/B of {', '.join(KINDS + tuple(PACKED))}")
        r = shape[0] if parts[2] == "A" else shape[1]
        if rank is not None and r != rank:
            raise ValueError(f"adapter '{path}': '{key}' has rank {r}, others {rank}; "
                             f"paged LoRA needs one rank per adapter")
        rank = r
        modules.add(parts[1])
    if rank is None:
        raise ValueError(f"adapter '{path}' has no LoRA weights")
    try:
        kinds = adapter_kinds(modules)
    except ValueError as e:
        raise ValueError(f"adapter '{path}' {e}") from None
    return AdapterMeta(path=str(path), rank=rank, kinds=kinds, scale=lora_scale(cfg, rank),
                       version=version)


def lora_scale(cfg: dict, rank: int) -> float:
    """PEFT's scaling of an adapter config: lora_alpha / r (/ sqrt(r) with rslora)."""
    alpha = cfg.get("lora_alpha", rank)
    return float(alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank)
