"""The plugin inside real vLLM engines (tiny model, CPU): loaded where it must
be, and invisible when its mode is off."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys

import pytest

from vllm_slora.testing.runner import Workload, run_workload
from vllm_slora.testing.server import wait_healthy

pytestmark = pytest.mark.slow


def token_workload(adapters, n: int, seed: int = 0):
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        prompt = [rng.randrange(3, 512) for _ in range(rng.randint(4, 24))]
        reqs.append((prompt, None if i % 5 == 0 else str(adapters[i % len(adapters)])))
    return reqs


def test_mode_off_is_bit_identical_to_stock(tiny_model, adapter_factory):
    adapters = adapter_factory([4, 8, 16])
    common = dict(model=str(tiny_model), requests=token_workload(adapters, 12), max_tokens=8,
                  logprobs=1, max_loras=4, max_lora_rank=16,
                  llm_kwargs={"enforce_eager": True})
    stock = run_workload(Workload(plugin="none", **common))
    off = run_workload(Workload(plugin="off", **common))
    assert off["outputs"] == stock["outputs"]  # token ids and logprobs, exactly
    # The adapters are live in both runs: outputs differ between adapters.
    assert len({tuple(o["token_ids"]) for o in stock["outputs"]}) > len(adapters)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_loads_plugin_in_api_and_engine_core_processes(tiny_model, tmp_path):
    trace = tmp_path / "trace.jsonl"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_SLORA"}
    env.update(VLLM_SLORA_TRACE=str(trace), VLLM_CPU_KVCACHE_SPACE="1")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(tiny_model),
         "--enable-lora", "--plugin", "vllm_slora", "--skip-tokenizer-init",
         "--enforce-eager", "--port", str(port), "--host", "127.0.0.1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        try:
            wait_healthy(server, f"http://127.0.0.1:{port}", timeout=300)
        except (RuntimeError, TimeoutError) as e:
            pytest.fail(f"{e}\n{server.stderr.read()[-4000:]}")
        events = [json.loads(line) for line in trace.read_text().splitlines()]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)

    activated = {e["pid"]: e for e in events if e["event"] == "activate"}
    # The API server switched the mode on at parse time ...
    assert server.pid in activated
    # ... and the engine core it started loaded the plugin through the entry
    # point with the mode already on (inherited environment).
    children = [e for e in events if e["ppid"] == server.pid and e["event"] == "register"]
    assert children and all(e["mode"] for e in children)
    assert any(e["pid"] in activated for e in children)
