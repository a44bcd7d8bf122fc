"""Adapters on checkpoint-fused projections (Phi-3's qkv_proj, gate_up_proj):
packed as the adapter that names the slices (the fused A copied for each
slice, the fused B split by rows), bit for bit, on every TP rank and by
both packers; validation takes the fused shapes and refuses wrong ones and
a group named both ways. No engine."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from vllm_slora.testing.adapters import FUSED

BLOCK, HEAD_DIM = 16, 32
GEOMETRIES = [(1, 0), (2, 0), (2, 1)]  # (tp_size, tp_rank)


def tiny_config(model_dir):
    return SimpleNamespace(**json.loads((model_dir / "config.json").read_text()))


def unfused(tensors: dict, cfg) -> dict:
    """The same adapter under the slices' names: the reference packing."""
    from vllm_slora.memory.layout import PACKED, module_widths, slice_rows

    widths = module_widths(cfg)
    out = {}
    for key, t in tensors.items():
        fused = next((m for m in PACKED if f".{m}.lora_" in key), None)
        if fused is None:
            out[key] = t
            continue
        rows = slice_rows(fused, widths)
        parts = [t] * len(rows) if ".lora_A." in key else t.split([n for _, n in rows])
        for (kind, _), part in zip(rows, parts):
            out[key.replace(f".{fused}.", f".{kind}.")] = part.clone()
    return out


@pytest.mark.parametrize("targets", [FUSED, ("qkv_proj", "gate_proj", "down_proj")],
                         ids=["phi3-all", "qkv-fused-gate-split"])
def test_fused_adapter_packs_as_its_slices(tiny_model, tmp_path, targets):
    from safetensors.torch import load_file, save_file

    from vllm_slora.adapters import check_adapter
    from vllm_slora.memory.adapter_files import ADAPTER_FILE, CONFIG_FILE, read_adapter_meta
    from vllm_slora.memory.layout import PageGeometry
    from vllm_slora.memory.packing import pack_adapter, pack_file_bytes, read_header
    from vllm_slora.testing.adapters import make_peft_adapter

    cfg = tiny_config(tiny_model)
    fused = make_peft_adapter(tmp_path / "fused", tiny_model, 8, target_modules=targets, seed=3,
                              alpha=16)
    split = tmp_path / "split"
    split.mkdir()
    shutil.copy(fused / CONFIG_FILE, split / CONFIG_FILE)
    tensors = load_file(str(fused / ADAPTER_FILE))
    save_file(unfused(tensors, cfg), str(split / ADAPTER_FILE))

    meta, want_meta = read_adapter_meta(str(fused)), read_adapter_meta(str(split))
    assert (meta.rank, meta.kinds, meta.scale) == (want_meta.rank, want_meta.kinds, want_meta.scale)
    info = check_adapter(str(fused), "fused", cfg, max_rank=16)
    assert (info.rank, info.kinds) == (meta.rank, meta.kinds)

    with open(fused / ADAPTER_FILE, "rb") as f:
        header, _ = read_header(f)
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    for tp_size, tp_rank in GEOMETRIES:
        geo = PageGeometry.create(cfg, torch.float32, 2 * BLOCK * HEAD_DIM * 2 * 4 // tp_size,
                                  tp_size=tp_size, tp_rank=tp_rank)
        want = pack_adapter(want_meta, geo, load_file(str(split / ADAPTER_FILE)))
        got = pack_adapter(meta, geo, tensors)
        assert torch.equal(got, want), (tp_size, tp_rank)
        assert torch.equal(pack_file_bytes(meta, geo, data, header), want), (tp_size, tp_rank)


def test_fused_adapter_shapes_and_mixed_names_are_refused(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from vllm_slora.adapters import AdapterError, check_adapter
    from vllm_slora.memory.adapter_files import ADAPTER_FILE, read_adapter_meta
    from vllm_slora.testing.adapters import make_peft_adapter

    cfg = tiny_config(tiny_model)
    key = "base_model.model.model.layers.1.self_attn.qkv_proj.lora_B.weight"
    short = make_peft_adapter(tmp_path / "short", tiny_model, 8, target_modules=FUSED, seed=4)
    t = load_file(str(short / ADAPTER_FILE))
    t[key] = t[key][:128]  # q's rows only
    save_file(t, str(short / ADAPTER_FILE))
    with pytest.raises(AdapterError, match=r"has '.*layers\.1\.self_attn\.qkv_proj\.lora_B\.weight' "
                                           r"of shape \(128, 8\), the base model needs \(256, 8\) "
                                           r"at rank 8"):
        check_adapter(str(short), "short", cfg, max_rank=16)

    mixed = make_peft_adapter(tmp_path / "mixed", tiny_model, 8,
                              target_modules=("qkv_proj", "k_proj", "gate_up_proj"), seed=5)
    refusal = "has LoRA weights for both 'qkv_proj' and 'k_proj'; a layer group is either fused or split"
    with pytest.raises(AdapterError, match=refusal):
        check_adapter(str(mixed), "mixed", cfg, max_rank=16)
    with pytest.raises(ValueError, match=refusal):
        read_adapter_meta(str(mixed))
