"""Llama folders with a quantized base and seeded random weights, for
comparing the plugin with stock vLLM's LoRA on the same quantized model.

``load_format="dummy"`` cannot serve here: it leaves a quantized model's
integer tensors (AWQ's packed weights) as uninitialised memory, different in
each engine, and fills the others with values of +-1e-3, whose near-flat
logits make every greedy choice a near-tie. These weights are seeded and
scaled like a trained model's (``1/sqrt(fan_in)``), the output layer
``logit_scale`` times that: logits of standard deviation ``logit_scale``, so
that greedy choices among Llama 3's 128,256 tokens are not all near-ties:

- ``fp8``: a 16-bit checkpoint that vLLM quantizes as it loads
  (``quantization="fp8"``, FP8 weights and activations);
- ``awq``: an AWQ (GEMM, 4-bit, group 128, zero points) checkpoint written
  directly: random packed nibbles and zero points, scales chosen so that the
  dequantized weights have the same spread.
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_slora.testing.adapters import ALL_SEVEN, module_path, module_shapes
from vllm_slora.testing.models import llama_config

# Llama 3 8B's layer shapes and vocabulary (its 32 layers by default).
LLAMA_3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
              "version": "gemm"}
QUANTIZATIONS = ("fp8", "awq")


def make_quantized_llama(path: str | Path, quantization: str, *, layers: int | None = None,
                         shape: dict = LLAMA_3_8B, seed: int = 0, device: str = "cpu", logit_scale: float = 4.0) -> Path:
    """A Llama folder (config.json, model.safetensors) for ``quantization``
    (``QUANTIZATIONS``); ``layers`` overrides the shape's layer count."""
    import torch
    from safetensors.torch import save_file

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r}; expected one of {QUANTIZATIONS}")
    shape = dict(shape, num_hidden_layers=layers or shape["num_hidden_layers"])
    dtype = "float16"  # finer than bf16: margins between logits of ~10 are resolved
    config = llama_config(**shape, dtype=dtype, max_position_embeddings=2048)
    config["rope_theta"] = 500000.0
    if quantization == "awq":
        config["quantization_config"] = AWQ_CONFIG
    torch_dtype = getattr(torch, dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    h, vocab = shape["hidden_size"], shape["vocab_size"]
    widths = module_shapes(config)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=g, device=device) * scale).to(torch_dtype).cpu()

    weights = {"model.embed_tokens.weight": randn(vocab, h),
               "model.norm.weight": torch.ones(h, dtype=torch_dtype),
               "lm_head.weight": randn(vocab, h, scale=logit_scale * h**-0.5)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch_dtype)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch_dtype)
        for module in ALL_SEVEN:
            k, n = widths[module]
            name = p + module_path(module)
            if quantization == "fp8":
                weights[name + ".weight"] = randn(n, k, scale=k**-0.5)
            else:
                weights |= {name + "." + t: v for t, v in _awq_linear(k, n, g, device).items()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def _awq_linear(k: int, n: int, g, device) -> dict:
    """AWQ GEMM tensors of a random ``k``-in, ``n``-out layer: ``qweight``
    [k, n/8] and ``qzeros`` [k/G, n/8] int32 (eight 4-bit values each),
    ``scales`` [k/G, n] fp16. A weight is (q - z) * s with q, z uniform in
    0..15 (standard deviation of q - z: sqrt(2 * 255 / 12) = 6.5)."""
    import torch

    group = AWQ_CONFIG["group_size"]
    if k % group or n % 8:
        raise ValueError(f"AWQ needs in-features divisible by {group} and out-features by 8: {k} x {n}")

    def packed(rows: int):
        return torch.randint(-2**31, 2**31 - 1, (rows, n // 8), generator=g, device=device,
                             dtype=torch.int64).to(torch.int32).cpu()

    scales = (torch.rand(k // group, n, generator=g, device=device) + 0.5) * (k**-0.5 / 6.5)
    return {"qweight": packed(k), "qzeros": packed(k // group), "scales": scales.half().cpu()}
