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

from vllm_slora.testing.runner import EAGER_ENV


FAULTS = ["weights removed", "truncated weights", "rank above the limit", "read error in the worker"]
# The worker's uploads of folders named so fail as a disk error would, after
# the scheduler's checks passed (uploads.FAIL_UPLOADS).
WORKER_FAULT = "uploadfails"


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")])


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_broken_adapter_fails_only_its_requests(tmp_path, tiny_model, device):
    """Each fault on its own adapter, one after the other in one engine. On a
    GPU with async scheduling on: the next step is scheduled while this one
    runs, and uploads go through the copy streams."""
    from vllm_slora.testing.adapters import make_peft_adapter

    good = make_peft_adapter(tmp_path / "good", tiny_model, 8, seed=1)
    bad = [make_peft_adapter(tmp_path / (f"bad{k}" + ("-" + WORKER_FAULT if "worker" in f else "")),
                             tiny_model, 8, seed=2 + k) for k, f in enumerate(FAULTS)]
    spec = {"model": str(tiny_model), "good": str(good), "bad": [str(b) for b in bad],
            "faults": FAULTS, "max_tokens": 6, "async_scheduling": device == "cuda"}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out.json"
    job = Path(__file__).with_name("fault_job.py")
    proc = subprocess.run([sys.executable, str(job), str(tmp_path / "spec.json"), str(out)],
                          env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1",
                                   VLLM_SLORA_TEST_FAIL_UPLOADS=WORKER_FAULT,
                                   **(EAGER_ENV if device == "cpu" else {})),
                          capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stderr[-4000:]
    got = json.loads(out.read_text())
    log = proc.stdout + proc.stderr  # vLLM's log handler writes to stdout
    for fault, folder in zip(FAULTS, bad):
        run = got["faults"][fault]
        bad_reqs = [r for r in run["outputs"] if r["adapter"] == "bad"]
        others = [r for r in run["outputs"] if r["adapter"] != "bad"]
        assert all(str(folder) in r["stop_reason"] for r in bad_reqs), fault  # the cause, for the caller
        assert [r["finish_reason"] for r in bad_reqs] == ["error", "error"], fault
        if "worker" in fault:  # found in the step that first used it: that step's token, no more
            assert all(len(r["token_ids"]) <= 1 for r in bad_reqs), fault
        else:
            assert all(r["token_ids"] == [] for r in bad_reqs), fault
        assert others == got["reference"], fault  # same outputs as without the fault
        assert run["free_blocks"] == got["free_after_reference"], fault  # nothing leaked
        assert run["faults_left"] == 0, fault
        if "worker" in fault:
            assert f"adapter '{folder}' could not be paged in: OSError" in log, fault
        else:
            assert f"fails: adapter '{folder}' cannot be paged in" in log, fault  # cause logged
    assert got["after"] == got["reference"][:4]  # the engine serves on
    assert all(r["stop_reason"] is None for r in got["reference"])
