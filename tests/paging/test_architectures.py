"""Llama-style architectures other than Llama (issue 16): the plugin's
outputs equal stock vLLM's LoRA on the same adapters, in fp32 on CPU.

Each is a tiny random model of its own config (``testing/models.py``):
Mistral, Qwen2 (q/k/v biases in the base layer; the LoRA output adds to
the biased output) and Qwen3 (q/k norms, a head_dim of 64 with a hidden size
of 128, so q is twice as wide as the model). Adapters of mixed ranks on all
seven projections; every fifth request without an adapter (compared with
the base model without LoRA). Phi-3 (adapters on its fused projections) and
Gemma 2 (sliding-window layers) have a test each, every request with an
adapter so that two engines suffice; Mixtral is compared with HF + PEFT.
"""

from __future__ import annotations

import pytest
from conftest import prompts, run_engine

from vllm_slora.testing.adapters import FUSED, make_adapters
from vllm_slora.testing.models import ARCHITECTURES, make_tiny_llama

pytestmark = pytest.mark.slow

COMMON = {"dtype": "float32", "max_lora_rank": 16}
LOGPROB_TOL = 2e-3


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
def test_same_outputs_as_stock(tmp_path, arch):
    model = make_tiny_llama(tmp_path / "model", arch=arch, seed=5)
    adapters = [str(p) for p in make_adapters(tmp_path / "adapters", model, [4, 8, 16, 8], seed=6)]
    reqs = [(p, None if i % 5 == 4 else adapters[i % len(adapters)])
            for i, p in enumerate(prompts(10, seed=11))]
    phases = [{"name": arch, "requests": reqs, "max_tokens": 8}]
    stock = run_engine({"model": str(model), "mode": "stock", "phases": phases,
                        "llm_kwargs": dict(COMMON, max_loras=4, max_cpu_loras=4)})
    # Requests without an adapter against the base model: stock's CPU LoRA
    # ops give them the last slot's adapter (tests/paging/test_outputs.py).
    base = run_engine({"model": str(model), "mode": "stock", "phases": phases,
                       "enable_lora": False, "llm_kwargs": {"dtype": "float32"}})
    slora = run_engine({"model": str(model), "mode": "slora", "phases": phases,
                        "llm_kwargs": dict(COMMON, max_loras=1)})
    got = slora["phases"][0]["outputs"]
    assert len(got) == len(reqs)
    for i, g in enumerate(got):
        w = (stock if reqs[i][1] else base)["phases"][0]["outputs"][i]
        assert g["token_ids"] == w["token_ids"], f"{arch} request {i} ({reqs[i][1]})"
        diff = max(abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"]))
        assert diff <= LOGPROB_TOL, f"{arch} request {i}: logprob diff {diff}"
    # The adapters were paged into the KV pool, not into stock's slots.
    assert slora["phases"][0]["report"]["stats"]["loads"] >= len(adapters)


def assert_same_outputs(slora: dict, stock: dict, reqs: list, label: str) -> None:
    got, want = slora["phases"][0]["outputs"], stock["phases"][0]["outputs"]
    assert len(got) == len(want) == len(reqs)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g["token_ids"] == w["token_ids"], f"{label} request {i} ({reqs[i][1]})"
        diff = max(abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"]))
        assert diff <= LOGPROB_TOL, f"{label} request {i}: logprob diff {diff}"


def run_both(model, reqs: list, label: str, num_adapters: int) -> None:
    """Stock vLLM's LoRA and the plugin on the same requests (each with an
    adapter): the same tokens and logprobs, the adapters paged into the pool."""
    phases = [{"name": label, "requests": reqs, "max_tokens": 8}]
    stock = run_engine({"model": str(model), "mode": "stock", "phases": phases,
                        "llm_kwargs": dict(COMMON, max_loras=num_adapters,
                                           max_cpu_loras=num_adapters)})
    slora = run_engine({"model": str(model), "mode": "slora", "phases": phases,
                        "llm_kwargs": dict(COMMON, max_loras=1)})
    assert_same_outputs(slora, stock, reqs, label)
    report = slora["phases"][0]["report"]
    assert report["stats"]["loads"] >= num_adapters
    assert report["adapters_checked_in_kv"] and not report["adapters_mismatched_in_kv"]


def test_phi3_fused_adapters_same_outputs_as_stock(tmp_path):
    """Phi-3 stores q, k, v (and gate, up) as one checkpoint weight, and its
    adapters target the fused modules: qkv_proj, o_proj, gate_up_proj,
    down_proj, one A and one B each. The plugin packs them as the slices'
    kinds (the A copied, the B split by rows; layout.py, "fused adapter");
    stock vLLM serves them as one slice. Mixed ranks."""
    model = make_tiny_llama(tmp_path / "model", arch="phi3", seed=5)
    adapters = [str(p) for p in make_adapters(tmp_path / "adapters", model, [4, 16, 8], seed=6,
                                              target_modules=FUSED)]
    reqs = [(p, adapters[i % 3]) for i, p in enumerate(prompts(6, seed=13))]
    run_both(model, reqs, "phi3", len(adapters))


def test_gemma2_sliding_window_same_outputs_as_stock(tmp_path):
    """Gemma 2 alternates sliding-window and full-attention layers, with
    logit soft-capping. S-LoRA mode turns vLLM's hybrid KV cache manager
    off (one KV-cache group, whose blocks hold the adapters' pages; the
    sliding-window layers keep their full KV, in blocks of the full layers'
    size: patches/vllm_v1_core_kv_cache_utils.py); stock keeps it on (two
    groups, KV outside the window dropped). The tiny model's window is 16
    tokens and most prompts are longer, so the window shapes the outputs of
    both. Adapters of mixed ranks on all seven projections."""
    window = ARCHITECTURES["gemma2"]["config"]["sliding_window"]
    model = make_tiny_llama(tmp_path / "model", arch="gemma2", seed=5)
    adapters = [str(p) for p in make_adapters(tmp_path / "adapters", model, [4, 16, 8], seed=6)]
    reqs = [(p, adapters[i % 3]) for i, p in enumerate(prompts(6, seed=17, lo=8, hi=48))]
    assert sum(len(p) > window for p, _ in reqs) >= 4
    run_both(model, reqs, "gemma2", len(adapters))


def test_mixture_of_experts_attention_lora_equals_hf_peft(tmp_path):
    """Mixtral (4 experts, top 2): LoRA on q, k, v, o served from the KV pool,
    the experts as the base model has them, against Hugging Face + PEFT
    (stock vLLM's LoRA cannot run MoE LoRA on CPU: "Monolithic kernels are
    not supported for Fused MoE LoRA"). An adapter on the MLP projections is
    refused at registration, naming the module and the architecture."""
    import json
    from types import SimpleNamespace

    from peft_reference import PeftReference

    from vllm_slora.adapters import AdapterError, check_adapter

    model = make_tiny_llama(tmp_path / "model", arch="mixtral", seed=5)
    attn = [str(p) for p in make_adapters(tmp_path / "attn", model, [4, 8, 16],
                                          target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=6)]
    reqs = [(p, None if i % 4 == 3 else attn[i % 3]) for i, p in enumerate(prompts(8, seed=12))]
    slora = run_engine({"model": str(model), "mode": "slora",
                        "phases": [{"name": "mixtral", "requests": reqs, "max_tokens": 6}],
                        "llm_kwargs": dict(COMMON, max_loras=1)})
    ref = PeftReference(str(model))
    for i, (prompt, adapter) in enumerate(reqs):
        tokens, lps = ref.greedy(prompt, adapter, 6)
        got = slora["phases"][0]["outputs"][i]
        assert got["token_ids"] == tokens, f"request {i} ({adapter})"
        assert max(abs(a - b) for a, b in zip(got["logprobs"], lps)) <= LOGPROB_TOL, i
    assert slora["phases"][0]["report"]["stats"]["loads"] >= 3

    mlp = make_adapters(tmp_path / "mlp", model, [8], seed=7)[0]  # all seven projections
    hf = SimpleNamespace(**json.loads((model / "config.json").read_text()))
    with pytest.raises(AdapterError, match="MixtralForCausalLM is a mixture-of-experts model, where "
                                           "vllm_slora serves LoRA on q_proj, k_proj, v_proj, o_proj only"):
        check_adapter(str(mlp), "mlp", hf, max_rank=16)
