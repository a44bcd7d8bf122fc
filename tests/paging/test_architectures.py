"""Llama-style architectures other than Llama (issue 16): the plugin's
outputs equal stock vLLM's LoRA on the same adapters, in fp32 on CPU.

Each is a tiny random model of its own config (``testing/models.py``):
Mistral, Qwen2 (q/k/v biases in the base layer; the LoRA output adds to
the biased output) and Qwen3 (q/k norms, a head_dim of 64 with a hidden size
of 128, so q is twice as wide as the model). Adapters of mixed ranks on all
seven projections; every fifth request without an adapter (compared with
the base model without LoRA).
"""

from __future__ import annotations

import pytest
from conftest import prompts, run_engine

from vllm_slora.testing.adapters import make_adapters
from vllm_slora.testing.models import make_tiny_llama

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


def test_models_with_mixed_attention_kinds_are_refused_by_name(tmp_path):
    """Gemma 2 interleaves sliding-window and full-attention layers: two KV-cache
    groups, which unified paging does not page adapters into (yet). S-LoRA
    mode stops at start-up naming the architecture and what is supported."""
    model = make_tiny_llama(tmp_path / "model", arch="gemma2", seed=5)
    with pytest.raises(RuntimeError) as failed:
        run_engine({"model": str(model), "mode": "slora", "phases": [],
                    "llm_kwargs": dict(COMMON, max_loras=1)})
    message = str(failed.value)
    assert "Gemma2ForCausalLM has 2 (SlidingWindowSpec, FullAttentionSpec" in message
    assert "Supported: models whose layers all use one attention kind" in message


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
