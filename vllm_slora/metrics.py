"""Prometheus metrics of S-LoRA mode, served on vLLM's own ``/metrics``.

The counters live where the paging happens: the scheduler's ``AdapterPool``
and the worker's ``Pager``/``ReadAhead``, in the engine-core process (and a
worker process, with a multiproc executor); ``/metrics`` is served by the API
process. How they get there, chosen from vLLM 0.26's source:

- vLLM's stats channel (``SchedulerStats`` in ``EngineCoreOutputs``, read by
  stat loggers, including ``vllm.stat_logger_plugins``) is a msgspec-typed
  message with no field for a plugin (``kv_connector_stats`` is fed to the
  connector's own loggers); an extra attribute does not survive the encoder.
- prometheus_client's multiprocess mode is switched on by vLLM only with
  ``--api-server-count`` > 1, and prometheus_client picks its value storage
  when it is imported, before any plugin runs, so the plugin cannot turn it on.

So each engine process writes a small snapshot (JSON, atomic rename) of its
counters to ``$VLLM_SLORA_METRICS_DIR/<pid>.json`` when they change, at most
once per ``FLUSH_INTERVAL_S`` (a background thread writes what changed: the
engine loop never writes a file), and the API process
registers a custom collector (``SLoraCollector``) on the registry vLLM's
``/metrics`` uses (``patches/vllm_entrypoints_serve_instrumentator_metrics.py``);
it reads the snapshots at scrape time. Scheduler figures are summed over
engine processes; worker figures (read-ahead, load times) are taken from
tensor-parallel rank 0 only, since every rank pages in its shard of the
same adapters (a sum would count each load P times). The API process makes
the directory at start-up and its engine processes inherit the variable.

Metrics (prefix ``vllm_slora:``, next to vLLM's ``vllm:``): gauges
``adapters_resident``, ``adapter_blocks_resident``, ``adapter_pages_resident``
(pages per layer), ``adapter_cached_unreferenced``, ``kv_free_blocks``;
counters ``adapter_loads_total``, ``adapter_loads_ahead_total``,
``adapter_loads_ahead_wasted_total``,
``adapter_evictions_total``, ``adapter_reloads_total``,
``host_cache_hits_total``, ``host_cache_misses_total``; histogram
``adapter_load_seconds`` (engine-thread time to page one adapter in: its
metadata and page rows; the upload itself runs on the uploader thread).
``host_cache_*`` count page-ins whose files were (not) read ahead into the
OS page cache, where adapters wait in host memory.
"""

from __future__ import annotations

import atexit
import bisect
import json
import os
import tempfile
import threading
import time
from pathlib import Path

ENV_DIR = "VLLM_SLORA_METRICS_DIR"
PREFIX = "vllm_slora:"
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# A snapshot is at most this old (seconds) while its process lives.
FLUSH_INTERVAL_S = 0.1

# (name, kind, help, source section, source key)
GAUGES = [
    ("adapters_resident", "adapters whose pages are in the KV pool", "scheduler", "resident_adapters"),
    ("adapter_blocks_resident", "KV blocks holding adapter pages", "scheduler", "resident_blocks"),
    ("adapter_pages_resident", "adapter pages (pool rows, per layer) in the KV pool",
     "scheduler", "resident_pages"),
    ("adapter_cached_unreferenced", "resident adapters no running request uses (evictable)",
     "scheduler", "cached_unreferenced"),
    ("kv_free_blocks", "free KV blocks of the pool adapters share", "scheduler", "free_blocks"),
]
COUNTERS = [
    ("adapter_loads", "adapters paged into the KV pool", "scheduler", "loads"),
    ("adapter_loads_ahead", "adapters paged in ahead of admission (prefetch)",
     "scheduler", "loaded_ahead"),
    ("adapter_loads_ahead_wasted", "adapters paged in ahead and evicted before any request used them",
     "scheduler", "ahead_wasted"),
    ("adapter_evictions", "adapters evicted from the KV pool", "scheduler", "evictions"),
    ("adapter_reloads", "loads of adapters evicted before", "scheduler", "reloads"),
    ("host_cache_hits", "adapter page-ins whose files were read ahead", "worker", "hits"),
    ("host_cache_misses", "adapter page-ins whose files were not read ahead", "worker", "misses"),
]

_state: dict = {"scheduler": {}, "worker": {}, "load_seconds": [0] * (len(LOAD_BUCKETS) + 1),
                "load_seconds_sum": 0.0, "tp_rank": 0}
_written: str | None = None
_lock = threading.Lock()
_flusher: dict = {"thread": None, "dirty": False, "last": 0.0}


def ensure_dir() -> None:
    """Make the snapshot directory (API / ``LLM`` process, before engines start)."""
    if not os.environ.get(ENV_DIR):
        tmp = tempfile.TemporaryDirectory(prefix="vllm-slora-metrics-")
        globals()["_tmp"] = tmp  # removed at exit
        os.environ[ENV_DIR] = tmp.name


def set_tp_rank(rank: int) -> None:
    """This process's tensor-parallel rank (worker figures count on rank 0)."""
    _state["tp_rank"] = int(rank)


def record(section: str, stats: dict) -> None:
    with _lock:
        _state[section] = dict(stats)  # a copy: the caller's dict keeps changing
    _changed()


# The plugin's own figures by name, process totals, only added to, not
# exported: the engine thread's seconds in its work (names ending in _s),
# the upload lanes' (upload_*_s) and counts. The benchmarks' step log
# (patches/vllm_v1_engine_core.py) writes each step's share.
PER_STEP: dict[str, float] = {}


def add(name: str, value: float) -> None:
    PER_STEP[name] = PER_STEP.get(name, 0.0) + value


def observe_load(seconds: float) -> None:
    with _lock:
        _state["load_seconds"][bisect.bisect_left(LOAD_BUCKETS, seconds)] += 1
        _state["load_seconds_sum"] += seconds


def _changed() -> None:
    """Leave the write to the background flusher (started on the first
    change): never a file write on the caller's thread, the engine's."""
    _flusher["dirty"] = True
    if _flusher["thread"] is None:
        thread = threading.Thread(target=_flush_loop, name="slora-metrics", daemon=True)
        _flusher["thread"] = thread
        thread.start()
        atexit.register(flush)


def _flush_loop() -> None:
    while True:
        time.sleep(FLUSH_INTERVAL_S)
        if _flusher["dirty"]:
            flush()


def flush() -> None:
    global _written
    folder = os.environ.get(ENV_DIR)
    _flusher["dirty"], _flusher["last"] = False, time.monotonic()
    if not folder:
        return
    with _lock:
        text = json.dumps(_state, sort_keys=True, default=float)
    if text == _written:
        return
    path = Path(folder) / f"{os.getpid()}.json"
    try:
        tmp = path.with_suffix(f".tmp{time.monotonic_ns()}")
        tmp.write_text(text)
        os.replace(tmp, path)
        _written = text
    except OSError:  # the API process went away and took the folder with it
        pass


def read_snapshots(folder: str | None = None) -> list[dict]:
    folder = folder or os.environ.get(ENV_DIR)
    out = []
    if folder and os.path.isdir(folder):
        for f in Path(folder).glob("*.json"):
            try:
                out.append(json.loads(f.read_text()))
            except (OSError, ValueError):
                continue
    return out


class SLoraCollector:
    """prometheus_client collector of the engine processes' snapshots:
    scheduler figures summed, worker figures of TP rank 0."""

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)

        snaps = read_snapshots()
        rank0 = [s for s in snaps if s.get("tp_rank", 0) == 0]

        def total(section, key):
            of = rank0 if section == "worker" else snaps
            return float(sum(s.get(section, {}).get(key, 0) or 0 for s in of))

        for name, help_, section, key in GAUGES:
            yield GaugeMetricFamily(PREFIX + name, help_, value=total(section, key))
        for name, help_, section, key in COUNTERS:
            yield CounterMetricFamily(PREFIX + name, help_, value=total(section, key))
        counts = [sum(s["load_seconds"][i] for s in rank0 if "load_seconds" in s)
                  for i in range(len(LOAD_BUCKETS) + 1)]
        buckets, acc = [], 0
        for bound, n in zip([*map(str, LOAD_BUCKETS), "+Inf"], counts):
            acc += n
            buckets.append((bound, acc))
        yield HistogramMetricFamily(
            PREFIX + "adapter_load_seconds", "worker time to page one adapter in",
            buckets=buckets, sum_value=sum(s.get("load_seconds_sum", 0.0) for s in rank0))

    def describe(self):
        return []  # collected lazily: names are only known at scrape time


_registered: set[int] = set()


def register(registry) -> None:
    """Add the collector to ``registry`` once."""
    if id(registry) not in _registered:
        registry.register(SLoraCollector())
        _registered.add(id(registry))
