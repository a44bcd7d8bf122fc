"""Random PEFT LoRA adapters (``adapter_config.json`` +
``adapter_model.safetensors``) for a Llama folder made by ``models``, in
PEFT's key format: on Llama's seven projections, or on Phi-3's fused ones
(``FUSED``: qkv_proj and gate_up_proj as the checkpoint stores them)."""

from __future__ import annotations

import json
from pathlib import Path

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL_SEVEN = ATTN + MLP
FUSED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def module_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each Llama projection and of the fused
    qkv_proj (q, k, v rows in turn) and gate_up_proj (gate, up)."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim", h // config["num_attention_heads"])
    q = config["num_attention_heads"] * head_dim
    kv = config["num_key_value_heads"] * head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
            "qkv_proj": (h, q + 2 * kv), "gate_up_proj": (h, 2 * inter)}


def module_path(module: str) -> str:
    """'q_proj' -> 'self_attn.q_proj', 'down_proj' -> 'mlp.down_proj' (under a layer)."""
    return f"{'self_attn' if module in ATTN + ('qkv_proj',) else 'mlp'}.{module}"


def adapter_tensors(config: dict, rank: int, target_modules, seed: int, dtype):
    import torch

    g = torch.Generator().manual_seed(seed)
    shapes = module_shapes(config)
    tensors = {}
    for i in range(config["num_hidden_layers"]):
        for m in target_modules:
            k, n = shapes[m]
            prefix = f"base_model.model.model.layers.{i}.{module_path(m)}"
            # B is not zero (unlike a fresh PEFT init) so that every adapter
            # changes the outputs and a mix-up between adapters shows.
            tensors[prefix + ".lora_A.weight"] = (torch.randn(rank, k, generator=g) / k**0.5).to(dtype)
            tensors[prefix + ".lora_B.weight"] = (torch.randn(n, rank, generator=g) / rank**0.5).to(dtype)
    return tensors


def make_peft_adapter(path: str | Path, model_path: str | Path, rank: int,
                      target_modules=ALL_SEVEN, seed: int = 0, alpha: float | None = None,
                      dtype: str | None = None) -> Path:
    """Write one adapter folder; alpha defaults to rank (scaling 1)."""
    import torch
    from safetensors.torch import save_file

    path, model_path = Path(path), Path(model_path)
    config = json.loads((model_path / "config.json").read_text())
    torch_dtype = getattr(torch, dtype or config.get("torch_dtype", "float32"))
    path.mkdir(parents=True, exist_ok=True)
    save_file(adapter_tensors(config, rank, list(target_modules), seed, torch_dtype),
              str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_path),
        "r": rank,
        "lora_alpha": alpha if alpha is not None else rank,
        "lora_dropout": 0.0,
        "target_modules": list(target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }, indent=2))
    return path


def make_adapters(root: str | Path, model_path: str | Path, ranks, seed: int = 0,
                  target_modules=ALL_SEVEN, progress: bool = False) -> list[Path]:
    """One adapter per entry of ``ranks`` under ``root`` (kept if already there)."""
    root = Path(root)
    items = list(enumerate(ranks))
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="adapters", unit="adapter")
    paths = []
    for i, rank in items:
        path = root / f"lora-{i:04d}-r{rank}"
        if not (path / "adapter_model.safetensors").exists():
            make_peft_adapter(path, model_path, rank, target_modules, seed=seed * 100003 + i)
        paths.append(path)
    return paths
