"""Thousands of PEFT adapter folders from a small pool of weight files.

Two thousand Llama-2-7B adapters of rank up to 64 on q,k,v,o would be about
120 GB of random weights. Instead each rank gets ``pool`` distinct
``adapter_model.safetensors`` files, and every adapter folder holds its own
``adapter_config.json`` (its rank, its targets) plus a hard link (a symlink
where the file system refuses) to one of the files of its rank. vLLM and the
plugin see distinct adapters (distinct names, ids and folders) whose weights
repeat every ``pool`` adapters of a rank. Making the pool takes seconds: the
tensors are slices of one random buffer at file-dependent offsets, written
straight into safetensors files (no torch).

Caveat for readers of the numbers: the pool (about ``pool x 240 MB`` for the
7B shape and ranks 8..64) stays in the page cache, so a system that reloads
adapters from disk reads them from memory here.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from vllm_slora.testing.adapters import ATTN, module_shapes


# numpy dtype, safetensors dtype name; bfloat16 is stored as the top half of float32.
DTYPES = {"float16": (np.float16, "F16"), "bfloat16": (np.uint16, "BF16"), "float32": (np.float32, "F32")}


def _elements(config: dict, rank: int, targets) -> int:
    shapes = module_shapes(config)
    return config["num_hidden_layers"] * sum(rank * sum(shapes[m]) for m in targets)


def adapter_bytes(config: dict, rank: int, targets) -> int:
    """Size of one adapter's weights in the model's dtype."""
    itemsize = 4 if config.get("torch_dtype") == "float32" else 2
    return _elements(config, rank, targets) * itemsize


def _random(size: int, dtype: str, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(size, dtype=np.float32) * np.float32(0.02)
    if dtype == "bfloat16":
        return (x.view(np.uint32) >> 16).astype(np.uint16)
    return x.astype(DTYPES[dtype][0])


def _write_file(path: Path, config: dict, rank: int, targets, buf: np.ndarray, offset: int, dtype: str) -> None:
    """A safetensors file whose tensors are consecutive slices of ``buf`` from
    ``offset``: the header, then one slice of the buffer, no copies."""
    shapes, header, at = module_shapes(config), {}, 0
    itemsize = buf.dtype.itemsize
    for layer in range(config["num_hidden_layers"]):
        for m in targets:
            k, n = shapes[m]
            prefix = f"base_model.model.model.layers.{layer}.{'self_attn' if m in ATTN else 'mlp'}.{m}"
            for name, shape in ((".lora_A.weight", [rank, k]), (".lora_B.weight", [n, rank])):
                size = shape[0] * shape[1] * itemsize
                header[prefix + name] = {"dtype": DTYPES[dtype][1], "shape": shape,
                                         "data_offsets": [at, at + size]}
                at += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        f.write(memoryview(buf[offset:offset + at // itemsize]))
    tmp.rename(path)


def weight_pool(root: Path, model_path: Path, ranks, targets, pool: int, seed: int = 0) -> dict[int, list[Path]]:
    """``pool`` distinct weight files per rank under ``root/weights`` (kept if there)."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    tag = "-".join(m.split("_")[0] for m in targets)  # the files of other targets differ
    files = {r: [root / "weights" / f"{tag}-r{r}-{j}.safetensors" for j in range(pool)]
             for r in sorted(set(ranks))}
    missing = [(r, j) for r, paths in files.items() for j, p in enumerate(paths) if not p.exists()]
    if not missing:
        return files
    (root / "weights").mkdir(parents=True, exist_ok=True)
    dtype = config.get("torch_dtype", "float16")
    stride = 4099  # a prime: every file starts at a different offset of the buffer
    buf = _random(_elements(config, max(files), targets) + stride * pool * len(files), dtype, seed)
    for r, j in missing:
        _write_file(files[r][j], config, r, targets, buf, stride * (j * len(files) + list(files).index(r)), dtype)
    return files


def adapter_config(model_path: Path, rank: int, targets) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        # vLLM's filesystem resolver (online mode) matches this to the served model.
        "base_model_name_or_path": str(model_path),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }


def make_folders(root: Path, model_path: Path, adapters: dict[str, int], targets, pool: int,
                 seed: int = 0) -> dict[str, Path]:
    """One folder ``root/<name>`` per ``name -> rank``; weights shared by link."""
    root = Path(root)
    files = weight_pool(root, model_path, adapters.values(), targets, pool, seed)
    folders, seen = {}, dict.fromkeys(files, 0)
    for name, rank in adapters.items():
        folder = root / name
        weights = folder / "adapter_model.safetensors"
        src = files[rank][seen[rank] % pool]  # the files of a rank in turn
        seen[rank] += 1
        if not weights.exists():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "adapter_config.json").write_text(json.dumps(adapter_config(model_path, rank, targets)))
            try:
                os.link(src, weights)
            except OSError:
                weights.symlink_to(src)
        folders[name] = folder
    return folders
