"""Fixtures shared by the suite: one tiny model and adapter folders, made once
per session (in the parent process, before any engine starts: engines run in
child processes through ``vllm_slora.testing.runner``)."""

from __future__ import annotations

import os

import pytest

from vllm_slora.testing.adapters import make_adapters
from vllm_slora.testing.models import make_tiny_llama

os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def adapter_factory(tmp_path_factory, tiny_model):
    """``adapter_factory(ranks, seed=0)`` -> adapter folders (cached per call)."""
    cache: dict = {}

    def make(ranks, seed: int = 0, target_modules=None):
        key = (tuple(ranks), seed, tuple(target_modules or ()))
        if key not in cache:
            root = tmp_path_factory.mktemp("adapters")
            kwargs = {"target_modules": target_modules} if target_modules else {}
            cache[key] = make_adapters(root, tiny_model, list(ranks), seed=seed, **kwargs)
        return cache[key]

    return make


def pytest_runtest_logreport(report):
    """With VLLM_SLORA_INSTAFAIL=1 (the GPU script), a failure's traceback is
    written as it happens: a device call cut by its time limit never reaches
    pytest's summary, and would return only an 'F'."""
    if report.failed and os.environ.get("VLLM_SLORA_INSTAFAIL") == "1":
        import sys

        sys.stdout.write(f"\nFAILED {report.nodeid} ({report.when})\n{report.longreprtext[-8000:]}\n")
        sys.stdout.flush()
