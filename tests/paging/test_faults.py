"""An adapter broken after its requests were accepted fails only those requests.

The front end checks an adapter when a request arrives; its files can still
change before the scheduler pages it in (removed, truncated, replaced by one
of a rank above ``--max-lora-rank``). The scheduler then finds the fault
(``PagedKVCacheManager.faults``) and vLLM finishes the request with finish
reason ``error``; every other request's outputs equal a run without the
fault, no block is leaked, and the engine serves on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["weights removed", "truncated weights",
                                   "rank above the limit"])
def test_broken_adapter_fails_only_its_requests(tmp_path, tiny_model, fault):
    from vllm_slora.testing.adapters import make_peft_adapter

    good = make_peft_adapter(tmp_path / "good", tiny_model, 8, seed=1)
    bad = make_peft_adapter(tmp_path / "bad", tiny_model, 8, seed=2)
    spec = {"model": str(tiny_model), "good": str(good), "bad": str(bad), "fault": fault,
            "max_tokens": 6}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out.json"
    job = Path(__file__).with_name("fault_job.py")
    proc = subprocess.run([sys.executable, str(job), str(tmp_path / "spec.json"), str(out)],
                          env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"),
                          capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stderr[-4000:]
    got = json.loads(out.read_text())
    bad_reqs = [r for r in got["fault"] if r["adapter"] == "bad"]
    others = [r for r in got["fault"] if r["adapter"] != "bad"]
    assert [r["finish_reason"] for r in bad_reqs] == ["error", "error"]
    assert all(r["token_ids"] == [] for r in bad_reqs)
    assert others == got["reference"]  # same outputs as without the fault
    assert got["after"] == got["reference"][:4]  # the engine serves on
    assert got["free_after_fault"] == got["free_after_reference"]  # nothing leaked
    assert got["faults_left"] == 0
    log = proc.stdout + proc.stderr  # vLLM's log handler writes to stdout
    assert f"fails: adapter '{bad}' cannot be paged in" in log  # the cause is logged
