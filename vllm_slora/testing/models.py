"""Llama model folders that need no download.

``make_tiny_llama`` writes a config.json and seeded random weights
(safetensors), small enough for CPU tests and exact comparisons with a plain
PyTorch forward; ``arch`` picks another Llama-style architecture (Mistral,
Qwen2 with q/k/v biases, Qwen3 with q/k norms and a head_dim of its own,
Phi-3 with q/k/v and gate/up fused in the checkpoint, Gemma 2, Mixtral).
``make_llama_config`` writes the config.json of a real architecture for
``load_format="dummy"`` benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path

REAL_SHAPES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
}


def llama_config(*, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                 num_attention_heads: int, num_key_value_heads: int, vocab_size: int,
                 dtype: str = "float16", max_position_embeddings: int = 4096) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": hidden_size // num_attention_heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attention_bias": False,
        "mlp_bias": False,
    }


# Llama-style architectures the tests build tiny: what each changes in the
# config and which extra weights it has (q/k/v biases, q/k norms).
ARCHITECTURES = {
    "llama": dict(config={}, qkv_bias=False, qk_norm=False),
    "mistral": dict(config={"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                            "sliding_window": None}, qkv_bias=False, qk_norm=False),
    "qwen2": dict(config={"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                          "use_sliding_window": False, "sliding_window": None,
                          "max_window_layers": 0}, qkv_bias=True, qk_norm=False),
    # head_dim 64 with hidden 128 and 4 heads: q is wider than the hidden size.
    "qwen3": dict(config={"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                          "use_sliding_window": False, "sliding_window": None,
                          "max_window_layers": 0, "head_dim": 64}, qkv_bias=False, qk_norm=True),
    # Gemma 2: norms before and after the MLP as well, tied embeddings, GELU,
    # its own attention scale; every other layer a sliding window (of 16
    # tokens, shorter than most test prompts, so that it matters) and logit
    # soft-capping as in the real configs. Gemma scales the embeddings by
    # sqrt(hidden) and reads logits through them: at unit scale a token's own
    # embedding outweighs what the layers add and greedy decoding repeats the
    # last token, so the tiny model's embeddings are scaled down.
    "gemma2": dict(config={"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
                           "head_dim": 32, "query_pre_attn_scalar": 32, "hidden_activation":
                           "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
                           "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                           "sliding_window": 16, "tie_word_embeddings": True,
                           "layer_types": ["sliding_attention", "full_attention"]},
                   qkv_bias=False, qk_norm=False, ffn_norms=True, tied=True, embed_scale=0.02),
    # Phi-3: Llama's layers with q, k, v stored as one weight (qkv_proj) and
    # gate, up as another (gate_up_proj), the modules its adapters target.
    # Phi3Config's pad token (32000) must lie in the tiny vocabulary.
    "phi3": dict(config={"architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
                         "sliding_window": None, "pad_token_id": 0},
                 qkv_bias=False, qk_norm=False, fused=True),
    # Mixtral: a mixture of 4 experts (top 2) in place of each dense MLP.
    "mixtral": dict(config={"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                            "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
                    qkv_bias=False, qk_norm=False, experts=4),
}


def make_llama_config(path: str | Path, arch: str = "llama-2-7b", dtype: str = "float16") -> Path:
    """A folder with the config.json of a real architecture (no weights)."""
    if arch not in REAL_SHAPES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(REAL_SHAPES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(llama_config(**REAL_SHAPES[arch], dtype=dtype), indent=2))
    return path


def make_word_tokenizer(path: str | Path, vocab_size: int) -> Path:
    """A tokenizer for models without one (dummy weights, random token ids):
    token ``i >= 3`` is the word ``t<i>``, 0-2 are <unk>, <s>, </s>; text is
    the words joined by spaces, so decoding then encoding gives the same ids
    (what ``vllm bench serve``'s random dataset relies on)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path = Path(path)
    if (path / "tokenizer.json").exists():
        return path
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # words joined by spaces
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
        "eos_token": "</s>", "model_max_length": 1 << 20}))
    return path


def tiny_weights(config: dict, seed: int) -> dict:
    """Seeded random Llama weights under Hugging Face names."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config["head_dim"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim

    def linear(out_f: int, in_f: int):
        return torch.randn(out_f, in_f, generator=g) / in_f**0.5

    weights = {
        "model.embed_tokens.weight": torch.randn(config["vocab_size"], h, generator=g),
        "model.norm.weight": torch.ones(h),
        "lm_head.weight": linear(config["vocab_size"], h),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": linear(q_out, h),
            p + "self_attn.k_proj.weight": linear(kv_out, h),
            p + "self_attn.v_proj.weight": linear(kv_out, h),
            p + "self_attn.o_proj.weight": linear(h, q_out),
            p + "mlp.gate_proj.weight": linear(inter, h),
            p + "mlp.up_proj.weight": linear(inter, h),
            p + "mlp.down_proj.weight": linear(h, inter),
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
        }
    return weights


def make_tiny_llama(path: str | Path, *, hidden: int = 128, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, intermediate: int = 256, vocab: int = 512,
                    seed: int = 0, dtype: str = "float32", arch: str = "llama") -> Path:
    """A tiny GQA model of a Llama-style ``arch`` (``ARCHITECTURES``) with
    seeded weights, loadable by vLLM and transformers."""
    import torch
    from safetensors.torch import save_file

    from vllm_slora.testing.adapters import module_shapes

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = llama_config(hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, vocab_size=vocab, dtype=dtype,
                          max_position_embeddings=2048) | spec["config"]
    weights = tiny_weights(config, seed)
    g = torch.Generator().manual_seed(seed + 1)
    shapes = module_shapes(config)
    widths = {m: shapes[m][1] for m in ("q_proj", "k_proj", "v_proj")}
    for i in range(layers):
        p = f"model.layers.{i}.self_attn."
        if spec["qkv_bias"]:
            weights |= {p + f"{m}.bias": 0.1 * torch.randn(n, generator=g) for m, n in widths.items()}
        if spec["qk_norm"]:
            weights |= {p + f"{m}.weight": 1 + 0.1 * torch.randn(config["head_dim"], generator=g)
                        for m in ("q_norm", "k_norm")}
        if spec.get("ffn_norms"):
            weights |= {f"model.layers.{i}.{m}.weight": 0.1 * torch.randn(hidden, generator=g)
                        for m in ("pre_feedforward_layernorm", "post_feedforward_layernorm")}
    if spec.get("tied"):
        del weights["lm_head.weight"]
    weights["model.embed_tokens.weight"] *= spec.get("embed_scale", 1.0)
    for i in range(layers if spec.get("fused") else 0):  # the checkpoint's fused weights
        for part, fused, slices in (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                                    ("mlp", "gate_up_proj", ("gate_proj", "up_proj"))):
            p = f"model.layers.{i}.{part}."
            weights[p + f"{fused}.weight"] = torch.cat([weights.pop(p + f"{m}.weight") for m in slices])
    for i in range(layers if spec.get("experts") else 0):  # experts in place of the dense MLP
        p = f"model.layers.{i}."
        for m in ("gate_proj", "up_proj", "down_proj"):
            del weights[p + f"mlp.{m}.weight"]
        moe = p + "block_sparse_moe."
        weights[moe + "gate.weight"] = torch.randn(spec["experts"], hidden, generator=g) / hidden**0.5
        for e in range(spec["experts"]):
            for w, shape in (("w1", (intermediate, hidden)), ("w2", (hidden, intermediate)),
                             ("w3", (intermediate, hidden))):
                weights[moe + f"experts.{e}.{w}.weight"] = torch.randn(*shape, generator=g) / shape[1]**0.5
    torch_dtype = getattr(torch, dtype)
    save_file({k: v.to(torch_dtype).contiguous() for k, v in weights.items()},
              str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
