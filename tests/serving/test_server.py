"""``vllm serve --plugin vllm_slora`` under bad adapters, unloads and load (issue 7).

One server for the module (tiny model, CPU, 24 KV blocks of 128 tokens so
the 50 adapters are paged in and out) and one offline run of the same
requests (``vllm.LLM``, S-LoRA mode, greedy) as the reference: two engine
starts. Chat completions are not tested: the server runs with
``--skip-tokenizer-init`` (token-id prompts) and the tiny model has no
tokenizer or chat template.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from benchmarks.load_test import (TIE_THRESHOLD, Server, classify_mismatch, make_requests,
                                  reference_runs, run_load, stream_completion, verdict)
from vllm_slora.metrics import FLUSH_INTERVAL_S

pytestmark = pytest.mark.slow

NUM_ADAPTERS, NUM_LOAD = 50, 100
BLOCKS, MAX_SEQS, MAX_RANK = 24, 16, 256
SHORT, LONG = 8, 32  # tokens: load test / unload-while-running (reference: LONG)


UNREADABLE = "unreadable-in-worker"


def _tensors_of(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


def _save(folder: Path, tensors: dict, config: dict | None):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(config))


def make_bad_adapters(root: Path, good: str, tiny_model) -> dict[str, tuple[str, int, str]]:
    """name -> (path, expected HTTP status, words the error must contain)."""
    import torch

    from vllm_slora.testing.adapters import make_peft_adapter

    good = Path(good)
    root.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((good / "adapter_config.json").read_text())
    tensors = _tensors_of(good)
    cases = {}

    def case(name, status, words):
        cases[name] = (str(root / name), status, words)
        return root / name

    case("missing-folder", 404, "was not found")
    p = case("no-weights", 404, "has no adapter_model.safetensors")
    p.mkdir()
    (p / "adapter_config.json").write_text(json.dumps(cfg))
    p = case("corrupt-weights", 400, "corrupt adapter_model.safetensors")
    p.mkdir()
    (p / "adapter_config.json").write_text(json.dumps(cfg))
    (p / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    _save(case("no-config", 404, "has no adapter_config.json"), tensors, None)
    p = case("bad-json", 400, "invalid adapter_config.json")
    _save(p, tensors, None)
    (p / "adapter_config.json").write_text("{not json")
    _save(case("not-lora", 400, "has peft_type 'IA3'"), tensors, cfg | {"peft_type": "IA3"})
    _save(case("no-rank", 400, "has no 'r'"), tensors, {k: v for k, v in cfg.items() if k != "r"})
    _save(case("rank-too-high", 400, f"rank 512 > --max-lora-rank {MAX_RANK}"), tensors,
          cfg | {"r": 512})
    foreign = {k.replace("q_proj", "c_attn"): v for k, v in tensors.items()}
    _save(case("foreign-module", 400, "targets module 'c_attn'"), foreign, cfg)
    wrong = {k: (v[:, :64].contiguous() if ".lora_A." in k else v) for k, v in tensors.items()}
    _save(case("wrong-shape", 400, "the base model needs"), wrong, cfg)
    nan = dict(tensors)
    key = next(iter(nan))
    nan[key] = nan[key].clone()
    nan[key][0, 0] = float("nan")
    _save(case("nan-weights", 400, "has NaN values"), nan, cfg)
    # rank 256 on all seven projections: 32 blocks of pages, the pool has 23.
    make_peft_adapter(case("too-large", 400, f"the KV cache has {BLOCKS - 1}"), tiny_model,
                      rank=256)
    del torch
    return cases


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    from vllm_slora.testing.adapters import make_adapters

    root = tmp_path_factory.mktemp("serving")
    ranks = [(4, 8, 16)[i % 3] for i in range(NUM_ADAPTERS)]
    paths = {p.name: str(p) for p in make_adapters(root / "good", tiny_model, ranks, seed=7)}
    names = list(paths)
    # Good at start-up, broken later (its files replaced while registered).
    later = root / "later-broken"
    shutil.copytree(paths[names[0]], later)
    # Its files are fine, but the worker's reads of them fail (a disk error
    # after the front end's and the scheduler's checks; uploads.FAIL_UPLOADS).
    unreadable = root / UNREADABLE
    shutil.copytree(paths[names[2]], unreadable)
    bad = make_bad_adapters(root / "bad", paths[names[1]], tiny_model)
    load = make_requests(names, NUM_LOAD, seed=3)
    probe = make_requests(names, 4, seed=4, lo=20, hi=30)
    requests = load + probe
    reference = reference_runs(
        str(tiny_model), requests, paths, LONG,
        dict(max_lora_rank=MAX_RANK, max_num_seqs=MAX_SEQS, max_model_len=256,
             num_gpu_blocks_override=BLOCKS, dtype="float32", enforce_eager=True), logprobs=2)
    server = Server(str(tiny_model), [
        "--max-lora-rank", str(MAX_RANK), "--max-num-seqs", str(MAX_SEQS),
        "--max-model-len", "256", "--num-gpu-blocks-override", str(BLOCKS),
        "--dtype", "float32", "--enforce-eager",
        "--lora-modules", f"later-broken={later}", f"{UNREADABLE}={unreadable}",
        *[f"{n}={p}" for n, p in paths.items()]],
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_SLORA_TEST_FAIL_UPLOADS": UNREADABLE},
        log=root / "server.log")
    try:
        server.wait_healthy()
        yield dict(server=server, paths=paths, names=names, bad=bad, later=later,
                   load=load, probe=probe, ref_load=reference[:NUM_LOAD],
                   ref_probe=[r["token_ids"] for r in reference[NUM_LOAD:]])
    finally:
        server.stop()


def _post(base, route, body):
    r = httpx.post(base + route, json=body, timeout=120)
    return r.status_code, r.text


def _complete(base, model, prompt, max_tokens=SHORT):
    return httpx.post(base + "/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": True, "return_token_ids": True})


def test_models_lists_adapters_and_unknown_name_is_404(setup):
    base = setup["server"].base
    ids = {m["id"] for m in httpx.get(base + "/v1/models").json()["data"]}
    assert set(setup["names"]) | {"later-broken"} <= ids
    r = _complete(base, "no-such-adapter", [5, 6, 7])
    assert r.status_code == 404, r.text
    assert "no-such-adapter" in r.text


def test_completion_non_streaming_matches_offline(setup):
    base = setup["server"].base
    for (prompt, name), ref in zip(setup["probe"], setup["ref_probe"]):
        r = _complete(base, name, prompt)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == ref[:SHORT]


def test_bad_adapters_fail_their_load_only(setup):
    """Every bad adapter: one 4xx naming it and the problem, while good
    streaming requests run; they finish with the offline tokens."""
    base, bad = setup["server"].base, setup["bad"]

    async def scenario():
        async with httpx.AsyncClient(timeout=300) as client:
            good = [asyncio.create_task(stream_completion(client, base, p, n, LONG))
                    for p, n in setup["probe"]]
            answers = {}
            for name, (path, _, _) in bad.items():
                r = await client.post(base + "/v1/load_lora_adapter",
                                      json={"lora_name": name, "lora_path": path})
                answers[name] = (r.status_code, r.text)
            return answers, await asyncio.gather(*good)

    answers, good = asyncio.run(scenario())
    for name, (path, status, words) in bad.items():
        code, text = answers[name]
        message = json.loads(text)["error"]["message"]
        assert code == status, (name, text)
        # vLLM's error responses replace file paths by "<path>" (the log has them).
        assert f"adapter '{name}' (" in message and words in message, (name, message)
    for r, ref in zip(good, setup["ref_probe"]):
        assert r["error"] is None and r["finished"] and r["token_ids"] == ref, r
    ids = {m["id"] for m in httpx.get(base + "/v1/models").json()["data"]}
    assert not ids & set(bad)


def test_adapter_broken_after_registration_fails_its_requests_only(setup):
    base, later = setup["server"].base, setup["later"]
    prompt, name = setup["probe"][0]
    assert _complete(base, "later-broken", [5, 6, 7]).status_code == 200
    wrong = {k: (v[:, :64].contiguous() if ".lora_A." in k else v) for k, v in _tensors_of(later).items()}
    _save(later, wrong, None)
    r = _complete(base, "later-broken", [5, 6, 7])
    assert r.status_code == 400, r.text
    assert "adapter 'later-broken' (" in r.text and "the base model needs" in r.text
    shutil.rmtree(later)
    r = _complete(base, "later-broken", [5, 6, 7])
    assert r.status_code == 400 and "was not found" in r.text, r.text
    # The server keeps serving, with the same outputs.
    r = _complete(base, name, prompt)
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == setup["ref_probe"][0][:SHORT]


def test_adapter_unreadable_in_the_worker_fails_its_requests_with_the_cause(setup):
    """The worker cannot read the adapter's weights: its request gets a 500
    that names the adapter and the cause (not vLLM's bare "Internal server
    error"), requests of other adapters get their offline tokens, and the
    server stays healthy; a second try fails the same way (not a hang)."""
    base = setup["server"].base
    for _ in range(2):
        r = _complete(base, UNREADABLE, [5, 6, 7])
        assert r.status_code == 500, r.text
        message = r.json()["error"]["message"]
        assert f"adapter '{UNREADABLE}' failed" in message and "could not be paged in: OSError" in message, message
    prompt, name = setup["probe"][1]
    r = _complete(base, name, prompt)
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == setup["ref_probe"][1][:SHORT]
    assert httpx.get(base + "/health").status_code == 200


def test_dynamic_load_and_unload_while_running(setup):
    """Unloading an adapter that a request uses: the request finishes with
    the right tokens (stock semantics: unload only unregisters the name);
    new requests naming it get 404."""
    base = setup["server"].base
    prompt, name = setup["probe"][1]
    code, text = _post(base, "/v1/load_lora_adapter",
                       {"lora_name": "dyn", "lora_path": setup["paths"][name]})
    assert code == 200, text
    assert "dyn" in {m["id"] for m in httpx.get(base + "/v1/models").json()["data"]}

    async def scenario():
        async with httpx.AsyncClient(timeout=300) as client:
            body = {"model": "dyn", "prompt": prompt, "max_tokens": LONG, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "return_token_ids": True}
            tokens, unloaded = [], None
            async with client.stream("POST", base + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    for choice in json.loads(line[6:])["choices"]:
                        tokens += choice.get("token_ids") or []
                    if unloaded is None:  # first chunk arrived: the request is running
                        u = await client.post(base + "/v1/unload_lora_adapter",
                                              json={"lora_name": "dyn"})
                        unloaded = u.status_code
            return tokens, unloaded

    tokens, unloaded = asyncio.run(scenario())
    assert unloaded == 200
    assert tokens == setup["ref_probe"][1]
    assert _complete(base, "dyn", prompt).status_code == 404


def test_load_100_streams_50_adapters_then_metrics(setup):
    """100 concurrent streaming requests across 50 adapters, 24 KV blocks:
    0 lost, 0 errors, outputs equal to the offline run (both with their top-2
    logprobs, which explain mismatches); then the paging metrics on /metrics
    next to vLLM's."""
    base = setup["server"].base
    results = asyncio.run(run_load(base, setup["load"], SHORT, logprobs=2))
    refs = [{"token_ids": r["token_ids"][:SHORT], "top_logprobs": r["top_logprobs"][:SHORT]}
            for r in setup["ref_load"]]
    report = verdict(results, refs)
    assert report["lost"] == report["errors"] == report["mismatches"] == 0, report
    assert report["mismatch_report"] == [] and report["tie_threshold"] == TIE_THRESHOLD
    assert report["mismatches_near_tie"] == report["mismatches_clear"] == 0
    for r, ref in zip(results, refs):
        # top-2 per output token in both runs, keyed by token id, chosen token on top
        assert len(r["top_logprobs"]) == len(ref["top_logprobs"]) == SHORT, r
        for tok, s, o in zip(r["token_ids"], r["top_logprobs"], ref["top_logprobs"]):
            assert len(s) == len(o) == 2 and max(s, key=s.get) == tok, (s, o)
            assert abs(s[tok] - o[tok]) < 1e-3, (s, o)

    time.sleep(3 * FLUSH_INTERVAL_S)  # the engine's last snapshot has landed
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("vllm_slora:") and len(line.split()) == 2}
    assert "vllm:num_requests_running" in text  # vLLM's own, same endpoint
    assert values["vllm_slora:adapter_loads_total"] >= NUM_ADAPTERS
    assert values["vllm_slora:adapter_evictions_total"] > 0
    assert values["vllm_slora:adapter_reloads_total"] > 0
    assert 0 < values["vllm_slora:adapters_resident"] <= BLOCKS
    assert values["vllm_slora:adapter_pages_resident"] > 0
    assert (values["vllm_slora:host_cache_hits_total"]
            + values["vllm_slora:host_cache_misses_total"]
            == values["vllm_slora:adapter_loads_total"])
    assert values["vllm_slora:adapter_load_seconds_count"] == values["vllm_slora:adapter_loads_total"]


def test_mismatch_classifier_on_constructed_runs():
    """The load test's mismatch report (no engine): near-tie, clear, unexplained."""
    server, offline = [7, 9, 11, 4], [7, 9, 12, 5]
    s_top = [{7: -0.1, 1: -3.0}, {9: -0.2, 2: -2.0}, {11: -0.700, 12: -0.710}, {4: -0.1, 5: -3}]
    o_top = [{7: -0.1, 1: -3.0}, {9: -0.2, 2: -2.0}, {12: -0.702, 11: -0.709}, {5: -0.1, 4: -3}]
    m = classify_mismatch(server, offline, s_top, o_top)
    assert m == {"position": 2, "server_token": 11, "offline_token": 12,
                 "server_margin": pytest.approx(0.01), "offline_margin": pytest.approx(0.007),
                 "server_runner_up": 12, "offline_runner_up": 11, "class": "near-tie",
                 "threshold": TIE_THRESHOLD}
    assert classify_mismatch(server, offline, s_top, o_top, threshold=0.005)["class"] == "clear"
    wide = [*o_top[:2], {12: -0.2, 11: -1.5}, o_top[3]]
    assert classify_mismatch(server, offline, s_top, wide)["class"] == "clear"
    other = [*o_top[:2], {12: -0.702, 3: -0.709}, o_top[3]]  # offline's runner-up is not 11
    assert classify_mismatch(server, offline, s_top, other)["class"] == "clear"
    assert classify_mismatch(server, offline)["class"] == "unexplained"
    report = verdict([{"token_ids": server, "top_logprobs": s_top, "finished": True,
                       "error": None}], [{"token_ids": offline, "top_logprobs": o_top}])
    assert report["mismatches"] == report["mismatches_near_tie"] == 1
    assert report["mismatch_report"] == [{"request": 0, **m}]
    # shorter output: first difference is the first missing token
    assert classify_mismatch([7, 9], [7, 9, 12])["position"] == 2
