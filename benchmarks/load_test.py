"""Loopback load test of ``vllm serve --plugin vllm_slora`` (issue 7).

N concurrent streaming completions across M adapters against one server with
a small KV budget (adapters are paged in and out all the time), then the same
requests offline (``vllm.LLM``, S-LoRA mode, greedy) as the reference. The
verdict counts lost requests (no final chunk), errors and outputs that differ
from the reference, token for token.

Both runs ask for the top-2 logprobs of every output token (``--logprobs``),
so each mismatch is explained: the first differing position, the token each
run chose there, and each run's margin (logprob of its top-1 minus its
top-2 candidate). A mismatch is a **near-tie** when the two runs swapped the
same two candidates (each run's runner-up is the other's choice) and both
margins are below ``--tie-threshold`` (default 0.05 nats): greedy decoding
flipped on a near-equal pair, the signature of batch-composition numerics
(different kernels / reduction orders for different batches), not of a
paging bug. Anything else is **clear** (or **unexplained** without
logprobs) and is worth a look.

    python -m benchmarks.load_test --requests 1000 --adapters 500      # GPU (H100)
    python -m benchmarks.load_test --requests 100 --adapters 50        # CPU

Prints one verdict line (and one line per explained mismatch); writes
``load_test.json`` (with ``mismatch_report``) under ``$OUT`` if set.
The tiny random Llama (made here, no download) keeps the test about serving,
not model speed. On CUDA the server runs with ``--enforce-eager`` (the paged
layers do not support CUDA graphs yet). ``tests/serving`` reuses the client
and server helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from vllm_slora.testing.compare import TIE_THRESHOLD, first_divergence
from vllm_slora.testing.runner import EAGER_ENV
from vllm_slora.testing.server import wait_healthy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``vllm serve MODEL --enable-lora --plugin vllm_slora`` in its own process group."""

    def __init__(self, model: str, args: list[str], env: dict | None = None,
                 log: str | Path | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        # The flag sets the mode; the server makes its own metrics folder (one
        # inherited from another engine's run would add that engine's figures).
        full_env = {k: v for k, v in os.environ.items() if k not in ("VLLM_SLORA", "VLLM_SLORA_METRICS_DIR")}
        full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if "--enforce-eager" in args:
            full_env.update(EAGER_ENV)
        full_env.update(env or {})
        self.log_path = Path(log) if log else Path(tempfile.mkstemp(suffix=".log")[1])
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model,
             "--enable-lora", "--plugin", "vllm_slora", "--skip-tokenizer-init",
             "--port", str(self.port), "--host", "127.0.0.1", *args],
            env=full_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, n: int = 6000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_healthy(self, timeout: float = 600) -> float:
        try:
            return wait_healthy(self.proc, self.base, timeout)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"{e}:\n{self.log_tail()}") from e

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def make_requests(names: list[str], n: int, seed: int = 0, lo: int = 5, hi: int = 40,
                  vocab: int = 512) -> list[tuple[list[int], str]]:
    """n (prompt token ids, adapter name), adapters in turn (every adapter used)."""
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))], names[i % len(names)])
            for i in range(n)]




def _token_id(key) -> int:
    """``"token_id:123"`` (``return_tokens_as_token_ids``) or ``"123"`` -> 123."""
    return int(str(key).rsplit(":", 1)[-1])


async def stream_completion(client, base: str, prompt: list[int], model: str,
                            max_tokens: int, logprobs: int | None = None) -> dict:
    """One streaming completion; ``{"token_ids", "finished", "error", "status"}``,
    plus ``top_logprobs`` (per output token ``{token id: logprob}`` of the top
    ``logprobs`` candidates) when ``logprobs`` is set."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    out = {"token_ids": [], "finished": False, "error": None, "status": None}
    if logprobs:
        # Token ids as keys: the server runs --skip-tokenizer-init.
        body |= {"logprobs": logprobs, "return_tokens_as_token_ids": True}
        out["top_logprobs"] = []
    try:
        async with client.stream("POST", base + "/v1/completions", json=body) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                out["error"] = (await r.aread()).decode(errors="replace")
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out["error"] = json.dumps(chunk["error"])
                    continue
                for choice in chunk.get("choices", []):
                    out["token_ids"] += choice.get("token_ids") or []
                    if logprobs:
                        out["top_logprobs"] += [
                            {_token_id(k): v for k, v in (step or {}).items()}
                            for step in (choice.get("logprobs") or {}).get("top_logprobs") or []]
                    if choice.get("finish_reason"):
                        out["finished"] = choice["finish_reason"] in ("length", "stop")
                        if not out["finished"]:
                            out["error"] = f"finish_reason {choice['finish_reason']}"
    except Exception as e:  # connection dropped, timeout: counted as an error
        out["error"] = f"{type(e).__name__}: {e}"
    return out


async def run_load(base: str, requests: list[tuple[list[int], str]], max_tokens: int,
                   timeout: float = 600, logprobs: int | None = None) -> list[dict]:
    """All requests at once, each streaming; results in request order."""
    import httpx

    limits = httpx.Limits(max_connections=len(requests) + 8)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        return await asyncio.gather(*[stream_completion(client, base, p, m, max_tokens, logprobs)
                                      for p, m in requests])


def classify_mismatch(server_tokens: list[int], offline_tokens: list[int],
                      server_top: list[dict] | None = None, offline_top: list[dict] | None = None,
                      threshold: float = TIE_THRESHOLD) -> dict:
    """``vllm_slora.testing.compare.first_divergence`` with server/offline names."""
    d = first_divergence(server_tokens, offline_tokens, server_top, offline_top, threshold)
    names = {"a_token": "server_token", "b_token": "offline_token", "a_margin": "server_margin",
             "b_margin": "offline_margin", "a_runner_up": "server_runner_up",
             "b_runner_up": "offline_runner_up"}
    return {names.get(k, k): v for k, v in d.items()}


def verdict(results: list[dict], reference: list, threshold: float = TIE_THRESHOLD) -> dict:
    """Lost, errors and mismatches of ``results`` against ``reference`` (per
    request: token ids, or a dict with ``token_ids`` and ``top_logprobs`` as
    ``reference_runs`` gives); each mismatch explained by ``classify_mismatch``."""
    refs = [r if isinstance(r, dict) else {"token_ids": r} for r in reference]
    lost = sum(1 for r in results if not r["finished"] and r["error"] is None)
    errors = [r["error"] for r in results if r["error"] is not None]
    mismatches = [i for i, (r, ref) in enumerate(zip(results, refs))
                  if r["error"] is None and r["finished"] and r["token_ids"] != ref["token_ids"]]
    explained = [{"request": i, **classify_mismatch(
        results[i]["token_ids"], refs[i]["token_ids"], results[i].get("top_logprobs"),
        refs[i].get("top_logprobs"), threshold)} for i in mismatches]
    classes = [m["class"] for m in explained]
    return {"requests": len(results), "lost": lost, "errors": len(errors),
            "mismatches": len(mismatches), "first_errors": errors[:3],
            "first_mismatches": mismatches[:5], "tie_threshold": threshold,
            "mismatches_near_tie": classes.count("near-tie"),
            "mismatches_clear": classes.count("clear"),
            "mismatches_unexplained": classes.count("unexplained"),
            "mismatch_report": explained}


def reference_runs(model: str, requests: list[tuple[list[int], str]], paths: dict[str, str],
                   max_tokens: int, llm_kwargs: dict, logprobs: int = 2) -> list[dict]:
    """The same requests offline (``vllm.LLM``, S-LoRA mode, greedy): per
    request ``token_ids`` and, with ``logprobs`` >= 2, ``top_logprobs``
    (per step ``{token id: logprob}``)."""
    from vllm_slora.testing.runner import IN_PROCESS_ENV, Workload, run_workload

    llm_kwargs = dict(llm_kwargs)
    result = run_workload(Workload(
        model=model, plugin="on", max_tokens=max_tokens, logprobs=logprobs,
        requests=[(p, paths[m]) for p, m in requests],
        max_lora_rank=llm_kwargs.pop("max_lora_rank"), max_loras=1, llm_kwargs=llm_kwargs,
        env=IN_PROCESS_ENV))
    return [{"token_ids": o["token_ids"],
             **({"top_logprobs": [{int(t): lp for t, lp in step.items()}
                                  for step in o["top_logprobs"]]} if "top_logprobs" in o else {})}
            for o in result["outputs"]]


def reference_outputs(model: str, requests: list[tuple[list[int], str]], paths: dict[str, str],
                      max_tokens: int, llm_kwargs: dict) -> list[list[int]]:
    """The same requests offline (``vllm.LLM``, S-LoRA mode, greedy): token ids only."""
    return [r["token_ids"] for r in reference_runs(model, requests, paths, max_tokens,
                                                   llm_kwargs, logprobs=0)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--adapters", type=int, default=500)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--num-gpu-blocks", type=int, default=None,
                    help="KV blocks (small: adapters page in and out); default: 3 per running "
                         "sequence on CUDA (16-token blocks), 24 on CPU (128-token blocks)")
    ap.add_argument("--workdir", default=None, help="model and adapters (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logprobs", type=int, default=2,
                    help="top logprobs asked of both runs to explain mismatches (0: off)")
    ap.add_argument("--tie-threshold", type=float, default=TIE_THRESHOLD,
                    help="a mismatch whose two runs swapped their top-2 candidates with both "
                         "margins below this (nats) is a near-tie (batch numerics)")
    args = ap.parse_args(argv)

    import torch

    from vllm_slora.testing.adapters import make_adapters
    from vllm_slora.testing.models import make_tiny_llama

    cuda = torch.cuda.is_available()
    blocks = args.num_gpu_blocks or (3 * args.max_num_seqs + 64 if cuda else 24)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="slora-load-"))
    t0 = time.time()
    model = make_tiny_llama(work / "model", dtype="float32")
    ranks = [(4, 8, 16)[i % 3] for i in range(args.adapters)]
    paths = {p.name: str(p) for p in make_adapters(work / "adapters", model, ranks, seed=args.seed)}
    names = list(paths)
    requests = make_requests(names, args.requests, seed=args.seed)
    engine = dict(max_lora_rank=16, max_num_seqs=args.max_num_seqs, max_model_len=256,
                  num_gpu_blocks_override=blocks, dtype="float32", enforce_eager=True)
    flags = ["--max-lora-rank", "16", "--max-num-seqs", str(args.max_num_seqs),
             "--max-model-len", "256", "--num-gpu-blocks-override", str(blocks),
             "--dtype", "float32", "--enforce-eager", "--max-loras", "1",
             "--lora-modules", *[f"{n}={p}" for n, p in paths.items()]]
    server = Server(str(model), flags)
    try:
        start_s = server.wait_healthy()
        t = time.time()
        results = asyncio.run(run_load(server.base, requests, args.max_tokens,
                                       logprobs=args.logprobs or None))
        load_s = time.time() - t
        with urllib.request.urlopen(server.base + "/metrics", timeout=10) as r:
            scraped = r.read().decode()
    finally:
        server.stop()
    metrics = {line.split()[0]: float(line.split()[1]) for line in scraped.splitlines()
               if line.startswith("vllm_slora:") and len(line.split()) == 2}
    t = time.time()
    reference = reference_runs(str(model), requests, paths, args.max_tokens, engine,
                               logprobs=args.logprobs)
    report = verdict(results, reference, args.tie_threshold) | {
        "adapters": args.adapters, "device": "cuda" if cuda else "cpu", "kv_blocks": blocks,
        "server_start_s": round(start_s, 1), "load_s": round(load_s, 1),
        "reference_s": round(time.time() - t, 1), "total_s": round(time.time() - t0, 1),
        "metrics": metrics}
    ok = report["lost"] == report["errors"] == report["mismatches"] == 0
    print(f"load test {'PASS' if ok else 'FAIL'}: {report['requests']} streaming requests, "
          f"{args.adapters} adapters, {blocks} KV blocks: lost {report['lost']}, errors "
          f"{report['errors']}, mismatches {report['mismatches']}; load {report['load_s']} s, "
          f"adapter loads {metrics.get('vllm_slora:adapter_loads_total', 0):.0f}, evictions "
          f"{metrics.get('vllm_slora:adapter_evictions_total', 0):.0f}, total {report['total_s']} s")
    if report["mismatches"]:
        print(f"mismatches: {report['mismatches_near_tie']} near-tie (top-2 swapped, both margins "
              f"< {args.tie_threshold} nats), {report['mismatches_clear']} clear, "
              f"{report['mismatches_unexplained']} unexplained (no logprobs)")
        for m in report["mismatch_report"]:
            print(f"  request {m['request']}: first difference at output token {m['position']}: "
                  f"server {m['server_token']} (margin {m['server_margin']}, runner-up "
                  f"{m['server_runner_up']}), offline {m['offline_token']} (margin "
                  f"{m['offline_margin']}, runner-up {m['offline_runner_up']}): {m['class']}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        Path(os.environ["OUT"], "load_test.json").write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
