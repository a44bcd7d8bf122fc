"""S-LoRA's /metrics figures: how engine processes' snapshots are combined
and how often an engine process writes its snapshot."""

from __future__ import annotations

import json
import time

from vllm_slora import metrics


def collected(folder, monkeypatch) -> dict:
    monkeypatch.setenv(metrics.ENV_DIR, str(folder))
    out = {}
    for family in metrics.SLoraCollector().collect():
        for sample in family.samples:
            out[sample.name] = sample.value
    return out


def test_worker_figures_count_once_under_tensor_parallelism(tmp_path, monkeypatch):
    # The engine core (scheduler) and two TP workers, each worker paging in
    # its shard of the same 5 adapters: host-cache and load-time figures are
    # rank 0's, scheduler figures are summed over processes.
    hist = [0] * (len(metrics.LOAD_BUCKETS) + 1)
    hist[3] = 5
    worker = {"worker": {"hits": 3, "misses": 2}, "scheduler": {}, "load_seconds": hist,
              "load_seconds_sum": 0.02}
    snaps = {"core": {"scheduler": {"loads": 5, "resident_adapters": 4, "ahead_wasted": 1}, "worker": {},
                      "tp_rank": 0},
             "w0": dict(worker, tp_rank=0), "w1": dict(worker, tp_rank=1)}
    for name, snap in snaps.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(snap))
    got = collected(tmp_path, monkeypatch)
    assert got["vllm_slora:adapter_loads_total"] == 5
    assert got["vllm_slora:adapters_resident"] == 4
    assert got["vllm_slora:adapter_loads_ahead_wasted_total"] == 1
    assert got["vllm_slora:host_cache_hits_total"] == 3
    assert got["vllm_slora:host_cache_misses_total"] == 2
    assert got["vllm_slora:adapter_load_seconds_count"] == 5
    assert abs(got["vllm_slora:adapter_load_seconds_sum"] - 0.02) < 1e-12


def test_snapshot_written_at_most_once_per_interval_and_the_last_state_lands(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(metrics, "FLUSH_INTERVAL_S", 0.2)
    monkeypatch.setattr(metrics, "_flusher", {"thread": None, "dirty": False, "last": 0.0})
    monkeypatch.setattr(metrics, "_written", None)
    writes = []
    real_replace = metrics.os.replace
    monkeypatch.setattr(metrics.os, "replace", lambda a, b: (writes.append(b), real_replace(a, b)))
    for step in range(200):  # one record per engine step, every step different
        metrics.record("scheduler", {"free_blocks": step})
    assert writes == []  # none on the engine's thread
    time.sleep(0.5)
    (snap,) = metrics.read_snapshots(str(tmp_path))
    assert snap["scheduler"]["free_blocks"] == 199  # the last state, by the flusher
    assert len(writes) == 1  # nothing changed after: written once
