"""Pinning in S-LoRA mode: vLLM's ``pin_lora`` keeps an adapter resident in the
scheduler's pool (``AdapterPool.pin_user``); pins are bounded so they cannot
starve the KV cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_slora.testing.runner import EAGER_ENV

@pytest.mark.slow
def test_pin_lora_keeps_the_adapter_resident_in_an_engine(tmp_path, tiny_model):
    from vllm_slora.testing.adapters import make_peft_adapter

    spec = {"model": str(tiny_model),
            "pinned": str(make_peft_adapter(tmp_path / "pinned", tiny_model, 8, seed=1)),
            "others": [str(make_peft_adapter(tmp_path / f"o{k}", tiny_model, 8, seed=2 + k))
                       for k in range(6)]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("pin_job.py")),
                           str(tmp_path / "spec.json"), str(out)],
                          env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", **EAGER_ENV),
                          capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stderr[-4000:]
    got = json.loads(out.read_text())
    assert got["add"] and got["pin"] and got["resident_after_pin"]
    assert got["evicted"] == 6 and got["resident_after_pressure"] == [1]  # the others went
    assert got["again"] == got["first"]  # the pinned copy serves as before
    assert got["unknown"].startswith("ValueError") and "not registered" in got["unknown"]
    assert got["remove"] and got["pins_after_remove"] == []
    assert got["evicted_after_remove"] == 1
