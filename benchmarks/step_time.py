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

``--replay-launch triton,direct,...``: the plugin's cases are timed once per
entry, in one engine (in this process), with the eager path's replayed
LoRA launches made that way (``kernels/replay.py``): a before/after of the
launch path without two engine starts.

``--profile K``: once every case is timed, each case runs again (fresh
requests) and K of its steps run under the torch profiler (CPU and CUDA
activity; the engine core then runs in the child's process,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the profiler sees its kernels,
CUDA-graph replays included). Per step: GPU busy time (sum of kernel
times), its LoRA share (kernels of the plugin or of vLLM's punica ops), the
host gap (step time minus GPU busy time), the top kernels and the host's
heaviest CPU ops (inclusive); ``--trace-dir`` keeps each case's Chrome
trace. Profiles come after all timing because the profiler leaves the
engine slower for the rest of its process (on the H100, decode steps of
13 ms took 23 ms after one profile). ``--stacks K`` likewise: K steps with
the engine thread's Python stacks sampled (where the host's time goes).

With ``--mixed`` the steps alternate: a mixed step, then a decode-only one
(the prefilled request leaves the batch a step later, so the next new one
waits a step). The median of the two kinds means little: ``slow half ms``
(the median of the slower half of the steps) is the mixed steps' time.
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


def host_ops(ops: dict[str, tuple[float, int]], steps: int, top: int = 15) -> list[dict]:
    """The engine thread's heaviest CPU ops per step, from {op: (inclusive us, calls)}:
    what the host does in a step (nested ops count in their parents too)."""
    rows = sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"op": k[:120], "ms_per_step": us / 1e3 / steps, "calls_per_step": n / steps}
            for k, (us, n) in rows]


def sample_stacks(step, steps: int, interval_s: float = 0.0005, top: int = 40) -> dict:
    """``steps`` calls of ``step`` while a thread samples this thread's Python
    stack every ``interval_s``: per function (file:name), the share of samples
    it is on the stack (inclusive) and on top (leaf), as ms per step. A wait
    inside a C call (the GPU, a lock) shows as the Python line that made it.
    A sample needs the GIL: pure Python that holds it is seen only at the
    interpreter's switch interval (the engine's thread lets it go at every
    launch and wait). Costs this thread a GIL hand-over per sample: not for
    timing."""
    import threading

    main = threading.get_ident()
    inclusive: dict[str, int] = {}
    leaf: dict[str, int] = {}
    samples = [0]
    done = threading.Event()

    def run():
        while not done.wait(interval_s):
            frame = sys._current_frames().get(main)
            seen = set()
            first = True
            while frame is not None:
                code = frame.f_code
                name = f"{os.path.basename(code.co_filename)}:{code.co_name}"
                if first:
                    leaf[name] = leaf.get(name, 0) + 1
                    first = False
                if name not in seen:
                    seen.add(name)
                    inclusive[name] = inclusive.get(name, 0) + 1
                frame = frame.f_back
            del frame
            samples[0] += 1

    sampler = threading.Thread(target=run, daemon=True)
    started = time.perf_counter()
    sampler.start()
    for _ in range(steps):
        step()
    done.set()
    sampler.join()
    ms = 1e3 * (time.perf_counter() - started) / steps
    n = max(samples[0], 1)

    def rows(counts):
        return [{"fn": k, "ms_per_step": ms * c / n, "share": c / n}
                for k, c in sorted(counts.items(), key=lambda kv: -kv[1])[:top]]

    return {"step_ms": ms, "samples": samples[0], "inclusive": rows(inclusive), "leaf": rows(leaf)}


def profile_steps(step, steps: int, step_ms: float, trace: Path | None = None) -> dict:
    """``steps`` calls of ``step`` (``engine.step`` or a ``mixed_step``) under the
    profiler: kernels (GPU time) and CPU ops (the host's time, inclusive);
    ``trace``: also a Chrome trace there (gzipped), to read the timeline."""
    import gzip
    import shutil

    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()  # on CPU (dry runs): the ops' self CPU time as kernels
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    kernels: dict[str, tuple[float, int]] = {}
    ops: dict[str, tuple[float, int]] = {}
    for e in prof.key_averages():
        device_us = getattr(e, "self_device_time_total", 0) or getattr(e, "device_time_total", 0)
        us = device_us if cuda else e.self_cpu_time_total
        if us > 0 and (not cuda or e.cpu_time_total == 0):
            kernels[e.key] = (us, e.count)  # on CUDA: kernels (device events have no CPU time)
        if e.cpu_time_total > 0:
            ops[e.key] = (e.cpu_time_total, e.count)
    out = kernel_anatomy(kernels, steps, step_ms)
    out["host_ops"] = host_ops(ops, steps)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        raw = trace.with_suffix("")  # x.json.gz -> x.json
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    return out


def steps_per_request(spec: dict) -> int:
    """Decode steps a case's requests must last: every launch variant's timed,
    sampled and profiled steps."""
    variants = max(len(spec.get("launches") or []), 1)
    return variants * (spec["steps"] + spec.get("profile", 0) + spec.get("stacks", 0))


def step_stats(times: list[float]) -> dict:
    """Step-time figures (ms) of ``times`` (s). With ``--mixed`` the steps
    alternate between mixed ones and decode-only ones (the request prefilled
    leaves the running batch a step later, so the next one waits a step):
    ``slow_half_ms``, the median of the slower half, is the mixed steps'."""
    ms = sorted(1e3 * t for t in times)
    return {"median_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))],
            "mean_ms": statistics.fmean(ms), "slow_half_ms": statistics.median(ms[len(ms) // 2:]),
            "fast_half_ms": statistics.median(ms[:max(len(ms) // 2, 1)]), "steps": len(ms),
            "times_ms": [round(1e3 * t, 3) for t in times]}


def time_case(step, spec: dict) -> dict:
    """One case's ``spec["steps"]`` timed steps."""
    times = []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return step_stats(times)


def inspect_case(step, spec: dict, case: dict, name: str) -> None:
    """Stacks and profile of a case, added to ``case`` (after every case was timed)."""
    if spec.get("stacks"):
        case["stacks"] = sample_stacks(step, spec["stacks"])
    if spec.get("profile"):
        trace = Path(spec["trace_dir"]) / f"{name}.json.gz" if spec.get("trace_dir") else None
        case["anatomy"] = profile_steps(step, spec["profile"], case["median_ms"], trace)


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
    launches = (spec.get("launches") or [None]) if spec["lora"] else [None]
    # Every case is timed before any is sampled or profiled: the profiler
    # (CPU activity) leaves the engine slower for the rest of the process
    # (decode steps of 13 ms took 23 ms after one profile, H100).
    passes = ["time"] + (["inspect"] if spec.get("stacks") or spec.get("profile") else [])
    for mode in passes:
        index = 0
        for batch in spec["batches"]:
            for n in spec["adapters"] if spec["lora"] else [0]:
                loras = []
                for i in range(n):
                    loras.append(LoRARequest(f"s{next_id}", next_id, spec["folders"][i % len(spec["folders"])]))
                    next_id += 1
                prompts = [TokensPrompt(prompt_token_ids=[(7 * i + j) % 500 + 3 for j in range(PROMPT_TOKENS)])
                           for i in range(batch)]
                params = SamplingParams(max_tokens=steps_per_request(spec) + 64, ignore_eos=True,
                                        temperature=0.0)
                ids = llm.enqueue(prompts, params,
                                  lora_request=[loras[i % n] for i in range(batch)] if n else None,
                                  use_tqdm=False)
                for _ in range(32):  # prefills (and adapter loads) done: decode steps from here
                    engine.step()
                step = engine.step
                if spec.get("mixed"):
                    step = mixed_step(llm, engine, spec["mixed"], loras)
                for launch in launches:
                    if launch is not None:  # the replays' launch path, in this process's engine
                        from vllm_slora.kernels import replay

                        replay.LAUNCH = launch
                    if mode == "time":
                        case = {"batch": batch, "adapters": n, "prefill": spec.get("mixed", 0),
                                "launch": launch} | time_case(step, spec)
                        out["cases"].append(case)
                    else:
                        inspect_case(step, spec, out["cases"][index],
                                     f"{spec['label']}-b{batch}-n{n}-{index}")
                    index += 1
                    Path(spec["out"]).write_text(json.dumps(out))  # a timeout keeps the cases done
                engine.abort_request(ids, internal=True)
                while engine.has_unfinished_requests():
                    engine.step()
    return out


def table(systems: list[dict], base_ms: dict[int, float]) -> str:
    """Markdown: step times, ratio to base's, and the anatomy where profiled."""
    lines = ["| system | batch | adapters | median ms | p90 ms | vs base | mean ms | slow half ms "
             "| GPU busy ms | LoRA ms | LoRA launches | host gap ms |", "|---" * 12 + "|"]
    for s in systems:
        for c in s.get("cases", []):
            vs = f"{c['median_ms'] / base_ms[c['batch']]:.2f}x" if c["batch"] in base_ms else "-"
            a = c.get("anatomy")
            prof = (f"{a['gpu_busy_ms']:.2f} | {a['lora_ms']:.2f} | {a['lora_launches']:.0f} | "
                    f"{a['host_gap_ms']:.2f}") if a else "- | - | - | -"
            size = f"{c['batch']}+{c['prefill']}" if c.get("prefill") else c["batch"]
            label = s["label"] + (f" [{c['launch']}]" if c.get("launch") else "")
            halves = (f"{c['mean_ms']:.2f} | {c['slow_half_ms']:.2f}" if "mean_ms" in c else "- | -")
            lines.append(f"| {label} | {size} | {c['adapters']} | {c['median_ms']:.2f} | "
                         f"{c['p90_ms']:.2f} | {vs} | {halves} | {prof} |")
    for s in systems:
        for c in s.get("cases", []):
            for k in (c.get("anatomy") or {}).get("top", [])[:6]:
                lines.append(f"    {s['label']} B={c['batch']} n={c['adapters']}: {k['ms_per_step']:.3f} ms "
                             f"x{k['calls_per_step']:.0f} {k['kernel'][:90]}")
            st = c.get("stacks")
            for k in (st or {}).get("inclusive", [])[:40]:
                lines.append(f"    stack {s['label']} B={c['batch']} n={c['adapters']}: {k['ms_per_step']:.2f} ms "
                             f"({100 * k['share']:.0f}%) {k['fn'][:90]}")
            for k in (c.get("anatomy") or {}).get("host_ops", [])[:10]:
                lines.append(f"    host {s['label']} B={c['batch']} n={c['adapters']}: {k['ms_per_step']:.3f} ms "
                             f"x{k['calls_per_step']:.0f} {k['op'][:90]}")
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
                   help="once all cases are timed, profile K steps of each: LoRA GPU time, host gap, "
                        "top kernels, host CPU ops")
    p.add_argument("--mixed", type=int, default=0, metavar="P",
                   help="each timed step also prefills a new request of P prompt tokens (mixed steps)")
    p.add_argument("--stacks", type=int, default=0, metavar="K",
                   help="K more steps per case with the engine thread's Python stacks sampled "
                        "(where the host's time goes; in-process engine)")
    p.add_argument("--replay-launch", default="",
                   help="the plugin's eager replays launched each way in turn, in one engine, "
                        "e.g. triton,direct,triton,direct (kernels/replay.py's LAUNCH; in-process engine)")
    p.add_argument("--trace-dir", type=Path, default=None,
                   help="with --profile: a Chrome trace of each case's profiled steps there (.json.gz)")
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
    launches = [v for v in args.replay_launch.split(",") if v]
    if set(launches) - {"direct", "triton"}:
        p.error(f"--replay-launch takes direct and triton, got {args.replay_launch!r}")
    spec_steps = {"steps": args.steps, "profile": args.profile, "stacks": args.stacks, "launches": launches}
    for config in configs(args.systems.split(","), [args.stock_max_loras]):
        kwargs = engine_kwargs(config, model=str(model), dummy=dummy, max_lora_rank=max(ranks),
                               max_cpu_loras=max(ns), slora_max_loras=args.stock_max_loras,
                               max_model_len=max(PROMPT_TOKENS + steps_per_request(spec_steps), args.mixed)
                               + 128,
                               eager=args.enforce_eager,
                               extra=extra)
        out_file = args.workdir / f"{config.system}-{config.max_loras or 0}.json"
        out_file.unlink(missing_ok=True)
        spec = {"env": config.env, "engine_kwargs": kwargs, "batches": batches, "adapters": ns,
                "lora": config.system != "base", "steps": args.steps, "profile": args.profile, "stacks": args.stacks,
                "launches": launches,
                "mixed": args.mixed, "label": config.label,
                "trace_dir": str(args.trace_dir) if args.trace_dir else "",
                "out": str(out_file),
                "folders": [str(folders[f"a{i}"]) for i in range(max(ns))]}
        env = {k: v for k, v in os.environ.items() if k not in PLUGIN_VARS + ("VLLM_PLUGINS",)}
        env.update(config.env, PYTHONPATH=pythonpath, VLLM_WORKER_MULTIPROC_METHOD="spawn")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        if args.profile or args.stacks or args.replay_launch:  # the engine core in this process
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
