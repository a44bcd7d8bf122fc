"""``vllm serve --plugin vllm_slora`` under memory pressure: adapter eviction
*and* vLLM request preemption (issue 7).

One server (tiny model, CPU, 128-token blocks) with a KV pool of 10 blocks
(9 usable). Twelve concurrent streaming requests on six adapters, prompts of
100-120 tokens and 40 output tokens each: a running request holds one KV
block until it crosses 128 tokens and then needs a second, while each
distinct adapter it uses holds one block of pages. After the cached adapters
are evicted, the growing requests cannot all get their second block and
vLLM preempts (recomputes) some of them. The reference is the same requests
sent one at a time to the same server afterwards (one request with its
adapter needs 3 blocks: no pressure). Passes only if every request finishes
without error, the outputs equal the reference token for token, and
``/metrics`` shows both preemptions (``vllm:num_preemptions_total``) and
adapter evictions (``vllm_slora:adapter_evictions_total``) during the
concurrent phase and no preemption during the reference.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import httpx
import pytest

from benchmarks.load_test import Server, make_requests, run_load, stream_completion, verdict
from vllm_slora.metrics import FLUSH_INTERVAL_S

pytestmark = pytest.mark.slow

BLOCKS, MAX_SEQS, MAX_RANK = 10, 12, 16
NUM_ADAPTERS, NUM_REQUESTS, MAX_TOKENS = 6, 12, 40
PROMPT_LO, PROMPT_HI = 100, 120  # + 40 output tokens: every request crosses one 128-token block


def scrape(base: str) -> dict[str, float]:
    """``/metrics`` -> {metric name: value summed over label sets}, once the
    engine's last snapshot has landed (written at most FLUSH_INTERVAL_S late)."""
    time.sleep(3 * FLUSH_INTERVAL_S)
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+(\S+)$", line)
        if m:
            values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(3))
    return values


async def one_at_a_time(base: str, requests, max_tokens: int) -> list[dict]:
    async with httpx.AsyncClient(timeout=300) as client:
        return [await stream_completion(client, base, p, m, max_tokens) for p, m in requests]


def test_preemption_and_eviction_under_pressure(tmp_path, tiny_model):
    from vllm_slora.testing.adapters import make_adapters

    paths = {p.name: str(p) for p in make_adapters(tmp_path / "adapters", tiny_model,
                                                   [4] * NUM_ADAPTERS, seed=11)}
    requests = make_requests(list(paths), NUM_REQUESTS, seed=5, lo=PROMPT_LO, hi=PROMPT_HI)
    server = Server(str(tiny_model), [
        "--max-lora-rank", str(MAX_RANK), "--max-num-seqs", str(MAX_SEQS),
        "--max-model-len", "256", "--num-gpu-blocks-override", str(BLOCKS),
        "--dtype", "float32", "--enforce-eager",
        "--lora-modules", *[f"{n}={p}" for n, p in paths.items()]],
        log=tmp_path / "server.log")
    try:
        server.wait_healthy()
        before = scrape(server.base)
        results = asyncio.run(run_load(server.base, requests, MAX_TOKENS, timeout=300))
        pressure = scrape(server.base)
        reference = asyncio.run(one_at_a_time(server.base, requests, MAX_TOKENS))
        after = scrape(server.base)
    finally:
        server.stop()

    def delta(a, b, name):
        return b.get(name, 0.0) - a.get(name, 0.0)

    preemptions = delta(before, pressure, "vllm:num_preemptions_total")
    evictions = delta(before, pressure, "vllm_slora:adapter_evictions_total")
    summary = dict(preemptions=preemptions, evictions=evictions,
                   loads=delta(before, pressure, "vllm_slora:adapter_loads_total"),
                   reloads=delta(before, pressure, "vllm_slora:adapter_reloads_total"))
    print("pressure phase:", summary)
    for r in reference:
        assert r["error"] is None and r["finished"] and len(r["token_ids"]) == MAX_TOKENS, r
    report = verdict(results, [r["token_ids"] for r in reference])
    assert report["lost"] == report["errors"] == report["mismatches"] == 0, (report, summary)
    assert all(len(r["token_ids"]) == MAX_TOKENS for r in results)
    # The test proves what it claims only if the pressure was real.
    assert preemptions > 0, ("no request was preempted", summary)
    assert evictions > 0, ("no adapter was evicted", summary)
    # ... and the reference ran without it.
    assert delta(pressure, after, "vllm:num_preemptions_total") == 0, summary
