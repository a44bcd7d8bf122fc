"""Two S-LoRA engines in one process keep their own layers (issue: a
module-global layer registry let the second engine's layers serve the first)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_slora.testing.runner import EAGER_ENV

pytestmark = pytest.mark.slow

JOB = Path(__file__).with_name("two_engines_job.py")


def test_two_engines_in_one_process_keep_their_own_layers(tmp_path, tiny_model, adapter_factory):
    from vllm_slora.testing.adapters import make_adapters
    from vllm_slora.testing.models import make_tiny_llama

    model_b = make_tiny_llama(tmp_path / "model-b", seed=1)  # same layer names, other weights
    adapters_a = [str(p) for p in adapter_factory([4, 8, 16])]
    adapters_b = [str(p) for p in make_adapters(tmp_path / "adapters-b", model_b, [8, 4], seed=2)]
    requests_a = [([3 + (7 * i + j) % 500 for j in range(6 + i)], adapters_a[i % 3] if i % 4 else None)
                  for i in range(8)]
    requests_b = [([5 + (11 * i + j) % 500 for j in range(5 + i)], adapters_b[i % 2]) for i in range(6)]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model_a": str(tiny_model), "model_b": str(model_b), "max_tokens": 8,
                                "requests_a": requests_a, "requests_b": requests_b}))
    out = tmp_path / "out.json"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", **EAGER_ENV)
    proc = subprocess.run([sys.executable, str(JOB), str(spec), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stderr[-4000:]
    got = json.loads(out.read_text())
    assert got["a_again"] == got["a_first"]  # tokens and logprobs, bit for bit
    assert got["b"] != got["a_first"][:len(got["b"])]  # B really is another model
