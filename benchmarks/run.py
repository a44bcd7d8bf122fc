"""Stock vLLM vs the plugin on S-LoRA's synthetic workload, side by side in one run.

    python -m benchmarks.run --preset headline          # GPU: Llama-2-7B shape, n in {5,100,1000,2000}
    python -m benchmarks.run --preset headline-online   # the same through `vllm serve` + async client
    python -m benchmarks.run --preset tiny              # CPU: tiny model, base and stock (the test's run)

Every configuration (base, stock per max_loras tried, slora, slora-bmm,
slora-no-unifymem) is one engine in a child process, started once and reused
for all its measurements, one per n. Engines run as users run vLLM
(torch.compile and CUDA graphs; ``--enforce-eager`` for none). Any preset
value can be overridden (``--n 5,100 --systems base,stock,slora``). Output,
under ``--results-dir``: ``NAME.json`` (config, versions, device, every
figure), ``NAME.md`` (the table with ratios vs stock and base),
``NAME-throughput.png``, ``NAME-ttft-cdf.png``.

Each point runs to completion, or for ``--window-s`` seconds; its steady
figures (mean running batch, share of time with requests waiting, tokens/s
while the queue was non-empty) come from vLLM's own gauges (``metrics.py``).

Time budget, only with ``--budget-s``: it covers everything from set-up to
the last measurement, and a budget that cannot cover one engine start-up and
one point is refused before anything starts. Each configuration gets a share
of the time left proportional to its expected need among the configurations
left (engine overhead plus its measurements, stock's counted double), but at
least enough for its engine and a short look at each n, so unused time rolls
over to later ones and, when time runs short, the last configurations (the
ablations) are the ones cut. Each measurement gets an equal share of its
configuration's time left, but at least ``--min-point-s`` (the largest n are
the ones cut). A configuration whose share cannot cover an engine start-up
is "skipped (time budget)", a measurement that outruns its share is stopped
and reported "too slow", and an engine that is not up within its share is
killed and reported "start-up too slow".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import report
from benchmarks.adapter_pool import adapter_bytes, make_folders
from benchmarks.metrics import not_run
from benchmarks.offline import error_line
from benchmarks.systems import ORDER, PLUGIN_VARS, configs, describe, engine_kwargs
from benchmarks.workload import TARGETS, WorkloadSpec, generate, read_trace, write_trace

ROOT = Path(__file__).resolve().parents[1]
ALL_SYSTEMS = list(ORDER)  # by importance (systems.ORDER)
# Start-up grace after a configuration's share: engine shutdown, abort of a stopped measurement.
GRACE_S = 30
# Set by SIGTERM (a device call's timeout): the run ends its engine and writes
# what it measured so far, the configuration in progress included.
STOPPED = []

DEFAULTS = dict(
    mode="offline", arch="llama-2-7b", n=[5, 100, 1000, 2000], requests=160, systems=ALL_SYSTEMS,
    stock_max_loras=[16, 64], ranks=[8, 16, 32, 64], targets=["attn"], alpha=[1.0], rate=[6.0], cv=1.0,
    input_range=[8, 512], output_range=[8, 512], seed=0, pool=8, host_lora_cache_gb=32.0,
    slo_ttft_s=6.0, budget_s=None, est_start_s=100.0, est_point_s=30.0, min_point_s=5.0, eager=False,
    max_num_seqs=None, gpu_memory_utilization=None, warmup=True, tensor_parallel_size=None,
    max_capture_size=None, capture_sizes=None, window_s=None, duration_s=None, drain_s=None,
    cross_check=[], extra_points=[], stock_n=None,
)
PRESETS = {
    # As users run vLLM: compiled, CUDA graphs on, 1,000 requests per point
    # (several waves of a full batch), every point to completion. A 7B
    # engine takes 100-150 s to start on an H200: split long tables over
    # device calls (--systems / --n subsets, report --merge).
    "headline": dict(DEFAULTS, requests=1000),
    # Online (S-LoRA's latency figures): n = 1000 at arrival rates up to
    # past saturation, each point 12 s of arrivals and at most 8 s more for
    # the requests in flight (the rest count as SLO misses); fewer
    # configurations (the ablations are throughput questions).
    "headline-online": dict(DEFAULTS, mode="online", n=[1000], rate=[4.0, 8.0, 16.0, 32.0],
                            duration_s=12.0, drain_s=8.0, stock_max_loras=[64],
                            systems=["base", "slora", "stock"]),
    # CPU (the test suite's run): tiny model, short requests.
    "tiny": dict(DEFAULTS, arch="tiny", n=[2, 5], requests=16, systems=["base", "stock"],
                 stock_max_loras=[4], ranks=[8, 16], input_range=[8, 32], output_range=[4, 16],
                 pool=2, budget_s=900.0, est_start_s=60.0, est_point_s=2.0, min_point_s=2.0, rate=[8.0],
                 slo_ttft_s=5.0, eager=True),
}


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def extra_points(text: str) -> list[dict]:
    """'n=2000 alpha=0.5;n=1000 targets=all' -> [{'n': 2000, 'alpha': 0.5}, ...]"""
    out = []
    for item in filter(None, (x.strip() for x in text.split(";"))):
        fields = dict(kv.split("=", 1) for kv in item.replace("/s", "").split())
        unknown = set(fields) - {"n", "rate", "alpha", "targets"}
        if "n" not in fields or unknown:
            raise argparse.ArgumentTypeError(f"extra point {item!r}: needs n=N, may have rate, alpha, targets")
        if fields.get("targets", "attn") not in TARGETS:
            raise argparse.ArgumentTypeError(f"extra point {item!r}: targets one of {', '.join(TARGETS)}")
        out.append({k: (int(v) if k == "n" else v if k == "targets" else float(v)) for k, v in fields.items()})
    return out


def targets_list(text: str) -> list[str]:
    found = [t for t in text.split(",") if t]
    unknown = [t for t in found if t not in TARGETS]
    if unknown or not found:
        raise argparse.ArgumentTypeError(f"unknown targets {','.join(unknown)}; known: {','.join(TARGETS)}")
    return found


def parse(argv) -> tuple[argparse.Namespace, dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", choices=PRESETS, default=None)
    p.add_argument("--mode", choices=["offline", "online"])
    p.add_argument("--arch", help="llama-2-7b | llama-2-13b (config.json, dummy weights) | tiny (CPU)")
    p.add_argument("--n", type=ints, help="numbers of adapters, e.g. 5,100,1000,2000")
    p.add_argument("--requests", type=int, help="requests per measurement")
    p.add_argument("--systems", type=lambda s: s.split(","), help=",".join(ALL_SYSTEMS))
    p.add_argument("--stock-max-loras", type=ints, help="max_loras values tried for stock")
    p.add_argument("--stock-n", type=ints,
                   help="the n at which stock runs (default: every point), e.g. 5: stock's LRU "
                        "cache thrashes at thousands of adapters and would take the call's time")
    p.add_argument("--ranks", type=ints)
    p.add_argument("--targets", type=targets_list,
                   help="attn: q,k,v,o; all: the seven projections; a list adds a point per value")
    p.add_argument("--alpha", type=floats,
                   help="popularity power law (S-LoRA's: 1 = uniform, <1 skewed); a list adds a "
                        "point per value")
    p.add_argument("--rate", type=floats, help="arrivals per second (online); a list adds a point per value")
    p.add_argument("--duration-s", type=float,
                   help="online: seconds of arrivals per point (requests = rate x duration, "
                        "instead of --requests)")
    p.add_argument("--drain-s", type=float,
                   help="online: after a point's last arrival, wait at most this long for the "
                        "requests in flight; those unfinished count as SLO misses (default: to completion)")
    p.add_argument("--extra-points", type=extra_points,
                   help="points beside the grid, ';'-separated, each 'n=N [rate=R] [alpha=A] "
                        "[targets=T]' (the rest as the grid's first), e.g. "
                        "'n=2000 alpha=0.5;n=1000 targets=all'")
    p.add_argument("--cross-check", type=lambda s: s.split(","),
                   help="online: for these systems, also run vLLM's own client (`vllm bench serve`, "
                        "random dataset, random adapter per request) against the same server at "
                        "the first point's n, rate and lengths, and report both clients' figures")
    p.add_argument("--cv", type=float, help="coefficient of variation of inter-arrival times")
    p.add_argument("--input-range", type=ints, help="Il,Iu")
    p.add_argument("--output-range", type=ints, help="Ol,Ou")
    p.add_argument("--seed", type=int)
    p.add_argument("--pool", type=int, help="distinct weight files per rank shared by the adapter folders")
    p.add_argument("--host-lora-cache-gb", type=float,
                   help="bounds stock's max_cpu_loras: this many GB of adapters of the largest rank")
    p.add_argument("--slo-ttft-s", type=float, help="first-token latency bound for SLO attainment")
    p.add_argument("--budget-s", type=float, help="time budget of the whole run")
    p.add_argument("--est-start-s", type=float,
                   help="engine overhead (process, start-up, warm-up, shutdown) until one is measured")
    p.add_argument("--est-point-s", type=float, help="expected seconds per measurement (stock: twice)")
    p.add_argument("--min-point-s", type=float, help="shortest time share worth a measurement")
    p.add_argument("--enforce-eager", dest="eager", action="store_true", default=None,
                   help="every system eager: no torch.compile, no CUDA graphs (default: vLLM's "
                        "default, compiled with CUDA graphs)")
    p.add_argument("--max-capture-size", type=int,
                   help="largest CUDA-graph batch size for every system (vLLM's "
                        "max_cudagraph_capture_size): a shorter start-up, stated in the table")
    p.add_argument("--capture-sizes", type=ints,
                   help="CUDA-graph batch sizes for every system, e.g. 1,2,4,...,256 (vLLM's "
                        "cudagraph_capture_sizes; larger decode batches pad to the next one): "
                        "a shorter start-up, stated in the table")
    p.add_argument("--window-s", type=float,
                   help="stop each measurement after this many seconds and report its steady "
                        "window (for points that would take too long to finish)")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--tensor-parallel-size", type=int,
                   help="GPUs per engine (every system; S-LoRA's partition for the plugin)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", default=None)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/slora-bench"),
                   help="model config, adapter folders, traces, engine logs")
    p.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", help="results file stem (default: PRESET-MODE or run-MODE)")
    args = p.parse_args(argv)
    cfg = dict(PRESETS[args.preset] if args.preset else DEFAULTS)
    for key in DEFAULTS:
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    cfg["n"] = sorted(set(cfg["n"]))
    missing = set(cfg["stock_n"] or ()) - set(cfg["n"]) - {e["n"] for e in cfg["extra_points"]}
    if missing:
        p.error(f"--stock-n {','.join(map(str, sorted(missing)))}: no such point (--n {','.join(map(str, cfg['n']))})")
    return args, cfg


def make_model(root: Path, arch: str) -> tuple[Path, bool]:
    """(model folder, dummy weights?)"""
    from vllm_slora.testing.models import make_llama_config, make_tiny_llama

    path = root / "model"
    if arch == "tiny":
        if not (path / "model.safetensors").exists():
            make_tiny_llama(path)
        return path, False
    return make_llama_config(path, arch), True


def point_label(n: int, rate: float | None, alpha: float, targets: str) -> str:
    """A point's name: n, plus the rate (online) and whatever differs from
    S-LoRA's default workload (uniform popularity, q,k,v,o)."""
    parts = [f"n={n}"] + ([f"rate={rate:g}/s"] if rate is not None else [])
    parts += [f"alpha={alpha:g}"] if alpha != 1.0 else []
    parts += [f"targets={targets}"] if targets != "attn" else []
    return " ".join(parts)


def label_slug(label: str) -> str:
    """'n=1000 rate=8/s' -> 'n1000-rate8': file and adapter-name prefix."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", label.replace("=", "").replace("/s", "")).strip("-")


def point_grid(cfg: dict) -> list[dict]:
    """Every point of a run: n x rate (online only) x alpha x targets."""
    rates = cfg["rate"] if cfg["mode"] == "online" else [None]
    grid = [dict(n=n, rate=rate, alpha=alpha, targets=targets)
            for targets in cfg["targets"] for alpha in cfg["alpha"] for rate in rates for n in cfg["n"]]
    first = dict(rate=rates[0], alpha=cfg["alpha"][0], targets=cfg["targets"][0])
    extra = [first | e | ({} if cfg["mode"] == "online" else {"rate": None}) for e in cfg["extra_points"]]
    points = {}
    for pt in grid + extra:
        label = point_label(pt["n"], pt["rate"], pt["alpha"], pt["targets"])
        points.setdefault(label, dict(pt, label=label))
    return list(points.values())


def requests_at(cfg: dict, rate: float | None) -> int:
    if cfg["mode"] == "online" and cfg["duration_s"] and rate:
        return max(1, round(rate * cfg["duration_s"]))
    return cfg["requests"]


def prepare(cfg: dict, workdir: Path, run_dir: Path) -> dict:
    """Model, traces (one per point, plus base's: one per arrival rate) and
    adapter folders. Offline, every point of one n replays adapters of the
    same names (LoRA ids are fresh per measurement); online, each point has
    folders of its own names (the server registers an adapter by name on its
    first request), so that every point starts with cold adapter caches."""
    model, dummy = make_model(workdir / cfg["arch"], cfg["arch"])
    mconf = json.loads((model / "config.json").read_text())
    if cfg["mode"] == "online":
        from vllm_slora.testing.models import make_word_tokenizer

        make_word_tokenizer(model, mconf["vocab_size"])  # for `vllm bench serve`; servers detokenize
    online = cfg["mode"] == "online"
    points, base_points, made = [], {}, {}
    # One folder of adapter folders for every point (vLLM's filesystem resolver reads one).
    root = workdir / cfg["arch"] / f"adapters-s{cfg['seed']}-r{'-'.join(map(str, cfg['ranks']))}-p{cfg['pool']}"
    folders: dict[str, dict[str, int]] = {}
    start = time.time()
    grid = point_grid(cfg)
    several_rates = len({pt["rate"] for pt in grid}) > 1
    for pt in grid:
        rate = pt["rate"] if online else cfg["rate"][0]
        spec = WorkloadSpec(n_adapters=pt["n"], num_requests=requests_at(cfg, pt["rate"]),
                            ranks=tuple(cfg["ranks"]), targets=pt["targets"], alpha=pt["alpha"], rate=rate,
                            cv=cfg["cv"], input_range=tuple(cfg["input_range"]),
                            output_range=tuple(cfg["output_range"]), vocab_size=mconf["vocab_size"],
                            seed=cfg["seed"])
        trace = generate(spec)
        slug = label_slug(pt["label"])
        prefix = f"{slug}-" if online else f"n{pt['n']}-" + ("" if pt["targets"] == "attn" else f"{pt['targets']}-")
        base_label = f"base rate={rate:g}/s" if online and several_rates else "base"
        if base_label not in base_points:
            path = write_trace(run_dir / "traces" / f"{label_slug(base_label)}.jsonl", trace.without_adapters())
            base_points[base_label] = {"n": 0, "label": base_label, "rate": pt["rate"], "trace": str(path),
                                       "prefix": "", "adapters_root": str(root),
                                       "requests": len(trace.requests)}
        path = write_trace(run_dir / "traces" / f"{slug}.jsonl", trace)
        points.append(dict(pt, trace=str(path), prefix=prefix, base=base_label, requests=len(trace.requests),
                           adapters_root=str(root)))
        folders.setdefault(pt["targets"], {}).update({prefix + a.name: a.rank for a in trace.adapters})
    if online and cfg["cross_check"]:  # vLLM's client at the first point: folders of their own names
        first = points[0]
        folders[first["targets"]] |= {f"xc-{first['prefix']}{a.name}": a.rank
                                      for a in read_trace(first["trace"]).adapters}
    warmup = {f"warmup-r{r}": r for r in sorted(set(cfg["ranks"]))}
    for targets, names in folders.items():
        made |= make_folders(root, model, names | warmup, TARGETS[targets],
                             cfg["pool"], cfg["seed"])
    widest = max(folders, key=lambda t: len(TARGETS[t]))
    biggest = adapter_bytes(mconf, max(cfg["ranks"]), TARGETS[widest])
    most = max(p["n"] for p in points)
    return dict(model=model, dummy=dummy, mconf=mconf, points=points, base_points=list(base_points.values()),
                warmup_adapters=[str(made[k]) for k in warmup],
                adapters_root=root,
                adapters_s=time.time() - start, adapter_bytes_max=biggest,
                max_cpu_loras=max(1, min(most + len(warmup), int(cfg["host_lora_cache_gb"] * 2**30 // biggest))))


def child_pythonpath(workdir: Path) -> tuple[str, str | None]:
    """PYTHONPATH for the engines: this ``benchmarks`` package without the
    repository root, so that vLLM and the children import the *installed*
    vllm_slora (the source tree lacks ``vllm_slora.patches``, which setup maps
    from ``patches/``). Falls back to the root, with a warning, when the
    project is not installed."""
    shim = workdir / "pythonpath"
    shim.mkdir(parents=True, exist_ok=True)
    link = shim / "benchmarks"
    if not (link.is_symlink() and link.resolve() == ROOT / "benchmarks"):
        if link.is_symlink():
            link.unlink()
        link.symlink_to(ROOT / "benchmarks")
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    path = os.pathsep.join([str(shim)] + rest)
    probe = subprocess.run([sys.executable, "-c", "import vllm_slora.patches, vllm_slora.testing.models"],
                           cwd=shim, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True)
    if probe.returncode == 0:
        return path, None
    warning = ("vllm_slora is not installed (pip install --no-deps --no-build-isolation .): engines import "
               "it from the source tree, where the plugin systems cannot load their patches")
    print(f"warning: {warning}", file=sys.stderr)
    return os.pathsep.join([path, str(ROOT)]), warning


# The entry point that loads only the engine core's step log
# (patches/vllm_v1_engine_core.py), nothing else of the plugin.
STEP_LOG_PLUGIN = "vllm_slora_steplog"


def child_env(config, cfg: dict, prep: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PLUGIN_VARS + ("VLLM_PLUGINS",)}
    env.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env["PYTHONPATH"] = prep["pythonpath"]
    if cfg["mode"] == "online":
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env["VLLM_LORA_RESOLVER_CACHE_DIR"] = str(prep["adapters_root"])
    env.update(config.env)
    if "VLLM_PLUGINS" in env:  # base and stock: without the plugin, with its step log
        env["VLLM_PLUGINS"] += "," + STEP_LOG_PLUGIN
    return env


GENERIC = ("See stack trace", "see root cause", "Engine core initialization failed", "EngineDeadError",
           "check the stack trace", "vllm serve exited")
EXCEPTION_LINE = re.compile(r"\b((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception)): (\S.*)$")


def is_generic(message: str | None) -> bool:
    return message is None or any(g.lower() in message.lower() for g in GENERIC)


def error_from_log(*logs: Path) -> str | None:
    """The first telling exception line of the engine logs (the root cause, not
    vLLM's generic 'Engine core initialization failed' or 'EngineDeadError';
    exceptions vLLM only warns about are not causes)."""
    lines = [line for log in logs if log.exists() for line in log.read_text(errors="replace").splitlines()
             if " WARNING " not in line]
    found = [f"{m.group(1)}: {m.group(2).strip()}" for line in lines if (m := EXCEPTION_LINE.search(line))]
    specific = [f for f in found if not is_generic(f)]
    return (specific or found or [None])[0]


def kill_group(proc: subprocess.Popen) -> None:
    """End the child and everything it started (its own process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            continue
    for _ in range(30):  # the engine's own processes free the GPU as they exit
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)


class Child:
    """A configuration's child process (offline.py or online.py) and what its
    events file has said so far."""

    def __init__(self, config, kwargs: dict, points: list[dict], cfg: dict, prep: dict, deadline: float,
                 run_dir: Path):
        stem = config.label.replace(" ", "").replace("(", "-").replace(")", "").replace("=", "")
        self.points, self.deadline = points, deadline
        self.log = run_dir / "logs" / f"{stem}.log"
        self.server_log = run_dir / "logs" / f"{stem}.server.log"
        self.events_path = run_dir / "logs" / f"{stem}.events.jsonl"
        self.step_log = run_dir / "logs" / f"{stem}.steps.jsonl"
        self.step_log.unlink(missing_ok=True)
        spec_path = run_dir / "specs" / f"{stem}.json"
        for p in (spec_path, self.log):
            p.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps(dict(
            label=config.label, env=config.env, engine_kwargs=kwargs, deadline=deadline, points=points,
            min_point_s=cfg["min_point_s"], slo_ttft_s=cfg["slo_ttft_s"], warmup=cfg["warmup"],
            window_s=cfg["window_s"], drain_s=cfg["drain_s"],
            cross_check=config.system in cfg["cross_check"], input_range=cfg["input_range"],
            output_range=cfg["output_range"], seed=cfg["seed"],
            warmup_prompt_len=min(64, cfg["input_range"][1]),
            warmup_adapters=[] if config.system == "base" else prep["warmup_adapters"],
            server_log=str(self.server_log), step_log=str(self.step_log))))
        self.events_path.write_text("")
        self.ready: dict = {}
        self.results: dict[str, dict] = {}
        self.error, self.current, self.killed, self.cross_check = None, None, False, None
        self.spawned = time.time()
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"benchmarks.{cfg['mode']}", str(spec_path), str(self.events_path)],
                cwd=run_dir, env=child_env(config, cfg, prep), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def follow(self, bar) -> None:
        """Mirror the events on ``bar`` until the child exits or overruns its
        share by GRACE_S; then end its process group."""
        done_before, partial = 0, ""
        events = self.events_path.open()
        try:
            while True:
                exited = self.proc.poll() is not None
                # Only whole lines: a long event may still be half written.
                *lines, partial = (partial + events.read()).split("\n")
                for line in lines:
                    ev = json.loads(line)
                    if ev["ev"] == "ready":
                        self.ready = {k: ev[k] for k in ("start_s", "warmup_s", "versions", "device", "engine")}
                    elif ev["ev"] == "point_begin":
                        self.current = ev["label"]
                        bar.set_postfix_str(self.current)
                    elif ev["ev"] == "progress":
                        bar.n = done_before + ev["done"]
                        bar.refresh()
                    elif ev["ev"] == "point":
                        self.results[ev["label"]] = ev["result"]
                        done_before += ev["result"]["requests"]
                        bar.n = done_before
                        bar.refresh()
                    elif ev["ev"] == "error":
                        self.error = ev["error"]
                    elif ev["ev"] == "cross_check":
                        self.cross_check = ev["result"]
                if exited:
                    break
                if time.time() > self.deadline + GRACE_S or STOPPED:
                    self.killed = True
                    break
                time.sleep(0.5)
        finally:
            events.close()
            kill_group(self.proc)

    def root_cause(self) -> str | None:
        return error_from_log(self.log, self.server_log)


def run_config(config, kwargs: dict, points: list[dict], cfg: dict, prep: dict, share: float,
               run_dir: Path) -> dict:
    """One engine: start it, run every point, return its record (every point
    has a result, a failure or the reason it did not run)."""
    from tqdm import tqdm

    bar = tqdm(total=sum(p["requests"] for p in points), desc=f"{config.label:<28}", unit="req",
               dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 10.0)
    bar.set_postfix_str("starting engine")
    child = Child(config, kwargs, points, cfg, prep, time.time() + share, run_dir)
    child.follow(bar)
    bar.set_postfix_str("done")
    bar.close()

    record = dict(system=config.system, label=config.label, env=config.env, engine_kwargs=kwargs,
                  command=describe(config, kwargs), status="ok", error=child.error, start_s=None,
                  log=str(child.log), wall_s=round(time.time() - child.spawned, 1)) | child.ready
    if child.cross_check:
        record["cross_check"] = child.cross_check
    code = child.proc.returncode
    if is_generic(record["error"]) and (code or record["error"]):
        record["error"] = child.root_cause() or record["error"]
    started = record["start_s"] is not None
    if not started:
        if STOPPED:
            record["status"], note = "skipped", "stopped from outside (SIGTERM) during start-up"
        elif child.killed or "time share" in (record["error"] or ""):
            record["status"], note = "start-up too slow", f"not up within its {share:.0f} s share"
        else:
            record["status"], note = "start-up failed", record["error"] or f"exit code {code}"
        record["error"] = record["error"] or note
    elif code not in (0, None) and not child.killed and len(child.results) < len(points):
        record["error"] = record["error"] or child.root_cause() or f"exit code {code}"
    record["points"] = []
    for p in points:
        result = child.results.get(p["label"])
        if result is None:
            if not started:
                result = not_run(record["status"], p["requests"], note)
            elif child.killed:
                why = "stopped from outside (SIGTERM)" if STOPPED else "killed after its time share"
                result = (not_run("too slow", p["requests"], why) if p["label"] == child.current
                          else not_run("skipped", p["requests"], "stopped from outside" if STOPPED else "time budget"))
            else:
                result = not_run("failed", p["requests"], record["error"] or "engine exited")
        elif result["status"] == "failed" and is_generic(result.get("note")):
            result["note"] = child.root_cause() or result["note"]
        record["points"].append({"n": p["n"], "label": p["label"], **result})
    return record


def not_started(config, kwargs, points, status: str, reason: str, error: str | None = None) -> dict:
    print(f"{config.label}: {status} ({reason})", file=sys.stderr)
    return dict(system=config.system, label=config.label, env=config.env, engine_kwargs=kwargs,
                command=describe(config, kwargs), status=status, error=error, start_s=None,
                points=[{"n": p["n"], "label": p["label"], **not_run(status, p["requests"], reason)}
                        for p in points])


def points_for(system: str, cfg: dict, prep: dict) -> list[dict]:
    """The points a system measures: base one per distinct trace shape, stock
    those at ``--stock-n`` (all if not given), the plugin's systems all."""
    if system == "base":
        return prep["base_points"]
    if system == "stock" and cfg["stock_n"]:
        return [p for p in prep["points"] if p["n"] in cfg["stock_n"]]
    return prep["points"]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except OSError:
        return None


SOURCE_DIRS = ("vllm_slora", "patches", "benchmarks", "scripts")


def source_hash(root: Path = ROOT) -> str:
    """SHA-256 (12 hex digits) of the code that ran: every .py and .sh file of
    ``SOURCE_DIRS`` and ``pyproject.toml``, by path. A copy of the tree whose
    git metadata lags its files (the GPU machine's) still names its code:
    compare with ``python -c "from benchmarks.run import source_hash;
    print(source_hash())"`` on a checkout."""
    import hashlib

    files = [root / "pyproject.toml"] + sorted(
        f for d in SOURCE_DIRS for f in (root / d).rglob("*")
        if f.suffix in (".py", ".sh") and "__pycache__" not in f.parts)
    digest = hashlib.sha256()
    for f in files:
        if f.is_file():
            digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def results_json(name, argv, cfg, workdir, prep, common, records, warnings, used_s) -> dict:
    ready = next((r for r in records if r.get("versions")), {})
    created = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    for record in records:  # which device call measured it (report.merge keeps it)
        record["call"] = created
    graphs = "enforce_eager (no torch.compile, no CUDA graphs)" if cfg["eager"] else "torch.compile + CUDA graphs"
    if not cfg["eager"] and cfg["capture_sizes"]:
        graphs += (f" (graphs of {','.join(map(str, cfg['capture_sizes']))} tokens only, "
                   f"for a shorter start-up)")
    elif not cfg["eager"] and cfg["max_capture_size"] is not None:
        graphs += f" (graphs up to {cfg['max_capture_size']} tokens, for a shorter start-up)"
    return {
        "schema": 1,
        "name": name,
        "command": "python -m benchmarks.run " + shlex.join(reproducible(argv)),
        "created": created,
        "git_commit": git_commit(),
        "source_hash": source_hash(),
        "device": ready.get("device"),
        "versions": ready.get("versions"),
        "config": {**cfg, "workdir": str(workdir)},
        "workload": {"num_requests": cfg["requests"] if not cfg["duration_s"] else None,
                     "duration_s": cfg["duration_s"], "drain_s": cfg["drain_s"],
                     "ranks": cfg["ranks"], "targets": cfg["targets"],
                     "alpha": cfg["alpha"], "rate": cfg["rate"], "cv": cfg["cv"],
                     "input_range": cfg["input_range"], "output_range": cfg["output_range"],
                     "seed": cfg["seed"], "vocab_size": prep["mconf"]["vocab_size"]},
        "engine_note": (f"{graphs}, prefix caching off, max_model_len {common['max_model_len']}, max_lora_rank "
                        f"{common['max_lora_rank']}, stock max_cpu_loras {prep['max_cpu_loras']} (the most adapters "
                        f"of a point and the warm-up's, bounded by {cfg['host_lora_cache_gb']:g} GB of "
                        f"rank-{max(cfg['ranks'])} adapters, at least its max_loras; the plugin's "
                        f"adapters wait as files in the page cache); the plugin "
                        f"ignores max_loras (given {common['slora_max_loras']}); one engine per configuration; "
                        f"LoRA ids fresh per measurement (cold adapter caches), a short warm-up first"),
        "adapters": {"root": str(prep["adapters_root"]), "pool_per_rank": cfg["pool"],
                     "note": (f"PEFT folders of random weights, one per adapter and per measurement "
                              f"(names <point>-a<i>), each with its own adapter_config.json; weights are "
                              f"hard links to {cfg['pool']} distinct files per rank (so they sit in the "
                              f"page cache: disk loads are cheaper than with truly distinct adapters); "
                              f"made in {prep['adapters_s']:.0f} s")},
        "points": [{k: p[k] for k in ("label", "n", "rate", "alpha", "targets", "base", "requests")}
                   for p in prep["points"]],
        "budget": {"budget_s": cfg["budget_s"], "used_s": round(used_s, 1)},
        "warnings": warnings,
        "systems": records,
    }


def reproducible(argv: list[str]) -> list[str]:
    """The command line a report gives to reproduce it: without
    ``--results-dir`` (where this machine put the files, not what ran)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--results-dir":
            skip = True
        elif not a.startswith("--results-dir="):
            out.append(a)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, cfg = parse(argv)
    t0 = time.time()
    if cfg["budget_s"] is not None and cfg["budget_s"] < cfg["est_start_s"] + cfg["min_point_s"]:
        print(f"error: --budget-s {cfg['budget_s']:g} cannot cover one engine start-up "
              f"(--est-start-s {cfg['est_start_s']:g}) and one point (--min-point-s "
              f"{cfg['min_point_s']:g}); nothing was started", file=sys.stderr)
        return 2
    end = t0 + cfg["budget_s"] if cfg["budget_s"] is not None else float("inf")
    stem = args.preset or "run"
    name = args.name or (stem if stem.endswith(cfg["mode"]) else f"{stem}-{cfg['mode']}")
    run_dir = args.workdir / "runs" / name
    prep = prepare(cfg, args.workdir, run_dir)
    prep["pythonpath"], install_warning = child_pythonpath(args.workdir)
    print(f"set-up {time.time() - t0:.0f} s (adapter folders {prep['adapters_s']:.0f} s); "
          f"workdir {run_dir}", file=sys.stderr)

    common = dict(model=str(prep["model"]), dummy=prep["dummy"], max_lora_rank=max(cfg["ranks"]),
                  max_cpu_loras=prep["max_cpu_loras"], slora_max_loras=max(cfg["stock_max_loras"]),
                  max_model_len=cfg["input_range"][1] + cfg["output_range"][1], eager=cfg["eager"],
                  extra={k: cfg[k] for k in ("max_num_seqs", "gpu_memory_utilization", "tensor_parallel_size")
                         if cfg[k] is not None})
    if cfg["capture_sizes"] and not cfg["eager"]:
        common["extra"]["compilation_config"] = {"cudagraph_capture_sizes": cfg["capture_sizes"]}
    elif cfg["max_capture_size"] is not None and not cfg["eager"]:
        common["extra"]["compilation_config"] = {"max_cudagraph_capture_size": cfg["max_capture_size"]}
    plan = configs(cfg["systems"], cfg["stock_max_loras"])
    records, overheads = [], []
    warnings = [w for w in [install_warning] if w]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.results_dir / f"{name}.json"

    def save() -> None:
        json_path.write_text(json.dumps(results_json(name, argv, cfg, args.workdir, prep, common,
                                                     records, warnings, time.time() - t0), indent=1))

    def points_of(config):
        return points_for(config.system, cfg, prep)

    signal.signal(signal.SIGTERM, lambda *_: STOPPED.append(time.time()))
    for k, config in enumerate(plan):
        kwargs = engine_kwargs(config, **common)
        if STOPPED:
            records.append(not_started(config, kwargs, points_of(config), "skipped", "stopped from outside"))
            continue
        if cfg["mode"] == "online":  # the servers detokenize, as users run them
            kwargs.pop("skip_tokenizer_init")
        overhead = max(overheads) if overheads else cfg["est_start_s"]
        needs = [overhead + len(points_of(c)) * cfg["est_point_s"] * (2 if c.system == "stock" else 1)
                 for c in plan[k:]]
        left = end - time.time()
        # At least enough for its engine and a short look at each n: the
        # earlier (more important) configurations are never the ones cut.
        floor = overhead + cfg["min_point_s"] * len(points_of(config))
        share = left if left == float("inf") else min(left, max(left * needs[0] / sum(needs), floor))
        if share < overhead + cfg["min_point_s"]:
            records.append(not_started(config, kwargs, points_of(config), "skipped", "time budget"))
            continue
        try:
            record = run_config(config, kwargs, points_of(config), cfg, prep, share, run_dir)
        except Exception as e:  # a bug here must not lose the other systems' figures
            error = f"benchmark harness: {error_line(e)}"
            record = not_started(config, kwargs, points_of(config), "failed", error, error)
        if record["start_s"]:
            overheads.append(record["wall_s"] - sum(p.get("elapsed_s") or 0.0 for p in record["points"]))
        records.append(record)
        save()  # a run stopped from outside (a device call's limit) keeps what it finished

    save()
    md = report.render(json_path)
    print(md)
    print(f"wrote {json_path} and {json_path.with_suffix('.md').name} (+ plots) in {args.results_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
