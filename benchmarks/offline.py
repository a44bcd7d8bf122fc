"""Offline mode: one ``vllm.LLM`` engine per configuration, every trace of that
configuration through it, each trace handed to the engine all at once.

Runs as a child process (``python -m benchmarks.offline SPEC EVENTS``) so that
each configuration gets a fresh environment (plugin switches) and a fresh GPU.
It reports through a JSONL events file that the parent (run.py) follows:
``ready`` (start-up time, versions, device), ``progress``, ``point`` (one
measurement, see metrics.py) and ``error``. The engine is driven step by step
(as ``LLM.generate`` does) so that a measurement that outruns its time share
is stopped, its unfinished requests aborted, and reported as too slow.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from benchmarks import steplog
from benchmarks.metrics import not_run, steady_state, steady_window, summarize
from benchmarks.workload import read_trace


# Queue samples per second of a measurement (LLM.get_metrics reads vLLM's
# Prometheus registry: about a millisecond).
SAMPLE_S = 0.5


def queue_sample(llm) -> tuple[float, float, float]:
    """(running requests, waiting requests, generated tokens so far) from vLLM's metrics."""
    got = {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0,
           "vllm:generation_tokens": 0.0}
    for m in llm.get_metrics():
        if m.name in got and hasattr(m, "value"):
            got[m.name] += m.value
    return tuple(got.values())


class Events:
    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1)

    def emit(self, ev: str, **fields) -> None:
        self.f.write(json.dumps({"ev": ev, "t": time.time(), **fields}) + "\n")


def error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def versions() -> dict:
    import torch
    import vllm

    import vllm_slora

    return {"vllm": vllm.__version__, "torch": torch.__version__, "vllm_slora": vllm_slora.__version__,
            "python": sys.version.split()[0]}


def device_name() -> str:
    """The GPU's name from nvidia-smi (no CUDA context here), else the CPU."""
    import platform
    import subprocess

    # nvidia-smi ignores CUDA_VISIBLE_DEVICES: name only the GPUs this run sees
    # (one job per GPU of a multi-GPU machine must not read "4 x ...").
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    select = ["-i", visible] if visible and visible != "-1" else []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", *select],
                             capture_output=True, text=True, timeout=20)
        names = out.stdout.strip().splitlines()
        if out.returncode == 0 and names:
            return f"{len(names)} x {names[0]}" if len(names) > 1 else names[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def engine_facts(llm) -> dict:
    cfg = llm.llm_engine.vllm_config
    sched, cache = cfg.scheduler_config, cfg.cache_config
    return {"max_num_seqs": sched.max_num_seqs, "max_num_batched_tokens": sched.max_num_batched_tokens,
            "num_gpu_blocks": cache.num_gpu_blocks, "block_size": cache.block_size}


def plugin_stats(llm) -> dict:
    """The plugin's counters after a measurement (cumulative over the engine's life)."""
    try:
        from vllm_slora.memory import stats

        return stats.collect(llm)
    except Exception as e:
        return {"error": error_line(e)}


class Driver:
    """Runs traces through one engine; LoRA ids are unique per measurement so
    that every measurement starts with cold adapter caches."""

    def __init__(self, llm, events: Events, step_log: str | None = None):
        self.llm, self.events = llm, events
        self.next_lora_id = 1
        self.step_log = step_log
        cc = llm.llm_engine.vllm_config.compilation_config
        # Steps of more tokens run without a CUDA graph.
        self.graph_max = max(cc.cudagraph_capture_sizes or [0]) if cc.cudagraph_mode else 0

    def lora(self, name: str, path: Path):
        from vllm.lora.request import LoRARequest

        self.next_lora_id += 1
        return LoRARequest(name, self.next_lora_id - 1, str(path))

    def warmup(self, trace_path: str, adapters: list[str]) -> float:
        """A few short requests (one adapter per rank, in folders no measurement
        uses) so that one-time kernel compilation stays out of the measurements."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        trace = read_trace(trace_path)
        loras = [self.lora(Path(p).name, Path(p)) for p in adapters] or [None]
        # Trace prompts (at most the longest input): 8 more tokens fit in max_model_len.
        prompts = [TokensPrompt(prompt_token_ids=r.prompt[:64]) for r in trace.requests[:2 * len(loras)]]
        start = time.perf_counter()
        self.llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0),
                          lora_request=[loras[i % len(loras)] for i in range(len(prompts))], use_tqdm=False)
        return time.perf_counter() - start

    def measure(self, point: dict, deadline: float, slo_ttft_s: float,
                window_s: float | None = None) -> dict:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        trace = read_trace(point["trace"])
        root = Path(point["adapters_root"])
        folders = {a.name: root / (point["prefix"] + a.name) for a in trace.adapters}
        loras = {name: self.lora(point["prefix"] + name, path) for name, path in folders.items()}
        reqs = trace.requests
        prompts = [TokensPrompt(prompt_token_ids=r.prompt) for r in reqs]
        params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0.0) for r in reqs]
        lora_requests = [loras[r.adapter] if r.adapter else None for r in reqs]

        engine = self.llm.llm_engine
        ttft, latency, out_tokens, status = [], [], 0, "ok"
        start = time.perf_counter()
        wall = time.time() - start  # perf_counter -> the step log's wall clock
        window_end = start + window_s if window_s else float("inf")
        ids = self.llm.enqueue(prompts, params, lora_request=lora_requests, use_tqdm=False)
        last_report, samples = 0.0, []
        while engine.has_unfinished_requests():
            if time.perf_counter() - (samples[-1][0] if samples else -1.0) >= SAMPLE_S:
                samples.append((time.perf_counter(), *queue_sample(self.llm)))
            if time.perf_counter() > window_end:
                engine.abort_request(ids, internal=True)
                status = "window"
                break
            if time.time() > deadline:
                engine.abort_request(ids, internal=True)
                status = "too slow"
                break
            for out in engine.step():
                if out.finished:
                    latency.append(time.perf_counter() - start)
                    out_tokens += len(out.outputs[0].token_ids)
                    ttft.append(out.metrics.first_token_latency if out.metrics is not None else None)
            now = time.perf_counter()
            if now - last_report > 0.5:
                self.events.emit("progress", label=point["label"], done=len(latency))
                last_report = now
        elapsed = time.perf_counter() - start
        samples.append((time.perf_counter(), *queue_sample(self.llm)))
        note = None
        if status == "too slow":
            note = f"stopped at its time share: {len(latency)}/{len(reqs)} finished in {elapsed:.0f} s"
        elif status == "window":
            note = f"fixed {window_s:g} s window: {len(latency)}/{len(reqs)} finished"
        self.events.emit("progress", label=point["label"], done=len(latency))
        result = summarize(requests=len(reqs), elapsed_s=elapsed, ttft=ttft, latency=latency,
                           output_tokens=out_tokens, input_tokens=sum(len(r.prompt) for r in reqs),
                           status=status, slo_ttft_s=slo_ttft_s, note=note) | steady_state(samples)
        window = steady_window(samples)
        if self.step_log and window is not None:
            # The engine core appends its records every half second while it
            # steps: the window's last half second may be missing (a mean).
            t0, t1 = (samples[i][0] + wall for i in window)
            result["steps"] = steplog.summarize(steplog.read(self.step_log), t0, t1, self.graph_max)
        return result


def main(spec_path: str, events_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    events = Events(events_path)
    deadline, points = spec["deadline"], spec["points"]
    if spec.get("step_log"):
        # The engine core's per-step log: set before vLLM or the plugin is
        # imported (its patch reads it once), inherited by the engine's processes.
        os.environ["VLLM_SLORA_STEP_LOG"] = spec["step_log"]
    try:
        if spec["env"].get("VLLM_SLORA") == "1":
            import vllm_slora

            vllm_slora.enable()
        from vllm import LLM

        start = time.perf_counter()
        llm = LLM(**spec["engine_kwargs"])
        start_s = time.perf_counter() - start
        driver = Driver(llm, events, spec.get("step_log"))
        warmup_s = driver.warmup(points[0]["trace"], spec["warmup_adapters"]) if spec["warmup"] else 0.0
        events.emit("ready", start_s=start_s, warmup_s=warmup_s, versions=versions(),
                    device=device_name(), engine=engine_facts(llm))
    except Exception as e:
        events.emit("error", where="start-up", error=error_line(e))
        raise
    for k, point in enumerate(points):
        # An equal share of the time left, but at least min_point_s while there
        # is that much left: the smallest n are the ones measured when short.
        left = deadline - time.time()
        share = max(left / (len(points) - k), spec["min_point_s"])
        if left < spec["min_point_s"]:
            events.emit("point", label=point["label"],
                        result=not_run("skipped", point["requests"], "time budget"))
            continue
        events.emit("point_begin", label=point["label"])
        try:
            result = driver.measure(point, time.time() + share, spec["slo_ttft_s"],
                                    spec.get("window_s"))
            if spec["env"].get("VLLM_SLORA") == "1":
                result["plugin_stats"] = plugin_stats(llm)
        except Exception as e:
            result = not_run("failed", point["requests"], error_line(e))
        events.emit("point", label=point["label"], result=result)
    events.emit("done")
    # The parent ends the engine's processes (run.kill_group): a clean
    # shutdown here would take seconds of the time budget.
    events.f.close()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
