"""``python -m benchmarks.kernels --dry-run`` runs on CPU (about 10 s).

It runs the kernels under Triton's interpreter, on GPU machines too (where it
used to fail on newer numpy: ``vllm_slora/kernels/_interp.py``). The dry run
is a CPU smoke test, so the subprocess is given no GPU.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_dry_run(tmp_path):
    out = tmp_path / "kernels.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernels", "--dry-run", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "worst relative error" in proc.stdout and out.exists()
