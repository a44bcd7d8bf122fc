"""The scheduler's host time per step, the plugin's against base's, on CPU.

    python -m benchmarks.sched_profile --adapters 2000 --requests 3000
    python -m benchmarks.sched_profile --target execute_model --adapters 5   # the worker's step

One engine per system (``slora``: the plugin with one adapter per request,
adapters in turn; ``base``: no LoRA), in this process (the engine core
too, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), the tiny random Llama, enforce
eager; every ``Scheduler.schedule`` call timed and run under cProfile.
Prints schedule ms per step (mean, p50, p90) and the top functions by
cumulative time. The scheduler is host code: its costs on this machine
point at the engine thread's on the GPU one (issue 34: +4 ms a step at
2,000 adapters), though cProfile inflates Python calls (compare the two
systems, not absolute times).

``--target execute_model`` times and profiles the executor's
``execute_model`` instead (the worker runs in this process too): the
runner's per-step work, the plugin's batch set-up among it (issue 34: the
engine thread's CPU per decode step, 1.4x base's at 5 adapters as at
2,000, so per step, not per adapter). On CPU the model and the LoRA
compute run eagerly in it as well: read the plugin's own functions
(``set_active_adapters``, ``set_batch``, the op's Python) against the step.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import sys
import time
from pathlib import Path


def run(system: str, args) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from benchmarks.adapter_pool import make_folders
    from benchmarks.run import make_model
    from benchmarks.workload import TARGETS

    model, _ = make_model(args.workdir / "tiny", "tiny")
    folders = make_folders(args.workdir / "adapters", model,
                           {f"a{i}": 8 for i in range(args.adapters)}, TARGETS["attn"], 8)
    if system == "slora":
        import vllm_slora

        vllm_slora.enable()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    kwargs = dict(model=str(model), dtype="float32", max_num_seqs=args.max_num_seqs, max_model_len=512,
                  enable_prefix_caching=False, skip_tokenizer_init=True, gpu_memory_utilization=0.3,
                  enforce_eager=True)
    if system == "slora":
        kwargs.update(enable_lora=True, max_loras=args.max_num_seqs, max_lora_rank=8,
                      max_cpu_loras=max(args.adapters, args.max_num_seqs))
    llm = LLM(**kwargs)
    core = llm.llm_engine.engine_core.engine_core
    owner = core.scheduler if args.target == "schedule" else core.model_executor
    prof, times = cProfile.Profile(), []
    stock = getattr(owner, args.target)

    def timed(*a, **kw):
        t = time.perf_counter()
        if args.cprofile:
            prof.enable()
        try:
            return stock(*a, **kw)
        finally:
            if args.cprofile:
                prof.disable()
            times.append(time.perf_counter() - t)

    setattr(owner, args.target, timed)
    rng = random.Random(0)
    n = args.requests
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(3, 500) for _ in range(rng.randint(20, 60))])
               for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randint(20, 80), ignore_eos=True) for _ in range(n)]
    loras = None
    if system == "slora":
        loras = [LoRARequest(f"a{i % args.adapters}", i % args.adapters + 1,
                             str(folders[f"a{i % args.adapters}"])) for i in range(n)]
    llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    ms = sorted(1e3 * t for t in times)
    text = io.StringIO()
    if args.cprofile:
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(args.top)
    return {"system": system, "target": args.target, "steps": len(ms), "ms_mean": sum(ms) / len(ms),
            "ms_p50": ms[len(ms) // 2], "ms_p90": ms[int(0.9 * (len(ms) - 1))],
            "profile": text.getvalue()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system", choices=("slora", "base"), default=None,
                   help="one system in this process (default: both, each in a child process)")
    p.add_argument("--adapters", type=int, default=2000)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--target", choices=("schedule", "execute_model"), default="schedule",
                   help="what is timed and profiled: the scheduler's or the executor's step")
    p.add_argument("--no-cprofile", dest="cprofile", action="store_false",
                   help="time only (cProfile inflates Python calls several times)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/slora-sched"))
    p.add_argument("--out", type=Path, default=None, help="JSON of both systems' figures")
    args = p.parse_args(argv)
    if args.system:
        print(json.dumps(run(args.system, args)))
        return 0
    import subprocess

    results = []
    for system in ("slora", "base"):
        cmd = [sys.executable, "-m", "benchmarks.sched_profile", "--system", system,
               "--adapters", str(args.adapters), "--requests", str(args.requests),
               "--max-num-seqs", str(args.max_num_seqs), "--top", str(args.top), "--target", args.target,
               "--workdir", str(args.workdir)] + ([] if args.cprofile else ["--no-cprofile"])
        # Each system sets S-LoRA mode itself (a VLLM_SLORA=1 from outside would turn base into it).
        env = {k: v for k, v in os.environ.items() if k != "VLLM_SLORA"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if not lines:
            print(f"{system}: failed\n{(proc.stdout + proc.stderr)[-3000:]}")
            return 1
        results.append(json.loads(lines[-1]))
    for r in results:
        print(f"## {r['system']}: {r['target']} {r['ms_mean']:.2f} ms a step (p50 "
              f"{r['ms_p50']:.2f}, p90 {r['ms_p90']:.2f}) over {r['steps']} steps")
        print(r["profile"])
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
