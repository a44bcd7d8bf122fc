"""Session fixtures for the paging tests (the tiny model comes from
tests/conftest.py): adapters, and a helper that runs ``engine_job.py`` (one engine start serves several checks)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vllm_slora.testing.runner import EAGER_ENV, IN_PROCESS_ENV

JOB = Path(__file__).with_name("engine_job.py")
MIXED_RANKS = [4, 8, 16, 32]
NUM_SCALE_ADAPTERS = 2000


def run_engine(spec: dict, env: dict | None = None, timeout: float = 900) -> dict:
    """Run one engine in a fresh process (S-LoRA mode per spec['mode'])."""
    full_env = dict(os.environ)
    full_env.pop("VLLM_SLORA", None)
    full_env.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # LLM.collective_rpc with a function (the worker-side checks) needs pickle.
    full_env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    full_env.update(EAGER_ENV | IN_PROCESS_ENV)  # engine_job.py runs eager
    full_env.update(env or {})
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, str(JOB), str(spec_file), str(out_file)],
                              env=full_env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out_file.exists():
            raise RuntimeError(f"engine run failed (exit {proc.returncode}):\n{proc.stderr[-8000:]}")
        return json.loads(out_file.read_text())


def prompts(n: int, seed: int, lo: int = 5, hi: int = 40, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="session")
def mixed_adapters(tmp_path_factory, tiny_model) -> list[str]:
    """50 adapters, ranks 4, 8, 16, 32 in turn, on all seven projections."""
    from vllm_slora.testing.adapters import make_adapters

    ranks = [MIXED_RANKS[i % 4] for i in range(50)]
    root = tmp_path_factory.mktemp("paging-mixed")
    return [str(p) for p in make_adapters(root, tiny_model, ranks, seed=1)]


@pytest.fixture(scope="session")
def scale_adapters(tmp_path_factory, tiny_model) -> list[str]:
    """2,000 adapters of rank 4 and 8 on all seven projections."""
    from vllm_slora.testing.adapters import make_adapters

    ranks = [4 if i % 2 else 8 for i in range(NUM_SCALE_ADAPTERS)]
    root = tmp_path_factory.mktemp("paging-scale")
    return [str(p) for p in make_adapters(root, tiny_model, ranks, seed=2)]
