"""vLLM's own client on the plugin and on base: ``vllm bench throughput``, in one run.

    python -m benchmarks.bench_throughput --systems base,slora --ids 1000      # GPU: Llama-2-7B shape
    python -m benchmarks.bench_throughput --arch tiny --enforce-eager \\
        --num-prompts 16 --input-len 16 --output-len 8 --ids 4                 # CPU

Issue 34's cross-check of the harness (``benchmarks.run``): the numbers of a
client we did not write. Each system is one ``vllm bench throughput`` process,
run as a user types it: its random dataset (``--input-len`` /
``--output-len`` tokens, ``ignore_eos``), one PEFT adapter (rank ``--rank`` on
q, k, v, o; random weights) under ``--ids`` LoRA ids (vLLM's client gives
each request a random id in 1..max_loras, so the ids are distinct adapters to
the engine, read from one file), vLLM's default CUDA graphs. The engine
flags the harness gives every system are kept (prefix caching off, dummy
weights; on 0.34 the extensible KV cache off, the plugin's memory budget):

- ``base``: no LoRA flags at all (the upper bound);
- ``slora``: ``--enable-lora --max-loras IDS --lora-path A --plugin vllm_slora``;
- ``stock``: the same without ``--plugin`` (vLLM allocates ``--max-loras``
  GPU slots; at 1,000 it does not start on an 80 GB card, which the table
  then says).

Reported per system (from the client's ``--output-json``): elapsed seconds
of ``LLM.generate`` (the client's own clock: engine start-up excluded),
requests/s, output and total tokens/s, and output tokens/s against base's.
Logs and JSON per system under ``--workdir``; the table and every figure in
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.adapter_pool import make_folders
from benchmarks.run import make_model
from benchmarks.systems import PLUGIN_VARS, Config, configs, engine_kwargs, serve_flags
from benchmarks.workload import TARGETS

# Flags of ``engine_kwargs`` that the client sets itself or that a user's run would not give.
CLIENT_OWN = ("skip_tokenizer_init", "disable_log_stats", "seed")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="llama-2-7b", help="llama-2-7b | llama-2-13b (dummy weights) | tiny (CPU)")
    p.add_argument("--systems", default="base,slora", help="base, slora, stock, in this order")
    p.add_argument("--ids", type=int, default=1000, help="LoRA ids (--max-loras of the client and engine)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=600)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--timeout-s", type=float, default=400.0, help="per system, start-up included")
    p.add_argument("--budget-s", type=float, default=None,
                   help="all systems together: a system gets at most what is left (a device call's limit)")
    p.add_argument("--workdir", default="/tmp/slora-bench-throughput")
    p.add_argument("--out", default=None, help="JSON of every system's figures (default: WORKDIR/result.json)")
    return p.parse_args(argv)


def command(config: Config, args, model: Path, adapter: Path, result: Path) -> list[str]:
    """The ``vllm bench throughput`` command line of one system."""
    kw = engine_kwargs(config, model=str(model), dummy=args.arch != "tiny", max_lora_rank=args.rank,
                       max_cpu_loras=args.ids, slora_max_loras=args.ids,
                       max_model_len=args.max_model_len, eager=args.enforce_eager,
                       extra={"max_num_seqs": args.max_num_seqs})
    for key in CLIENT_OWN + ("max_cpu_loras",):
        kw.pop(key, None)
    flags = serve_flags(kw)[1:]  # serve's positional model becomes --model
    client = ["--model", str(model), "--tokenizer", str(model), "--dataset-name", "random",
              "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
              "--num-prompts", str(args.num_prompts), "--seed", "0", "--output-json", str(result)]
    if config.system != "base":
        client += ["--lora-path", str(adapter)]
    if config.system == "slora":
        flags += ["--plugin", "vllm_slora"]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "throughput", *client, *flags]


def figures(raw: dict, output_len: int) -> dict:
    """The client's ``--output-json`` -> our figures (its keys as vLLM 0.26-0.34 write them)."""
    elapsed, n = raw["elapsed_time"], raw["num_requests"]
    return {"elapsed_s": elapsed, "requests": n, "req_s": raw["requests_per_second"],
            "total_tok_s": raw["tokens_per_second"], "out_tok_s": n * output_len / elapsed}


def run_system(config: Config, args, model: Path, adapter: Path, workdir: Path, timeout_s: float) -> dict:
    result, log = workdir / f"{config.system}.json", workdir / f"{config.system}.log"
    result.unlink(missing_ok=True)
    cmd = command(config, args, model, adapter, result)
    env = {k: v for k, v in os.environ.items() if k not in PLUGIN_VARS + ("VLLM_PLUGINS",)}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB, vLLM's CPU backend only
    if config.system != "slora":
        env |= config.env  # the plugin not loaded at all (VLLM_PLUGINS)
    start = time.time()
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout {timeout_s:.0f} s"
    out = {"system": config.system, "command": shlex.join(cmd[2:]).replace("vllm.entrypoints.cli.main", "vllm", 1),
           "wall_s": time.time() - start, "log": str(log)}
    if rc == 0 and result.exists():
        out |= {"status": "ok"} | figures(json.loads(result.read_text()), args.output_len)
        out["startup_s"] = out["wall_s"] - out["elapsed_s"]  # process, engine start-up, dataset
    else:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-3:]
        out |= {"status": f"failed (rc {rc})", "error": " | ".join(tail)[-400:]}
    return out


def table(rows: list[dict]) -> str:
    base = next((r["out_tok_s"] for r in rows if r["system"] == "base" and r["status"] == "ok"), None)
    lines = ["| system | status | elapsed s | req/s | output tok/s | total tok/s | vs base | start-up s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['system']} | {r['status']}: {r.get('error', '')} | | | | | | |")
            continue
        ratio = f"{r['out_tok_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['system']} | ok | {r['elapsed_s']:.1f} | {r['req_s']:.2f} | {r['out_tok_s']:,.0f} | "
                     f"{r['total_tok_s']:,.0f} | {ratio} | {r['startup_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    from vllm_slora.testing.models import make_word_tokenizer

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model, _ = make_model(workdir / args.arch, args.arch)
    make_word_tokenizer(model, json.loads((model / "config.json").read_text())["vocab_size"])
    adapter = make_folders(workdir / args.arch / "adapters", model, {f"r{args.rank}": args.rank},
                           TARGETS["attn"], pool=1)[f"r{args.rank}"]
    out = Path(args.out or workdir / "result.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget_s if args.budget_s else float("inf")
    rows = []
    for config in configs(args.systems.split(","), [args.ids]):
        left = min(args.timeout_s, deadline - time.time())
        if left < 30:
            rows.append({"system": config.system, "status": "skipped (budget)"})
        else:
            print(f"{config.system}: vllm bench throughput ...", flush=True)
            rows.append(run_system(config, args, model, adapter, workdir, left))
            r = rows[-1]
            print(f"{config.system}: {r['status']}" + (f", {r['out_tok_s']:,.0f} output tok/s"
                                                        if r["status"] == "ok" else f": {r.get('error', '')}"),
                  flush=True)
        # After every system: a run cut short keeps what it measured.
        out.write_text(json.dumps({"args": vars(args), "systems": rows, "table": table(rows)}, indent=2))
    print(table(rows))
    return 0 if all(r["status"] == "ok" for r in rows if r["system"] != "stock") else 1


if __name__ == "__main__":
    sys.exit(main())
