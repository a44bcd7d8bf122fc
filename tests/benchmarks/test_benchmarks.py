"""The benchmark suite: S-LoRA's workload generator (fast unit tests), the
report, and one tiny end-to-end CPU run of ``python -m benchmarks.run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.adapter_pool import make_folders  # noqa: E402
from benchmarks.metrics import percentile, summarize  # noqa: E402
from benchmarks.run import (error_from_log, parse, points_for, reproducible,  # noqa: E402
                            source_hash)
from vllm_slora.testing.runner import EAGER_ENV, IN_PROCESS_ENV  # noqa: E402
from vllm_slora.versions import at_least, installed as installed_vllm  # noqa: E402
from benchmarks.step_time import (host_ops, is_lora_kernel, kernel_anatomy, mixed_step,  # noqa: E402
                                  sample_stacks, step_stats, steps_per_request)
from benchmarks.systems import Config, configs, engine_kwargs, serve_flags  # noqa: E402
from benchmarks.workload import ATTN, WorkloadSpec, generate, read_trace, write_trace  # noqa: E402

# The plugin and its two ablation switches in the end-to-end tiny run (they
# need vllm_slora.patches.MODE_PATCHES, i.e. an installed plugin).
INCLUDE_SLORA = True



def spec(**kw) -> WorkloadSpec:
    return WorkloadSpec(**{"n_adapters": 10, "num_requests": 200, "vocab_size": 512, **kw})


# --- workload -------------------------------------------------------------

def test_seeded_determinism():
    assert generate(spec()) == generate(spec())
    assert generate(spec()).requests != generate(spec(seed=1)).requests


def test_requests_do_not_depend_on_n_or_alpha():
    a, b = generate(spec(n_adapters=5)), generate(spec(n_adapters=100, alpha=0.3))
    strip = lambda t: [(r.arrival_s, r.prompt, r.output_len) for r in t.requests]  # noqa: E731
    assert strip(a) == strip(b)
    # Adapter i keeps its rank whatever n.
    assert [x.rank for x in b.adapters[:5]] == [x.rank for x in a.adapters]
    assert {x.rank for x in b.adapters} == {8, 16, 32, 64}


@pytest.mark.parametrize("alpha", [0.3, 0.6])
def test_power_law_popularity(alpha):
    n, total = 10, 40_000
    t = generate(spec(n_adapters=n, num_requests=total, alpha=alpha, input_range=(1, 1), output_range=(1, 1)))
    counts = np.array([sum(r.adapter == f"a{i:04d}" for r in t.requests) for i in range(n)])
    # Adapter 0 the most popular, and so on (checked where the gaps are wide).
    assert all(counts[:4] > counts[1:5]) and counts[:5].sum() > counts[5:].sum(), counts
    # S-LoRA's law: P(index < k) = (k / n)^alpha.
    cdf = np.cumsum(counts) / total
    expected = (np.arange(1, n + 1) / n) ** alpha
    assert np.abs(cdf - expected).max() < 0.01


def test_alpha_one_is_uniform():
    n, total = 10, 40_000
    t = generate(spec(n_adapters=n, num_requests=total, alpha=1.0, input_range=(1, 1), output_range=(1, 1)))
    counts = np.array([sum(r.adapter == f"a{i:04d}" for r in t.requests) for i in range(n)])
    assert np.abs(counts / (total / n) - 1).max() < 0.06


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0])
def test_gamma_arrivals(cv):
    rate = 4.0
    t = generate(spec(num_requests=40_000, rate=rate, cv=cv, input_range=(1, 1), output_range=(1, 1)))
    gaps = np.diff([r.arrival_s for r in t.requests])
    assert t.requests[0].arrival_s == 0 and (gaps >= 0).all()
    assert abs(gaps.mean() * rate - 1) < 0.04
    assert abs(gaps.std() / gaps.mean() / cv - 1) < 0.06


def test_length_bounds_and_token_ids():
    t = generate(spec(num_requests=2000, input_range=(8, 12), output_range=(3, 5)))
    ins = [len(r.prompt) for r in t.requests]
    outs = [r.output_len for r in t.requests]
    assert (min(ins), max(ins), min(outs), max(outs)) == (8, 12, 3, 5)  # both ends reached, inclusive
    ids = np.concatenate([r.prompt for r in t.requests])
    assert ids.min() >= 3 and ids.max() < 512


def test_trace_round_trip(tmp_path):
    t = generate(spec(targets="all", ranks=(4, 8)))
    assert read_trace(write_trace(tmp_path / "t.jsonl", t)) == t
    base = t.without_adapters()
    assert base.adapters == [] and all(r.adapter is None for r in base.requests)
    assert [r.prompt for r in base.requests] == [r.prompt for r in t.requests]


def test_invalid_spec_names_the_problem():
    with pytest.raises(ValueError, match="input_range"):
        spec(input_range=(10, 5))
    with pytest.raises(ValueError, match="targets"):
        spec(targets="mlp")


# --- adapters, systems, metrics, report -------------------------------------

def test_adapter_folders_share_weight_files(tmp_path, tiny_model):
    from safetensors import safe_open

    from vllm_slora.testing.adapters import module_shapes

    folders = make_folders(tmp_path, tiny_model, {f"x{i}": (8, 16)[i % 2] for i in range(6)}, ATTN, pool=2)
    inodes = {os.stat(f / "adapter_model.safetensors").st_ino for f in folders.values()}
    assert len(inodes) == 4  # 2 ranks x pool 2
    config = json.loads((tiny_model / "config.json").read_text())
    shapes = module_shapes(config)
    for name, folder in folders.items():
        rank = json.loads((folder / "adapter_config.json").read_text())["r"]
        assert rank == (8, 16)[int(name[1:]) % 2]
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            a = f.get_tensor("base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight")
            b = f.get_tensor("base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight")
            assert len(list(f.keys())) == config["num_hidden_layers"] * 4 * 2
        assert a.shape == (rank, shapes["k_proj"][0]) and b.shape == (shapes["k_proj"][1], rank)
        assert 0.015 < float(a.float().std()) < 0.025


def test_configs_and_serve_flags():
    plan = configs(["stock", "slora-bmm", "base", "stock"], [16, 64])  # run in the order given
    assert [c.label for c in plan] == ["stock (max_loras=64)", "stock (max_loras=16)", "slora-bmm", "base"]
    assert plan[2].env == {"VLLM_SLORA": "1", "VLLM_SLORA_KERNELS": "bmm"}
    kw = engine_kwargs(plan[0], model="/m", dummy=True, max_lora_rank=64, max_cpu_loras=8, slora_max_loras=64,
                       max_model_len=1024, eager=True, extra={})
    assert kw["max_cpu_loras"] == 64  # never below max_loras
    flags = serve_flags(kw)
    assert flags[0] == "/m" and "--no-enable-prefix-caching" in flags and "--enforce-eager" in flags
    assert flags[flags.index("--max-loras") + 1] == "64" and "--load-format" in flags
    # From vLLM 0.34 every system runs without the extensible KV cache (the plugin's setting).
    assert ("--no-enable-extensible-kv-cache" in flags) == at_least("0.34")
    assert "--no-enable-extensible-kv-cache" in serve_flags({"model": "m", "enable_extensible_kv_cache": False})
    assert "enable_lora" not in engine_kwargs(Config("base", "base"), model="/m", dummy=False, max_lora_rank=64,
                                              max_cpu_loras=8, slora_max_loras=64, max_model_len=64,
                                              eager=True, extra={})


def test_serve_flags_pass_dicts_as_json():
    kw = engine_kwargs(Config("base", "base"), model="m", dummy=True, max_lora_rank=8, max_cpu_loras=8,
                       slora_max_loras=4, max_model_len=64, eager=False,
                       extra={"compilation_config": {"cudagraph_capture_sizes": [1, 2, 4]}})
    flags = serve_flags(kw)
    assert json.loads(flags[flags.index("--compilation-config") + 1]) == {"cudagraph_capture_sizes": [1, 2, 4]}


def test_presets_and_overrides():
    _, cfg = parse(["--preset", "headline"])
    assert cfg["n"] == [5, 100, 1000, 2000] and cfg["arch"] == "llama-2-7b" and cfg["mode"] == "offline"
    assert set(cfg["systems"]) == {"base", "stock", "slora", "slora-bmm", "slora-no-unifymem"}
    assert cfg["eager"] is False and cfg["budget_s"] is None and cfg["requests"] == 1000
    _, cfg = parse(["--preset", "tiny", "--n", "7,3", "--mode", "online"])
    assert cfg["n"] == [3, 7] and cfg["eager"] is True and cfg["mode"] == "online"
    _, cfg = parse(["--preset", "headline", "--enforce-eager", "--max-capture-size", "64"])
    assert cfg["eager"] is True and cfg["max_capture_size"] == 64


def test_stock_n_limits_stock_to_its_points(capsys):
    _, cfg = parse(["--preset", "headline", "--n", "5,1000,2000", "--stock-n", "5"])
    prep = {"points": [{"n": n, "label": f"n={n}"} for n in (5, 1000, 2000)],
            "base_points": [{"n": 0, "label": "base"}]}
    assert [p["n"] for p in points_for("stock", cfg, prep)] == [5]
    assert [p["n"] for p in points_for("slora", cfg, prep)] == [5, 1000, 2000]
    assert points_for("base", cfg, prep) == prep["base_points"]
    _, cfg = parse(["--preset", "headline", "--n", "5,1000"])
    assert [p["n"] for p in points_for("stock", cfg, prep)] == [5, 1000, 2000]  # not given: all
    with pytest.raises(SystemExit):
        parse(["--preset", "headline", "--n", "5,1000", "--stock-n", "2000"])
    assert "--stock-n 2000: no such point" in capsys.readouterr().err


def test_budget_that_cannot_cover_one_engine_starts_nothing(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--preset", "tiny", "--budget-s", "30",
         "--est-start-s", "60", "--workdir", str(tmp_path / "w"), "--results-dir", str(tmp_path / "r")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot cover one engine start-up" in proc.stderr
    assert not (tmp_path / "w").exists() and not (tmp_path / "r").exists()


def test_steady_state_window_ends_with_the_queue():
    from benchmarks.metrics import steady_state

    # (time, running, waiting, generated tokens): the first wave of 8 has its
    # first tokens at t=1; the queue empties at t=3, then the batch drains.
    samples = [(0, 0, 50, 0), (1, 8, 40, 100), (2, 8, 20, 300), (3, 8, 5, 500), (4, 4, 0, 560),
               (5, 0, 0, 580)]
    got = steady_state(samples)
    assert got["steady_s"] == 2 and got["steady_tok_per_s"] == pytest.approx(400 / 2)
    assert got["waiting_share"] == pytest.approx(4 / 6) and got["mean_running"] == pytest.approx(28 / 6)
    # A slow start (adapters of the first wave still paging in): the window
    # starts once the tokens reach the batch's size (t=2), not at t=0.
    slow = [(0, 8, 50, 0), (1, 8, 40, 4), (2, 8, 40, 8), (3, 8, 30, 208), (4, 8, 5, 408),
            (5, 0, 0, 500)]
    got = steady_state(slow)
    assert got["steady_s"] == 2 and got["steady_tok_per_s"] == pytest.approx(200)
    # vLLM's counter carries an earlier point's tokens (one engine, points in
    # turn): the window is the same, counted from the point's first sample.
    later = [(t, r, w, 50_000 + g) for t, r, w, g in slow]
    assert steady_state(later) == got
    assert steady_state(samples[:1])["steady_tok_per_s"] is None
    assert steady_state([(0, 4, 0, 0), (1, 4, 0, 50)])["steady_tok_per_s"] is None  # never queued
    assert steady_state([(0, 8, 9, 0), (1, 8, 9, 4)])["steady_tok_per_s"] is None  # never full


def test_step_log_splits_steps_by_how_vllm_runs_them(tmp_path, capsys):
    from types import SimpleNamespace

    from benchmarks import steplog
    from vllm_slora.patches.vllm_v1_engine_core import install

    # The patch's timers on a fake engine core: one record per step with
    # tokens, requests, decode requests and the host seconds of its calls.
    calls, queue = [], []
    scheduler = SimpleNamespace(schedule=lambda: calls.append("s") or queue.pop(0),
                                update_from_output=lambda out, model_output: calls.append("u"))
    executor = SimpleNamespace(execute_model=lambda out, non_block=False: calls.append("e"),
                               sample_tokens=lambda g, non_block=False: calls.append("t"))
    log = install(SimpleNamespace(scheduler=scheduler, model_executor=executor), str(tmp_path / "s.jsonl"))
    steps = [{"a": 1, "b": 1}, {"a": 1, "b": 300}, {"a": 1, "b": 1, "c": 40}, {}]
    for per_request in steps:
        out = SimpleNamespace(num_scheduled_tokens=per_request,
                              total_num_scheduled_tokens=sum(per_request.values()))
        queue.append(out)
        assert scheduler.schedule() is out
        executor.execute_model(out, non_block=True)
        executor.sample_tokens(None, non_block=True)
        scheduler.update_from_output(out, None)
    log.flush()
    assert calls == list("setu") * 4 and not log.open
    recs = steplog.read(tmp_path / "s.jsonl")
    assert [r[1:4] for r in recs] == [[2, 2, 2], [301, 2, 1], [42, 3, 2]]  # the empty step: none
    assert all(len(r) == 11 and r[4] == pytest.approx(sum(r[5:9]), abs=1e-5) for r in recs)
    assert all(0 <= r[9] <= r[4] + 1e-3 for r in recs)  # CPU seconds within the host seconds
    from vllm_slora.patches.vllm_v1_engine_core import CALLS, SLOW_STEP_S
    assert CALLS == steplog.CALLS and SLOW_STEP_S == steplog.SLOW_STEP_S

    # summarize: periods between consecutive records inside the window.
    records = [[10.0, 256, 256, 256, 0.002, 0, 0.002, 0, 0], [10.020, 256, 256, 256, 0.003, 0, 0.003, 0, 0],
               [10.060, 512, 257, 256, 0.010, 0.002, 0.008, 0, 0], [10.080, 200, 180, 179, 0.004, 0, 0.004, 0, 0],
               [10.100, 256, 256, 256, 0.002, 0, 0.002, 0, 0], [11.0, 256, 256, 256, 0.002, 0, 0.002, 0, 0]]
    got = steplog.summarize(records, 10.0, 10.1, graph_max=256)
    assert got["steps"] == 4 and got["period_ms"] == pytest.approx(25.0)
    assert got["tokens_per_step"] == pytest.approx((256 + 512 + 200 + 256) / 4)
    assert got["host_ms"] == pytest.approx(4.75) and got["host_share"] == pytest.approx(0.019 / 0.1)
    assert got["decode_tok_s"] == pytest.approx((256 + 256 + 179 + 256) / 0.1)
    assert got["requests_per_step"] == pytest.approx((256 + 257 + 180 + 256) / 4)
    k = got["kinds"]
    assert k["decode"]["share"] == 0.5 and k["decode"]["period_ms"] == pytest.approx(20.0)
    assert k["large"]["tokens"] == 512 and k["large"]["period_ms"] == pytest.approx(40.0)
    assert k["mixed"]["tokens"] == 200 and k["large"]["time_share"] == pytest.approx(0.4)
    # Of the two decode steps, one follows a decode step of the same batch,
    # one a mixed step; a decode step whose batch lost a request is not one.
    assert got["unchanged_decode"] == {"steps": 1, "period_ms": pytest.approx(20.0)}
    shrunk = [records[0], [10.03, 255, 255, 255, 0.002, 0, 0.002, 0, 0]]
    assert "unchanged_decode" not in steplog.summarize(shrunk, 10.0, 10.1, graph_max=256)
    assert got["calls_ms"]["schedule"] == pytest.approx(0.5) and got["calls_ms"]["execute_model"] == 4.25
    assert steplog.summarize(records, 20.0, 30.0, 256) is None
    assert "| x | 4 | 306 | 25.0 | 4.8 (19%) | 50% x 256 tok, 20.0 ms |" in steplog.line("x", got)
    assert "cpu_ms" not in got and steplog.host_line("x", got) == (
        "| x | 4.8 | - | 0.5 | 4.2 | 0.0 | 0.0 | - |")
    # Records with CPU seconds and the plugin's seconds (named as they come).
    full = [r + [r[4] / 2, {"apply_s": 0.001, "uploads_done": 3} if i % 2 else {}]
            for i, r in enumerate(records)]
    got = steplog.summarize(full, 10.0, 10.1, graph_max=256)
    assert got["cpu_ms"] == pytest.approx(4.75 / 2)
    # 2 of the 4 steps: seconds as ms, counts as counts
    assert got["plugin"] == {"apply_ms": pytest.approx(0.5), "uploads_done": 1.5}
    assert steplog.host_line("x", got) == (
        "| x | 4.8 | 2.4 | 0.5 | 4.2 | 0.0 | 0.0 | apply_ms 0.5, uploads_done 1.5 |")
    # One kind of step alone: the two decode steps (host 3 and 2 ms, periods 20 ms each).
    decode = steplog.summarize(full, 10.0, 10.1, graph_max=256, only="decode")
    assert decode["steps"] == 2 and decode["host_ms"] == pytest.approx(2.5)
    assert decode["period_ms"] == pytest.approx(20.0) and set(decode["kinds"]) == {"decode"}
    assert steplog.summarize(full, 10.0, 10.1, graph_max=256, only="large")["calls_ms"]["schedule"] == 2.0
    # The command line: a point's window from its events log, a row per kind and one for all.
    steps, events = tmp_path / "x.steps.jsonl", tmp_path / "x.events.jsonl"
    steps.write_text("".join(json.dumps(r) + "\n" for r in full))
    events.write_text(json.dumps({"ev": "point_begin", "t": 9.0, "label": "n=5"}) + "\n"
                      + json.dumps({"ev": "point", "t": 10.1, "label": "n=5"}) + "\n")
    steplog.main([str(steps), "--point", "n=5", "--skip-s", "1"])
    rows = capsys.readouterr().out.splitlines()
    assert [r.split(" | ")[0] for r in rows[2:6]] == ["| decode", "| mixed", "| large", "| all"]
    assert rows[5] == steplog.host_line("all", got)
    assert rows[9] == steplog.line("all", got)
    assert rows[-1] == "decode steps of an unchanged batch: 1, 20.0 ms each (no request started or ended)"


def test_step_log_counts_each_call_to_its_own_step(tmp_path):
    """With async scheduling vLLM schedules and launches step 2 before it
    processes step 1's results: each record holds its own step's calls (step
    2's slow launch is step 2's, not step 1's), the plugin figures that
    changed in them, and those that changed between calls since the last
    record (the upload lanes' work while the engine's thread waits)."""
    import time
    from types import SimpleNamespace

    from benchmarks import steplog
    from vllm_slora import metrics
    from vllm_slora.patches.vllm_v1_engine_core import install

    def execute(out, non_block=False):
        if out.total_num_scheduled_tokens > 100:  # a prefill: a long launch
            time.sleep(0.03)
            metrics.add("set_batch_s", 0.5)

    queue = []
    scheduler = SimpleNamespace(schedule=lambda: queue.pop(0), update_from_output=lambda out, mo: None)
    executor = SimpleNamespace(execute_model=execute, sample_tokens=lambda g, non_block=False: None)
    log = install(SimpleNamespace(scheduler=scheduler, model_executor=executor), str(tmp_path / "s.jsonl"))
    decode = SimpleNamespace(num_scheduled_tokens={"a": 1}, total_num_scheduled_tokens=1)
    prefill = SimpleNamespace(num_scheduled_tokens={"a": 1, "b": 300}, total_num_scheduled_tokens=301)
    before = dict(metrics.PER_STEP)
    try:
        queue += [decode, prefill]
        for out in (scheduler.schedule(),):  # step 1 scheduled and launched
            executor.execute_model(out, non_block=True)
            executor.sample_tokens(None, non_block=True)
        second = scheduler.schedule()  # step 2 before step 1's results
        executor.execute_model(second, non_block=True)
        executor.sample_tokens(None, non_block=True)
        metrics.add("uploads_done", 2.0)  # a lane, while the engine's thread waits
        scheduler.update_from_output(decode, None)
        scheduler.update_from_output(prefill, None)
        log.flush()
    finally:
        metrics.PER_STEP.clear()
        metrics.PER_STEP.update(before)
    first, then = steplog.read(tmp_path / "s.jsonl")
    assert first[1] == 1 and then[1] == 301
    assert first[6] < 0.01 <= 0.03 <= then[6]  # each execute_model with its own step
    assert first[10] == {"uploads_done": 2.0} and then[10] == {"set_batch_s": 0.5}
    assert not log.open


def test_slow_decode_steps_and_what_they_cost():
    """Decode steps whose execute_model took over SLOW_STEP_S: how many,
    their period, and their time beyond the unchanged-batch pace as a share
    of the window; a slow mixed step is not one of them."""
    from benchmarks import steplog

    #          time  tok  req  dec  host  sched exec  sample update
    records = [[0.00, 200, 200, 200, 0.01, 0, 0.005, 0, 0],
               [0.02, 200, 200, 200, 0.01, 0, 0.005, 0, 0],   # unchanged: 20 ms
               [0.07, 199, 199, 199, 0.04, 0, 0.040, 0, 0],   # a request ended: slow, 50 ms
               [0.09, 300, 200, 199, 0.03, 0, 0.030, 0, 0],   # slow, but mixed
               [0.11, 200, 200, 200, 0.01, 0, 0.005, 0, 0]]   # 20 ms
    got = steplog.summarize(records, 0.0, 0.11, graph_max=512)
    assert got["unchanged_decode"]["period_ms"] == pytest.approx(20.0)
    slow = got["slow_decode"]
    assert slow["steps"] == 1 and slow["period_ms"] == pytest.approx(50.0)
    assert slow["execute_ms"] == pytest.approx(40.0)
    assert slow["excess_share"] == pytest.approx(0.030 / 0.11)


def test_stack_samples_add_up_per_function_and_leaf(tmp_path):
    from benchmarks import stacks

    # Two writes of the sampler: leaf first; the second falls outside --to.
    path = tmp_path / "s.stacks"
    path.write_text(json.dumps({"t": 10.0, "samples": 10, "stacks": {
        "streams.py:254:synchronize;core.py:9:step": 6,
        "layers.py:159:_slora_paged_lora;llama.py:3:forward;core.py:9:step": 3,
        "layers.py:160:_slora_paged_lora;layers.py:159:_slora_paged_lora;core.py:9:step": 1}})
        + "\n" + json.dumps({"t": 20.0, "samples": 5, "stacks": {"a.py:1:f": 5}}) + "\n")
    counts, total = stacks.load(path, None, 15.0)
    assert total == 10 and sum(counts.values()) == 10
    inclusive, leaves = stacks.shares(counts, total)
    inc = dict(inclusive)
    assert inc["core.py:step"] == 1.0
    assert inc["layers.py:_slora_paged_lora"] == pytest.approx(0.4)  # once per stack, not per frame
    assert leaves[0] == ("streams.py:254:synchronize", 0.6)
    assert stacks.load(path)[1] == 15


def test_slow_steps_samples_are_counted_apart(tmp_path, monkeypatch):
    """With stack samples on, a sample counts to the step whose call runs
    (a schedule call's to the step it returns), or between calls to the
    oldest launched step (its output is awaited);
    a decode step whose own execute_model took longer than SLOW_STEP_S has
    its samples counted apart as well; the others (a fast step, a slow step
    with a prompt, samples of no step) only in the whole count; the
    benchmark reads either."""
    import time
    from types import SimpleNamespace

    from benchmarks import stacks
    from vllm_slora.patches import vllm_v1_engine_core as core

    monkeypatch.setenv(core.STACKS_ENV, "1")
    monkeypatch.setattr(core.StackSampler, "start", lambda self: None)  # fed by hand below
    queue, inside = [], []

    def execute(out, non_block=False):
        log.sampler.sample(inside.pop(0))  # one sample inside each launch
        time.sleep(0.03 if out.slow else 0.0)

    def schedule():
        if queue[0].slow and queue[0].total_num_scheduled_tokens == 1:
            log.sampler.sample("sched.py:9:s")  # inside the slow step's own schedule call
        return queue.pop(0)

    scheduler = SimpleNamespace(schedule=schedule, update_from_output=lambda out, mo: None)
    executor = SimpleNamespace(execute_model=execute, sample_tokens=lambda g, non_block=False: None)
    log = core.install(SimpleNamespace(scheduler=scheduler, model_executor=executor),
                       str(tmp_path / "s.jsonl"))
    sampler = log.sampler

    def out(tokens, slow):
        per = {"a": 1} if tokens == 1 else {"a": 1, "b": tokens - 1}
        return SimpleNamespace(num_scheduled_tokens=per, total_num_scheduled_tokens=tokens, slow=slow)

    fast, slow, prompt = out(1, False), out(1, True), out(41, True)
    sampler.sample("idle.py:5:wait")  # no step yet: the whole count only
    queue += [fast, slow, prompt]
    inside += ["fast.py:1:f", "slow.py:2:g", "prompt.py:4:p"]
    scheduler.schedule()
    executor.execute_model(fast)
    scheduler.schedule()  # async: the slow step launched before fast's results
    executor.execute_model(slow)
    sampler.sample("wait.py:7:w")  # between calls: fast's output is awaited
    scheduler.update_from_output(fast, None)
    sampler.sample("wait.py:7:w")  # now slow's
    scheduler.update_from_output(slow, None)
    scheduler.schedule()
    executor.execute_model(prompt)
    scheduler.update_from_output(prompt, None)
    rec = sampler.record()
    assert rec["samples"] == 7 and rec["stacks"] == {"fast.py:1:f": 1, "slow.py:2:g": 1,
                                                     "prompt.py:4:p": 1, "idle.py:5:wait": 1,
                                                     "wait.py:7:w": 2, "sched.py:9:s": 1}
    slow_stacks = {"sched.py:9:s": 1, "slow.py:2:g": 1, "wait.py:7:w": 1}
    assert rec["slow_samples"] == 3 and rec["slow_stacks"] == slow_stacks
    path = tmp_path / "s.jsonl.stacks"
    path.write_text(json.dumps(rec) + "\n")
    assert stacks.load(path, slow=True) == (slow_stacks, 3)
    assert stacks.load(path)[1] == 7


def test_ratios_never_mix_methods():
    steady = {"status": "ok", "req_per_s": 2.0, "steady_tok_per_s": 300.0}
    window = {"status": "window", "req_per_s": 1.0, "steady_tok_per_s": 100.0}
    finished_only = {"status": "ok", "req_per_s": 4.0, "steady_tok_per_s": None}
    assert report.point_ratio(steady, window) == "3.00x"  # tok/s on both sides
    assert report.point_ratio(steady, finished_only) == "0.50x"  # req/s on both sides
    assert report.point_ratio(window, finished_only) == "-"  # nothing comparable


def test_step_anatomy_sorts_lora_kernels_and_divides_by_steps():
    # Ours, stock vLLM's punica ops, and base kernels (GEMM, attention, norm).
    for name in ("_shrink_kernel", "_expand_kernel", "_group_by_adapter_kernel", "_reduce_kernel",
                 "_lora_shrink_kernel", "_lora_expand_kernel_fp8"):
        assert is_lora_kernel(name), name
    for name in ("nvjet_sm90_hsh_168x64_64x7_2x1_v_bz_TNN", "triton_red_fused_fused_add_rms_norm_2",
                 "void cutlass::device_kernel<flash::FlashAttnFwdSm90<...>>"):
        assert not is_lora_kernel(name), name
    kernels = {"_shrink_kernel": (800.0, 256), "_expand_kernel": (1200.0, 256),
               "nvjet_gemm": (9000.0, 128), "flash_attn": (3000.0, 64)}
    a = kernel_anatomy(kernels, steps=2, step_ms=7.5)
    assert a["gpu_busy_ms"] == pytest.approx(7.0)
    assert a["lora_ms"] == pytest.approx(1.0)
    assert a["lora_launches"] == 256
    assert a["host_gap_ms"] == pytest.approx(0.5)
    assert [k["kernel"] for k in a["top"]] == ["nvjet_gemm", "flash_attn", "_expand_kernel", "_shrink_kernel"]
    assert a["top"][0]["ms_per_step"] == pytest.approx(4.5) and a["top"][0]["calls_per_step"] == 64
    assert kernel_anatomy(kernels, steps=2, step_ms=6.0)["host_gap_ms"] == 0.0  # floored


def test_step_stats_split_alternating_mixed_and_decode_steps():
    # --mixed: a mixed step (40 ms), then a decode-only one (12 ms), in turn;
    # the median of the two kinds is meaningless, the halves are not.
    times = [0.040, 0.012] * 10 + [0.090]  # one slow outlier
    st = step_stats(times)
    assert st["slow_half_ms"] == pytest.approx(40.0) and st["fast_half_ms"] == pytest.approx(12.0)
    assert st["mean_ms"] == pytest.approx((40 * 10 + 12 * 10 + 90) / 21)
    assert st["steps"] == 21 and st["times_ms"][:2] == [40.0, 12.0]
    assert st["p90_ms"] == pytest.approx(40.0)
    # Every launch variant's steps come out of the same requests.
    spec = {"steps": 30, "profile": 4, "stacks": 10, "launches": ["triton", "direct", "triton"]}
    assert steps_per_request(spec) == 3 * 44
    assert steps_per_request({"steps": 30}) == 30


def test_host_ops_and_stack_samples():
    rows = host_ops({"aten::mm": (3000.0, 130), "vllm::slora_paged_lora": (6000.0, 128),
                     "aten::slice": (500.0, 400)}, steps=2, top=2)
    assert [r["op"] for r in rows] == ["vllm::slora_paged_lora", "aten::mm"]
    assert rows[0]["ms_per_step"] == pytest.approx(3.0) and rows[0]["calls_per_step"] == 64

    import time as _time

    def busy_step():  # the sampler must see this function on top, and its caller under it
        _time.sleep(0.004)  # a C call that lets the GIL go, as the engine's waits and launches do

    st = sample_stacks(busy_step, steps=5, interval_s=0.0002)
    assert st["samples"] > 10
    names = {r["fn"]: r for r in st["inclusive"]}
    assert "test_benchmarks.py:busy_step" in names
    assert names["test_benchmarks.py:busy_step"]["share"] > 0.5
    assert "step_time.py:sample_stacks" in names  # the caller's frames count too
    assert st["leaf"][0]["fn"] == "test_benchmarks.py:busy_step"


def test_reports_reproduce_without_this_machines_results_dir():
    argv = ["--preset", "headline", "--results-dir", "/tmp/o/results", "--n", "5",
            "--results-dir=/x", "--name", "e2e"]
    assert reproducible(argv) == ["--preset", "headline", "--n", "5", "--name", "e2e"]


def test_mixed_step_prefills_one_new_request_per_step(monkeypatch):
    # Fakes for vllm's request types (importing vllm here would load it into
    # a test process that may run the interpreter's kernel tests next).
    import types

    fake = types.ModuleType("vllm")
    fake.SamplingParams = lambda **kw: kw
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: list(prompt_token_ids)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    queued, steps = [], []

    class LLM:
        def enqueue(self, prompts, params, lora_request=None, use_tqdm=True):
            queued.append((prompts, params, lora_request))

    class Engine:
        def step(self):
            steps.append(len(queued))  # the request is queued before its step
            return []

    step = mixed_step(LLM(), Engine(), 40, ["a", "b", "c"])
    for _ in range(4):
        step()
    assert steps == [1, 2, 3, 4]
    assert all(len(p) == 1 and len(p[0]) == 40 for p, _, _ in queued)
    assert all(params["max_tokens"] == 1 and params["ignore_eos"] for _, params, _ in queued)
    assert [lora for _, _, lora in queued] == [["b"], ["c"], ["a"], ["b"]]
    assert len({tuple(p[0]) for p, _, _ in queued}) == 4  # distinct prompts: no prefix-cache hits
    step = mixed_step(LLM(), Engine(), 8, [])
    step()
    assert queued[-1][2] is None  # base: no adapter


def test_percentile_matches_numpy():
    xs = list(np.random.default_rng(0).exponential(size=101))
    for q in (50, 90, 99):
        assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))


def test_error_from_log_prefers_the_root_cause(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("INFO starting\nTraceback (most recent call last):\n"
                   "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
                   "RuntimeError: Engine core initialization failed. See root cause above.\n")
    assert error_from_log(log).startswith("torch.OutOfMemoryError: CUDA out of memory")


def fake_results() -> dict:
    def point(n, rate, status="ok", note=None):
        return {"n": n, "label": f"n={n}", **summarize(
            requests=10, elapsed_s=10 / rate, ttft=[0.1] * 10, latency=[1.0] * 10, output_tokens=100,
            input_tokens=100, status=status, slo_ttft_s=6.0, note=note)}

    systems = [
        {"system": "base", "label": "base", "error": None, "points": [point(0, 20.0)]},
        {"system": "slora", "label": "slora", "error": None, "points": [point(5, 15.0), point(100, 12.0)]},
        {"system": "slora-bmm", "label": "slora-bmm", "error": "ImportError: no MBGMV",
         "points": [{"n": n, "label": f"n={n}", "status": "start-up failed", "note": "ImportError: no MBGMV",
                     "requests": 10, "finished": 0} for n in (5, 100)]},
        {"system": "stock", "label": "stock (max_loras=64)", "error": None,
         "points": [point(5, 10.0), point(100, 1.0, "too slow", "3/10 finished in 3 s")]},
        {"system": "stock", "label": "stock (max_loras=16)", "error": None,
         "points": [point(5, 12.0), point(100, 4.0)]},
    ]
    return {"name": "t", "command": "python -m benchmarks.run", "created": "now", "device": "cpu",
            "versions": {"vllm": "0.26.0"}, "engine_note": "eager", "adapters": {"note": "pool"},
            "config": {"n": [5, 100], "slo_ttft_s": 6.0, "mode": "offline", "arch": "tiny"},
            "workload": {"num_requests": 10, "ranks": [8], "targets": "attn", "alpha": 1.0, "rate": 1.0,
                         "cv": 1.0, "input_range": [8, 8], "output_range": [8, 8], "seed": 0},
            "systems": systems}


def render_rows(path: Path, results: dict) -> tuple[str, dict]:
    """The rendered markdown and its table rows by (point, system)."""
    path.write_text(json.dumps(results))
    md = report.render(path)
    return md, {tuple(c.strip() for c in line.split("|")[1:3]): line
                for line in md.splitlines() if line.startswith("| ")}


def test_report_ratios_best_stock_and_failures(tmp_path):
    md, rows = render_rows(tmp_path / "t.json", fake_results())
    assert "**best**" in rows[("n=5", "stock (max_loras=16) **best**")]
    assert "**best**" in rows[("n=100", "stock (max_loras=16) **best**")]  # 64 was too slow there
    assert "| 1.25x | 0.75x |" in rows[("n=5", "slora")]  # 15 / 12 vs stock, 15 / 20 vs base
    assert "| 3.00x | 0.60x |" in rows[("n=100", "slora")]
    assert "start-up failed: ImportError: no MBGMV" in rows[("n=100", "slora-bmm")]
    assert "too slow: 3/10 finished in 3 s | (1.00)" in rows[("n=100", "stock (max_loras=64)")]
    assert "n=100 vs n=5: 0.80x" in md
    assert (tmp_path / "t-throughput.png").stat().st_size > 0 and (tmp_path / "t-ttft-cdf.png").exists()


def test_merged_calls_compare_points_of_one_call_only(tmp_path):
    one, two = fake_results(), fake_results()
    one["created"], two["created"] = "call-1", "call-2"
    one["systems"] = [s for s in one["systems"] if s["system"] != "slora"]  # base, stock, bmm
    two["systems"] = [s for s in two["systems"] if s["system"] in ("slora", "base")]
    two["config"] = dict(two["config"], n=[5, 100, 1000])
    # A file of today's format (lists per point grid) merges with an older one of the same workload.
    two["workload"] = dict(two["workload"], targets=["attn"], alpha=[1.0], rate=[1.0], duration_s=None,
                           drain_s=None)
    paths = [tmp_path / "one.json", tmp_path / "two.json"]
    for path, run in zip(paths, (one, two)):
        path.write_text(json.dumps(run))
    report.merge(paths, tmp_path / "m.json")
    md = report.render(tmp_path / "m.json")
    rows = [line for line in md.splitlines() if line.startswith("| B | n=5 | slora |")]
    assert len(rows) == 1 and "| - | 0.75x |" in rows[0]  # stock is call A's; base also in B
    assert "- A: call-1" in md and "- B: call-2" in md and "slora (call B)" in md
    two["workload"] = dict(two["workload"], seed=1)
    paths[1].write_text(json.dumps(two))
    with pytest.raises(ValueError, match="another workload"):
        report.merge(paths, tmp_path / "bad.json")


# --- points and the online client -------------------------------------------

def test_point_grid_names_every_point_and_gives_base_one_per_rate(tmp_path):
    from benchmarks.run import prepare

    _, cfg = parse(["--preset", "tiny", "--mode", "online", "--n", "2,5", "--rate", "4,16", "--duration-s", "3",
                    "--alpha", "1,0.5", "--cross-check", "slora"])
    prep = prepare(cfg, tmp_path / "w", tmp_path / "run")
    labels = [p["label"] for p in prep["points"]]
    assert len(labels) == len(set(labels)) == 8
    assert "n=2 rate=4/s" in labels and "n=5 rate=16/s alpha=0.5" in labels
    assert [b["label"] for b in prep["base_points"]] == ["base rate=4/s", "base rate=16/s"]
    prefixes = {p["prefix"] for p in prep["points"]}
    assert len(prefixes) == 8  # online: every point's adapters have names of their own (cold)
    for p in prep["points"]:
        trace = read_trace(p["trace"])
        assert p["requests"] == len(trace.requests) == round(p["rate"] * 3) and trace.spec.alpha == p["alpha"]
        base = read_trace(next(b["trace"] for b in prep["base_points"] if b["label"] == p["base"]))
        assert [(r.arrival_s, r.prompt, r.output_len) for r in base.requests] == \
            [(r.arrival_s, r.prompt, r.output_len) for r in trace.requests]
        assert all(r.adapter is None for r in base.requests)
        for a in trace.adapters:
            conf = json.loads((prep["adapters_root"] / (p["prefix"] + a.name) / "adapter_config.json").read_text())
            assert conf["r"] == a.rank
    first = prep["points"][0]
    for a in read_trace(first["trace"]).adapters:  # vLLM's client gets folders of its own
        assert (prep["adapters_root"] / f"xc-{first['prefix']}{a.name}" / "adapter_config.json").exists()
    from vllm.tokenizers import get_tokenizer

    tok = get_tokenizer(str(prep["model"]))  # what `vllm bench serve` and the servers load
    ids = [3, 17, prep["mconf"]["vocab_size"] - 1]
    assert tok(tok.decode(ids)).input_ids == ids and tok.num_special_tokens_to_add() == 0


def test_offline_points_of_other_targets_use_their_own_weights(tmp_path):
    from benchmarks.run import prepare

    _, cfg = parse(["--preset", "tiny", "--n", "2", "--targets", "attn,all", "--alpha", "1,0.5",
                    "--extra-points", "n=5 targets=all; n=2 alpha=0.5"])  # the second is in the grid
    prep = prepare(cfg, tmp_path / "w", tmp_path / "run")
    assert [p["label"] for p in prep["points"]] == ["n=2", "n=2 alpha=0.5", "n=2 targets=all",
                                                    "n=2 alpha=0.5 targets=all", "n=5 targets=all"]
    assert [b["label"] for b in prep["base_points"]] == ["base"]
    sizes = {}
    for p in prep["points"]:
        for a in read_trace(p["trace"]).adapters:
            folder = prep["adapters_root"] / (p["prefix"] + a.name)
            conf = json.loads((folder / "adapter_config.json").read_text())
            assert len(conf["target_modules"]) == (7 if p["targets"] == "all" else 4)
            sizes.setdefault(p["targets"], set()).add((folder / "adapter_model.safetensors").stat().st_size)
    assert min(sizes["all"]) > max(sizes["attn"])


def fake_trace(arrivals, output_lens, rate=4.0):
    from benchmarks.workload import Request, Trace

    return Trace(spec(n_adapters=0, num_requests=len(arrivals), rate=rate), [],
                 [Request(i, a, None, [5, 6, 7], k) for i, (a, k) in enumerate(zip(arrivals, output_lens))])


def test_extra_points_online_take_the_grid_s_first_values_and_base_per_rate(tmp_path):
    from benchmarks.run import prepare

    _, cfg = parse(["--preset", "tiny", "--mode", "online", "--n", "2,5", "--rate", "8", "--duration-s", "2",
                    "--extra-points", "n=5 alpha=0.5;n=5 targets=all;n=2 rate=4"])
    prep = prepare(cfg, tmp_path / "w", tmp_path / "run")
    assert [p["label"] for p in prep["points"]] == [
        "n=2 rate=8/s", "n=5 rate=8/s", "n=5 rate=8/s alpha=0.5", "n=5 rate=8/s targets=all", "n=2 rate=4/s"]
    assert [p["base"] for p in prep["points"]] == ["base rate=8/s"] * 4 + ["base rate=4/s"]
    with pytest.raises(SystemExit):
        parse(["--extra-points", "alpha=0.5"])  # no n


def test_online_figures_count_cut_requests_as_misses():
    from benchmarks.online import online_figures

    trace = fake_trace([0.0, 0.5, 1.0, 1.5], [4, 4, 50, 50])
    records = [  # sent, first, tokens, error, end
        {"sent": 0.0, "first": 1.0, "tokens": 4, "error": None, "end": 2.0},
        {"sent": 0.5, "first": 7.5, "tokens": 4, "error": None, "end": 8.0},  # first token too late
        {"sent": 1.0, "first": 3.0, "tokens": 9, "error": None, "end": None},  # cut, in time
        {"sent": 1.5, "first": None, "tokens": 0, "error": None, "end": None},  # cut, never started
    ]
    f = online_figures(records, trace, elapsed=10.0, cut="drain", slo_ttft_s=6.0, drain_s=8.0)
    assert f["status"] == "window" and f["finished"] == 2 and f["unfinished"] == 2
    assert f["slo_attainment"] == 0.5  # 1 s and 2 s in time; 7 s late; no token at all
    assert f["output_tokens"] == 17 and f["achieved_tok_per_s"] == 1.7 and f["req_per_s"] == 0.2
    assert sorted(f["ttft_s"]) == [1.0, 2.0, 7.0] and "2 of 4 unfinished" in f["note"]
    done = online_figures(records[:2], fake_trace([0.0, 0.5], [4, 4]), 8.0, None, 6.0, None)
    assert done["status"] == "ok" and done["unfinished"] == 0 and done["note"] is None


def test_replay_streams_times_first_tokens_and_cuts_at_the_drain():
    """Our client against a fake server that streams one token every 50 ms:
    requests that finish in time are complete, the long one is cut off
    ``drain_s`` after the last arrival with the tokens it got, and the
    server's gauges are sampled meanwhile."""
    import asyncio

    from benchmarks.online import replay

    async def handle(reader, writer):
        request = await reader.readuntil(b"\r\n\r\n")
        if request.startswith(b"GET /metrics"):
            writer.write(b"HTTP/1.1 200 OK\r\n\r\n# HELP x\nvllm:num_requests_running{engine=\"0\"} 3.0\n"
                         b"vllm:num_requests_waiting{engine=\"0\"} 1.0\nvllm:generation_tokens_total 42.0\n")
        else:
            length = int(next(line.split(b":")[1] for line in request.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            body = json.loads(await reader.readexactly(length))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
            for i in range(body["max_tokens"]):
                await asyncio.sleep(0.05)
                writer.write(b"data: " + json.dumps({"choices": [{"token_ids": [i]}]}).encode() + b"\n\n")
                await writer.drain()
            writer.write(b"data: [DONE]\n\n")
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        samples = []

        async def on_tick(t):
            from benchmarks.online import get_metrics

            samples.append((t, *(await get_metrics(port))))

        trace = fake_trace([0.0, 0.1, 0.2], [2, 3, 60])
        import time as _time

        got = await replay(port, trace, lambda a: "m", _time.time() + 30, lambda ok: None, 0.8, on_tick)
        server.close()
        return got, samples

    (records, elapsed, cut), samples = asyncio.run(main())
    assert cut == "drain" and 0.9 < elapsed < 2.0
    by_tokens = sorted(records, key=lambda r: r["sent"])
    assert [r["tokens"] for r in by_tokens[:2]] == [2, 3] and all(r["end"] for r in by_tokens[:2])
    long = by_tokens[2]
    assert long["end"] is None and 5 <= long["tokens"] < 60 and 0.04 < long["first"] - long["sent"] < 0.5
    assert samples and samples[0][1:] == (3.0, 1.0, 42.0)


def test_bench_serve_command_and_figures_match_the_point(tmp_path):
    from benchmarks.online import bench_figures, bench_serve_command
    from benchmarks.run import prepare

    _, cfg = parse(["--preset", "tiny", "--mode", "online", "--n", "5", "--rate", "4", "--duration-s", "3",
                    "--cross-check", "slora"])
    prep = prepare(cfg, tmp_path / "w", tmp_path / "run")
    point = prep["points"][0]
    spec_ = {"engine_kwargs": {"model": str(prep["model"])}, "input_range": cfg["input_range"],
             "output_range": cfg["output_range"], "seed": 0, "slo_ttft_s": 6.0}
    cmd = bench_serve_command(8000, spec_, point, tmp_path)
    arg = (lambda flag: cmd[cmd.index(flag) + 1])
    ratios = json.loads(arg("--random-range-ratio"))
    for (lo, hi), mid, r in ((cfg["input_range"], int(arg("--random-input-len")), ratios["input"]),
                             (cfg["output_range"], int(arg("--random-output-len")), ratios["output"])):
        assert round(mid * (1 - r)) == lo and round(mid * (1 + r)) == hi  # vLLM's sampling bounds
    assert arg("--num-prompts") == "12" and arg("--request-rate") == "4" and arg("--goodput") == "ttft:6000"
    names = cmd[cmd.index("--lora-modules") + 1:]
    assert len(names) == 5 and all((prep["adapters_root"] / n).is_dir() for n in names)
    raw = {"num_prompts": 12, "completed": 12, "duration": 4.0, "request_throughput": 3.0,
           "output_throughput": 30.0, "p50_ttft_ms": 100.0, "p90_ttft_ms": 200.0, "p99_ttft_ms": 400.0,
           "mean_ttft_ms": 150.0, "mean_e2el_ms": 900.0, "request_goodput": 2.25}
    f = bench_figures(raw, 6.0)
    assert (f["ttft_p50_s"], f["ttft_p99_s"], f["latency_mean_s"]) == (0.1, 0.4, 0.9)
    assert f["slo_attainment"] == 0.75 and f["req_per_s"] == 3.0


def fake_online_results() -> dict:
    def point(label, rate, tok_s, slo, status="ok"):
        return {"label": label, "n": 5, "status": status, "note": None, "requests": 10, "finished": 10,
                "req_per_s": rate, "output_tok_per_s": tok_s, "achieved_tok_per_s": tok_s,
                "slo_attainment": slo, "ttft_s": [0.1, 0.2], "ttft_p50_s": 0.1, "ttft_p90_s": 0.2,
                "ttft_p99_s": 0.2, "latency_mean_s": 1.0, "mean_running": 4.0, "waiting_share": 0.0,
                "steady_tok_per_s": None}

    keys = [{"label": f"n=5 rate={r}/s", "n": 5, "rate": float(r), "alpha": 1.0, "targets": "attn",
             "base": f"base rate={r}/s", "requests": 10} for r in (4, 16)]
    ours = point("n=5 rate=4/s", 4, 100.0, 1.0)
    systems = [
        {"system": "base", "label": "base", "error": None,
         "points": [point("base rate=4/s", 4, 100.0, 1.0), point("base rate=16/s", 16, 400.0, 1.0)]},
        {"system": "slora", "label": "slora", "error": None,
         "points": [ours, point("n=5 rate=16/s", 12, 300.0, 0.8, "window")],
         "cross_check": {"point": "n=5 rate=4/s", "command": "vllm bench serve ...", "error": None,
                         "ours": ours, "vllm_bench_serve": dict(ours, req_per_s=3.9, slo_attainment=0.9)}},
        {"system": "stock", "label": "stock (max_loras=4)", "error": None,
         "points": [point("n=5 rate=4/s", 4, 80.0, 1.0), point("n=5 rate=16/s", 5, 100.0, 0.2, "window")]},
    ]
    return {"name": "o", "command": "python -m benchmarks.run --mode online", "created": "now", "device": "cpu",
            "versions": {}, "engine_note": "eager", "adapters": {"note": "pool"}, "points": keys,
            "config": {"n": [5], "slo_ttft_s": 6.0, "mode": "online", "arch": "tiny"},
            "workload": {"num_requests": None, "duration_s": 3.0, "drain_s": 2.0, "ranks": [8],
                         "targets": ["attn"], "alpha": [1.0], "rate": [4.0, 16.0], "cv": 1.0,
                         "input_range": [8, 8], "output_range": [8, 8], "seed": 0},
            "systems": systems}


def test_online_report_ratios_by_achieved_throughput_vs_rate_plots_and_cross_check(tmp_path):
    md, rows = render_rows(tmp_path / "o.json", fake_online_results())
    assert "| 3.00x | 0.75x |" in rows[("n=5 rate=16/s", "slora")]  # 300/100 vs stock, 300/400 vs base
    assert "| 1.25x | 1.00x |" in rows[("n=5 rate=4/s", "slora")]
    assert "3 s of arrivals per point" in md and "at most 2 s for those in flight" in md
    assert "## Cross-check" in md and "| `vllm bench serve` | 10/10 | 3.90 |" in md
    assert "| 90% |" in md
    for png in ("o-vs-rate.png", "o-ttft-cdf.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "o-throughput.png").exists()  # one n: no throughput-vs-n plot


# --- end to end -------------------------------------------------------------

def plugin_systems() -> list[str]:
    from vllm_slora.patches import MODE_PATCHES

    return ["slora", "slora-bmm", "slora-no-unifymem"] if INCLUDE_SLORA and MODE_PATCHES else []


@pytest.mark.slow
def test_source_hash_names_the_code_not_the_results(tmp_path):
    """The results' ``source_hash`` changes with any source file of the
    tree and with nothing else (a results file, a cache)."""
    import shutil

    from benchmarks.run import SOURCE_DIRS

    for d in SOURCE_DIRS:
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns(
            "results", "__pycache__", "*.tar.xz"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    first = source_hash(tmp_path)
    assert first == source_hash(ROOT)  # results and caches left out
    (tmp_path / "benchmarks" / "results").mkdir()
    (tmp_path / "benchmarks" / "results" / "x.md").write_text("a result")
    assert source_hash(tmp_path) == first
    kernel = tmp_path / "vllm_slora" / "kernels" / "knobs.py"
    kernel.write_text(kernel.read_text() + "\n# a knob changed\n")
    assert source_hash(tmp_path) != first


def test_tiny_offline_run(tmp_path):
    systems = ["base", "stock"] + plugin_systems()
    results_dir = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--preset", "tiny", "--systems", ",".join(systems),
         "--workdir", str(tmp_path / "work"), "--results-dir", str(results_dir), "--name", "tiny"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, **EAGER_ENV, **IN_PROCESS_ENV))  # the tiny preset's engines run eager
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((results_dir / "tiny.json").read_text())
    traces = Path(results["config"]["workdir"]) / "runs" / "tiny" / "traces"
    for s in results["systems"]:
        assert s["status"] == "ok" and s["error"] is None, s
        assert s["start_s"] > 0 and s["versions"]["vllm"] == installed_vllm()
        for p in s["points"]:
            trace = read_trace(traces / ("base.jsonl" if s["system"] == "base" else f"n{p['n']}.jsonl"))
            assert p["label"] == ("base" if s["system"] == "base" else f"n={p['n']}")
            assert p["status"] == "ok" and p["finished"] == p["requests"] == 16, p
            assert p["req_per_s"] > 0 and p["output_tok_per_s"] > 0
            assert p["output_tokens"] == sum(r.output_len for r in trace.requests)  # ignore_eos honoured
            assert len(p["ttft_s"]) == 16 and 0 < p["ttft_p50_s"] <= p["ttft_p99_s"]
    assert [s["label"] for s in results["systems"]] == [c.label for c in configs(systems, [4])]
    assert all(s["wall_s"] >= s["start_s"] for s in results["systems"])
    md = (results_dir / "tiny.md").read_text()
    assert "| n=5 | stock (max_loras=4) **best** | ok |" in md and "| n=2 | base | ok |" in md
    assert f"source {source_hash()}" in md and results["source_hash"] == source_hash()
    for png in ("tiny-throughput.png", "tiny-ttft-cdf.png"):
        assert (results_dir / png).read_bytes()[:4] == b"\x89PNG"


def _sched_profile(tmp_path, *args) -> tuple[dict, dict]:
    """``benchmarks.sched_profile`` on the tiny model: the plugin's and base's figures."""
    if not plugin_systems():
        pytest.skip("the plugin's patches do not run on this vLLM")
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.sched_profile", *args, "--max-num-seqs", "8",
                           "--top", "40", "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    slora, base = json.loads(out.read_text())
    assert (slora["system"], base["system"]) == ("slora", "base")
    for r in (slora, base):
        assert r["steps"] > 5 and 0 < r["ms_p50"] <= r["ms_p90"]
    return slora, base


@pytest.mark.slow
def test_sched_profile_times_both_schedulers_and_names_the_plugins_work(tmp_path):
    slora, base = _sched_profile(tmp_path, "--adapters", "12", "--requests", "30")
    assert slora["target"] == base["target"] == "schedule" and slora["steps"] > 10
    # The plugin's scheduler wrapper and its paging were profiled, base has neither.
    assert "load_ahead" in slora["profile"] and "vllm_v1_core_sched_scheduler.py" in slora["profile"]
    assert "load_ahead" not in base["profile"]


@pytest.mark.slow
def test_sched_profile_times_the_executors_step(tmp_path):
    slora, base = _sched_profile(tmp_path, "--target", "execute_model", "--adapters", "3", "--requests", "20")
    assert slora["target"] == base["target"] == "execute_model"
    # The executor's step, the model's forward in it; the paged op only in the plugin's.
    assert "_model_forward" in slora["profile"] and "_model_forward" in base["profile"]
    assert "slora_paged_lora" in slora["profile"] and "slora_paged_lora" not in base["profile"]


def test_an_upload_takes_few_torch_calls_whatever_the_layers(tmp_path):
    """An upload's lane hands the GIL over at each torch call: a rank-8
    adapter on q,k,v,o of a 32-layer model takes one gather and one
    scatter for every layer, not a scatter per layer and five launches per
    kind (155 calls before), and a rank-64 one, gathered four layers at a
    time and sent in runs of half the staging ring, stays well under that
    (190 before)."""
    from benchmarks.upload_calls import count_calls

    calls = count_calls([8, 64], tmp_path)
    assert calls[8] <= 36 and calls[64] <= 100, calls
