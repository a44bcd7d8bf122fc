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

``--mixed P``: every timed step also prefills one new request of P prompt
tokens (one token out, so it leaves after that step): B decodes + P
prefill tokens, the mixed steps of a steady workload. Above the largest
CUDA graph they run without graphs (the paged op eagerly, its launches
replayed: ``kernels/replay.py``). The headline on vLLM 0.34 put most of
the plugin's extra time at 5 adapters around such steps (about 10 ms each
against 2-6 ms that the kernel benchmark gives their LoRA), but its step
log cannot say which GPU work it is;
``benchmarks/results/gpu-vllm-0.34-2026-12-06.md``.

``--profile K``: after the timed steps, K more decode steps run under the
torch profiler (CUDA activity only; the engine core then runs in the
child's process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the profiler sees
its kernels, CUDA-graph replays included). Per step: GPU busy time (sum of
kernel times), its LoRA share (kernels of the plugin or of vLLM's punica
ops), the host gap (step time minus GPU busy time) and the top kernels.
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
# Kernels counted as LoRA work: the plugin's (kernels/shrink.py, expand.py, grouping.py) and
# stock vLLM's punica Triton ops (vllm/lora/ops/triton_ops).
LORA_KERNELS = ("_shrink_kernel", "_expand_kernel", "_reduce_kernel", "_group_by_adapter_kernel",
                "lora", "mbgmv", "sgmv", "bgmv")


def is_lora_kernel(name: str) -> bool:
    low = name.lower()
    return any(k in low for k in LORA_KERNELS)


def kernel_anatomy(kernels: dict[str, tuple[float, int]], steps: int, step_ms: float) -> dict:
    """Per-step figures from {kernel name: (total us, calls)} over ``steps`` steps."""
    busy = sum(us for us, _ in kernels.values()) / 1e3 / steps
    lora = sum(us for name, (us, _) in kernels.items() if is_lora_kernel(name)) / 1e3 / steps
    lora_calls = sum(n for name, (_, n) in kernels.items() if is_lora_kernel(name)) / steps
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:10]
    return {"gpu_busy_ms": busy, "lora_ms": lora, "lora_launches": lora_calls,
            "host_gap_ms": max(step_ms - busy, 0.0),
            "top": [{"kernel": k[:120], "ms_per_step": us / 1e3 / steps, "calls_per_step": n / steps}
                    for k, (us, n) in top]}


def mixed_step(llm, engine, prompt_tokens: int, loras: list):
    """A step function: one new request of ``prompt_tokens`` tokens (one
    token out), then ``engine.step()``, which prefills it beside the running
    decodes. The new requests take the case's adapters in turn."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
    count = [0]

    def step():
        k = count[0] = count[0] + 1
        prompt = TokensPrompt(prompt_token_ids=[(11 * k + j) % 500 + 3 for j in range(prompt_tokens)])
        llm.enqueue([prompt], params, lora_request=[loras[k % len(loras)]] if loras else None,
                    use_tqdm=False)
        return engine.step()

    return step


def profile_steps(step, steps: int, step_ms: float) -> dict:
    """``steps`` calls of ``step`` (``engine.step`` or a ``mixed_step``) under the profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()  # on CPU (dry runs): the ops' self CPU time instead
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    kernels: dict[str, tuple[float, int]] = {}
    for e in prof.key_averages():
        us = (getattr(e, "self_device_time_total", 0) or getattr(e, "device_time_total", 0)) if cuda \
            else e.self_cpu_time_total
        if us > 0:
            kernels[e.key] = (us, e.count)
    return kernel_anatomy(kernels, steps, step_ms)


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
            params = SamplingParams(max_tokens=spec["steps"] + spec.get("profile", 0) + 64, ignore_eos=True,
                                    temperature=0.0)
            ids = llm.enqueue(prompts, params, lora_request=[loras[i % n] for i in range(batch)] if n else None,
                              use_tqdm=False)
            for _ in range(32):  # prefills (and adapter loads) done: decode steps from here
                engine.step()
            step = engine.step
            if spec.get("mixed"):
                step = mixed_step(llm, engine, spec["mixed"], loras)
            times = []
            for _ in range(spec["steps"]):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            case = {"batch": batch, "adapters": n, "prefill": spec.get("mixed", 0),
                    "median_ms": 1e3 * statistics.median(times),
                    "p90_ms": 1e3 * sorted(times)[int(0.9 * (len(times) - 1))], "steps": len(times)}
            if spec.get("profile"):
                case["anatomy"] = profile_steps(step, spec["profile"], case["median_ms"])
            out["cases"].append(case)
            Path(spec["out"]).write_text(json.dumps(out))  # a timeout keeps the cases done
            engine.abort_request(ids, internal=True)
            while engine.has_unfinished_requests():
                engine.step()
    return out


def table(systems: list[dict], base_ms: dict[int, float]) -> str:
    """Markdown: step times, ratio to base's, and the anatomy where profiled."""
    lines = ["| system | batch | adapters | median ms | p90 ms | vs base | GPU busy ms | LoRA ms "
             "| LoRA launches | host gap ms |", "|---" * 10 + "|"]
    for s in systems:
        for c in s.get("cases", []):
            vs = f"{c['median_ms'] / base_ms[c['batch']]:.2f}x" if c["batch"] in base_ms else "-"
            a = c.get("anatomy")
            prof = (f"{a['gpu_busy_ms']:.2f} | {a['lora_ms']:.2f} | {a['lora_launches']:.0f} | "
                    f"{a['host_gap_ms']:.2f}") if a else "- | - | - | -"
            size = f"{c['batch']}+{c['prefill']}" if c.get("prefill") else c["batch"]
            lines.append(f"| {s['label']} | {size} | {c['adapters']} | {c['median_ms']:.2f} | "
                         f"{c['p90_ms']:.2f} | {vs} | {prof} |")
    for s in systems:
        for c in s.get("cases", []):
            for k in (c.get("anatomy") or {}).get("top", [])[:6]:
                lines.append(f"    {s['label']} B={c['batch']} n={c['adapters']}: {k['ms_per_step']:.3f} ms "
                             f"x{k['calls_per_step']:.0f} {k['kernel'][:90]}")
    return "\n".join(lines)


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
    p.add_argument("--capture-sizes", default="",
                   help="CUDA-graph capture sizes, e.g. 64,256 (default: vLLM's, up to --max-capture-size); "
                        "the same for every system")
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="profile K more decode steps per case: LoRA GPU time, host gap, top kernels")
    p.add_argument("--mixed", type=int, default=0, metavar="P",
                   help="each timed step also prefills a new request of P prompt tokens (mixed steps)")
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
    # A mixed step holds B running requests and the one it prefills.
    extra = {"max_num_seqs": max(batches) + (1 if args.mixed else 0)}
    if not args.enforce_eager:
        extra["compilation_config"] = (
            {"cudagraph_capture_sizes": ints(args.capture_sizes)} if args.capture_sizes
            else {"max_cudagraph_capture_size": args.max_capture_size})
    results = {"command": "python -m benchmarks.step_time " + " ".join(argv or sys.argv[1:]),
               "systems": []}
    for config in configs(args.systems.split(","), [args.stock_max_loras]):
        kwargs = engine_kwargs(config, model=str(model), dummy=dummy, max_lora_rank=max(ranks),
                               max_cpu_loras=max(ns), slora_max_loras=args.stock_max_loras,
                               max_model_len=max(PROMPT_TOKENS + args.steps + args.profile, args.mixed) + 128,
                               eager=args.enforce_eager,
                               extra=extra)
        out_file = args.workdir / f"{config.system}-{config.max_loras or 0}.json"
        out_file.unlink(missing_ok=True)
        spec = {"env": config.env, "engine_kwargs": kwargs, "batches": batches, "adapters": ns,
                "lora": config.system != "base", "steps": args.steps, "profile": args.profile,
                "mixed": args.mixed,
                "out": str(out_file),
                "folders": [str(folders[f"a{i}"]) for i in range(max(ns))]}
        env = {k: v for k, v in os.environ.items() if k not in PLUGIN_VARS + ("VLLM_PLUGINS",)}
        env.update(config.env, PYTHONPATH=pythonpath, VLLM_WORKER_MULTIPROC_METHOD="spawn")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        if args.profile:  # the profiler sees the engine core's kernels only in its process
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        proc = subprocess.run([sys.executable, "-m", "benchmarks.step_time", "--child", json.dumps(spec)],
                              env=env, capture_output=True, text=True, cwd=args.workdir)
        record = {"label": config.label, "system": config.system}
        if out_file.exists():
            record |= json.loads(out_file.read_text())
        else:
            record["error"] = (proc.stdout + proc.stderr)[-3000:]
        results["systems"].append(record)
        args.out.write_text(json.dumps(results, indent=1))  # what is measured survives a timeout
        print(f"{config.label}: " + ("; ".join(f"B={c['batch']} n={c['adapters']}: {c['median_ms']:.2f} ms"
                                                for c in record.get("cases", [])) or "failed"), flush=True)
    base = next((s for s in results["systems"] if s["system"] == "base" and "cases" in s), None)
    base_ms = {c["batch"]: c["median_ms"] for c in base["cases"]} if base else {}
    print(table(results["systems"], base_ms))
    args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child_spec = json.loads(sys.argv[2])
        Path(child_spec["out"]).write_text(json.dumps(measure(child_spec)))
        os._exit(0)  # the engine's processes end with this one
    sys.exit(main())
