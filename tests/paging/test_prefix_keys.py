"""Prefix-cache keys in S-LoRA mode name the adapter's weights, not only its
name (``patches/vllm_v1_core_kv_cache_utils.py``)."""

from __future__ import annotations

import importlib

import pytest


def test_prefix_cache_keys_follow_the_adapter_weights(tmp_path, tiny_model, monkeypatch):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.request import Request

    from vllm_slora.testing.adapters import make_peft_adapter

    from vllm_slora.versions import at_least

    stock = kv_cache_utils._gen_lora_extra_hash_keys
    monkeypatch.setattr(kv_cache_utils, "_gen_lora_extra_hash_keys", stock)  # restored after
    patch = importlib.import_module("vllm_slora.patches.vllm_v1_core_kv_cache_utils")
    patch.apply()
    lora_extra_hash_keys = patch.lora_extra_hash_keys

    def keys(name, lora_id, path):  # a new request each time: keys are fixed at its arrival
        req = Request("r", list(range(3, 40)), SamplingParams(max_tokens=1), None,
                      lora_request=LoRARequest(name, lora_id, str(path)))
        return kv_cache_utils.generate_block_hash_extra_keys(req, 0, 16, 0)[0]

    a = make_peft_adapter(tmp_path / "a", tiny_model, 4, seed=1)
    first = keys("x", 1, a)
    assert keys("x", 1, a) == first  # same adapter, same files: a hit
    assert keys("x", 2, a) != first  # unloaded and loaded again (vLLM gives a new id)
    assert keys("y", 3, make_peft_adapter(tmp_path / "b", tiny_model, 4, seed=1)) != first
    monkeypatch.setattr(kv_cache_utils, "_gen_lora_extra_hash_keys", stock)
    stock_first = keys("x", 1, a)
    monkeypatch.setattr(kv_cache_utils, "_gen_lora_extra_hash_keys", lora_extra_hash_keys)
    make_peft_adapter(a, tiny_model, 8, seed=2)  # rewritten in place under the same name and id
    assert keys("x", 1, a) != first
    # Stock vLLM keys by name (and path since 0.31) alone: the stale hit this patch removes.
    monkeypatch.setattr(kv_cache_utils, "_gen_lora_extra_hash_keys", stock)
    assert keys("x", 1, a) == stock_first
    if not at_least("0.31"):
        assert keys("x", 1, a) == keys("x", 2, tmp_path / "b")  # even another adapter's
    else:  # KV events publish the name, as stock's keys do
        assert kv_cache_utils.to_event_extra_keys([first]) == [("x",)]


def run_prefix_job(tmp_path, spec: dict) -> list[dict]:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    job = Path(__file__).with_name("prefix_cache_job.py")
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(job), str(tmp_path / "spec.json"), str(out)],
                          env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"), capture_output=True,
                          text=True, timeout=900)
    assert out.exists(), proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_prefix_cache_in_slora_mode(tmp_path, tiny_model):
    """Same prompts on the same adapter hit the cache and give the same
    outputs; on another adapter, or on the same name loaded again with other
    weights, they hit nothing and give that adapter's own outputs (a fresh
    engine's). Stock vLLM keys blocks by name and reuses the old KV there."""
    from vllm_slora.testing.adapters import make_peft_adapter

    a = str(make_peft_adapter(tmp_path / "a", tiny_model, 8, seed=1))
    b = str(make_peft_adapter(tmp_path / "b", tiny_model, 8, seed=2))
    # 300 tokens: two full KV blocks of 128 (the CPU backend's block size) each.
    prompts = [[3 + (13 * i + j) % 500 for j in range(300)] for i in range(4)]
    on = lambda path, lora_id, name: [(p, path, lora_id, name) for p in prompts]  # noqa: E731
    got = run_prefix_job(tmp_path / "run", {
        "model": str(tiny_model), "plugin": True, "max_tokens": 6,
        "phases": [on(a, 1, "x"), on(a, 1, "x"), on(b, 2, "y"), on(b, 3, "x")]})
    fresh_b = run_prefix_job(tmp_path / "fresh", {
        "model": str(tiny_model), "plugin": True, "max_tokens": 6, "phases": [on(b, 1, "x")]})
    assert got[0]["hits"] == 0 and got[1]["hits"] == 4 * 256  # a's prompts again: their blocks hit
    assert got[1]["outputs"] == got[0]["outputs"]
    assert got[2]["hits"] == 0  # another adapter: no block of a's
    assert got[2]["outputs"] == fresh_b[0]["outputs"] != got[0]["outputs"]
    assert got[3]["hits"] == 0  # "x" loaded again with b's weights: a's KV not reused
    assert got[3]["outputs"] == fresh_b[0]["outputs"]
