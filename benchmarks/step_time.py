"""Decode step time of base, stock and the plugin at fixed running batches.

    python -m benchmarks.step_time --systems base,stock,slora --batches 64,256 --adapters 5,64

One engine per system (as ``benchmarks.run`` starts them: same settings,
CUDA graphs on unless ``--enforce-eager``), in a child process. For each
(batch B, adapters n) the engine gets B requests at once (short prompts,
long outputs, ``ignore_eos``, request i on adapter i mod n), steps until
every request has produced its first tokens, then times ``--steps`` decode
steps (each ``LLMEngine.step`` returns that step's tokens, so the host clock
covers the GPU work). Reported: median and p90 step time and their ratios
to base's, in the same run. The ``step anatomy`` of a regime: how far the
plugin's decode step is from base's, without prefills mixed in.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.adapter_pool import make_folders
from benchmarks.run import child_pythonpath, make_model
from benchmarks.systems import PLUGIN_VARS, configs, engine_kwargs
from benchmarks.workload import TARGETS

PROMPT_TOKENS = 16


def measure(spec: dict) -> dict:
    """In the child: one engine, every (batch, adapters) case of the spec."""
    if spec["env"].get("VLLM_SLORA") == "1":
        import vllm_slora

        vllm_slora.enable()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    started = time.perf_counter()
    llm = LLM(**spec["engine_kwargs"])
    out = {"start_s": time.perf_counter() - started, "cases": []}
    engine, next_id = llm.llm_engine, 1
    for batch in spec["batches"]:
        for n in spec["adapters"] if spec["lora"] else [0]:
            loras = []
            for i in range(n):
                loras.append(LoRARequest(f"s{next_id}", next_id, spec["folders"][i % len(spec["folders"])]))
                next_id += 1
            prompts = [TokensPrompt(prompt_token_ids=[(7 * i + j) % 500 + 3 for j in range(PROMPT_TOKENS)])
                       for i in range(batch)]
            params = SamplingParams(max_tokens=spec["steps"] + 64, ignore_eos=True, temperature=0.0)
            ids = llm.enqueue(prompts, params, lora_request=[loras[i % n] for i in range(batch)] if n else None,
                              use_tqdm=False)
            for _ in range(32):  # prefills (and adapter loads) done: decode steps from here
                engine.step()
            times = []
            for _ in range(spec["steps"]):
                t = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - t)
            engine.abort_request(ids, internal=True)
            while engine.has_unfinished_requests():
                engine.step()
            times.sort()
            out["cases"].append({"batch": batch, "adapters": n, "median_ms": 1e3 * statistics.median(times),
                                 "p90_ms": 1e3 * times[int(0.9 * (len(times) - 1))], "steps": len(times)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="llama-2-7b")
    p.add_argument("--systems", default="base,stock,slora")
    p.add_argument("--batches", default="64,256")
    p.add_argument("--adapters", default="5,64")
    p.add_argument("--ranks", default="8,16,32,64")
    p.add_argument("--stock-max-loras", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--max-capture-size", type=int, default=256)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/slora-steps"))
    p.add_argument("--out", type=Path, default=Path("step-time.json"))
    args = p.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    batches, ns, ranks = ints(args.batches), ints(args.adapters), ints(args.ranks)
    model, dummy = make_model(args.workdir / args.arch, args.arch)
    folders = make_folders(args.workdir / "adapters", model,
                           {f"a{i}": ranks[i % len(ranks)] for i in range(max(ns))}, TARGETS["attn"], 8)
    pythonpath, _ = child_pythonpath(args.workdir)
    extra = {"max_num_seqs": max(batches)}
    if not args.enforce_eager:
        extra["compilation_config"] = {"max_cudagraph_capture_size": args.max_capture_size}
    results = {"command": "python -m benchmarks.step_time " + " ".join(argv or sys.argv[1:]),
               "systems": []}
    for config in configs(args.systems.split(","), [args.stock_max_loras]):
        kwargs = engine_kwargs(config, model=str(model), dummy=dummy, max_lora_rank=max(ranks),
                               max_cpu_loras=max(ns), slora_max_loras=args.stock_max_loras,
                               max_model_len=PROMPT_TOKENS + args.steps + 128, eager=args.enforce_eager,
                               extra=extra)
        out_file = args.workdir / f"{config.system}-{config.max_loras or 0}.json"
        out_file.unlink(missing_ok=True)
        spec = {"env": config.env, "engine_kwargs": kwargs, "batches": batches, "adapters": ns,
                "lora": config.system != "base", "steps": args.steps, "out": str(out_file),
                "folders": [str(folders[f"a{i}"]) for i in range(max(ns))]}
        env = {k: v for k, v in os.environ.items() if k not in PLUGIN_VARS + ("VLLM_PLUGINS",)}
        env.update(config.env, PYTHONPATH=pythonpath, VLLM_WORKER_MULTIPROC_METHOD="spawn")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        proc = subprocess.run([sys.executable, "-m", "benchmarks.step_time", "--child", json.dumps(spec)],
                              env=env, capture_output=True, text=True, cwd=args.workdir)
        record = {"label": config.label, "system": config.system}
        if out_file.exists():
            record |= json.loads(out_file.read_text())
        else:
            record["error"] = (proc.stdout + proc.stderr)[-3000:]
        results["systems"].append(record)
        print(f"{config.label}: " + ("; ".join(f"B={c['batch']} n={c['adapters']}: {c['median_ms']:.2f} ms"
                                                for c in record.get("cases", [])) or "failed"), flush=True)
    base = next((s for s in results["systems"] if s["system"] == "base" and "cases" in s), None)
    base_ms = {c["batch"]: c["median_ms"] for c in base["cases"]} if base else {}
    print("\n| system | batch | adapters | median ms | p90 ms | vs base |\n|---|---|---|---|---|---|")
    for s in results["systems"]:
        for c in s.get("cases", []):
            vs = f"{c['median_ms'] / base_ms[c['batch']]:.2f}x" if c["batch"] in base_ms else "-"
            print(f"| {s['label']} | {c['batch']} | {c['adapters']} | {c['median_ms']:.2f} | "
                  f"{c['p90_ms']:.2f} | {vs} |")
    args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child_spec = json.loads(sys.argv[2])
        Path(child_spec["out"]).write_text(json.dumps(measure(child_spec)))
        os._exit(0)  # the engine's processes end with this one
    sys.exit(main())
