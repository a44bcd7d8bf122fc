"""Early adapter loads under KV pressure, on CPU: how many page-ins the
scheduler makes ahead of admission, how many of those go to waste, and how
many requests vLLM preempts, for values of the prefetch knobs.

    python -m benchmarks.prefetch --adapters 300 --blocks 100 --max-num-seqs 16
    python -m benchmarks.prefetch --head-ahead 0,2      # the next admissions' early loads off, on

Counts, not times: the knobs decide *whether* an adapter's upload can
overlap earlier steps (``loaded_ahead``) or holds up its request's first
step; a GPU run says what that is worth. One engine per setting, each in
a process of its own (the scheduler's constants set before it starts), the
tiny random Llama, one adapter per request, more requests than
``--max-num-seqs`` so that they wait, and few KV blocks so that the pool
is full (vLLM 0.32+ on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path


def run(model: Path, folders: list[Path], keep_free: float, head_ahead: int, args) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    import vllm_slora
    from vllm_slora.patches import vllm_v1_core_sched_scheduler as sched_patch

    vllm_slora.enable()
    sched_patch.KEEP_FREE, sched_patch.HEAD_AHEAD = keep_free, head_ahead
    llm = LLM(model=str(model), dtype="float32", enable_lora=True, max_loras=1,
              max_lora_rank=8, max_num_seqs=args.max_num_seqs, max_model_len=256,
              num_gpu_blocks_override=args.blocks, enable_prefix_caching=False,
              skip_tokenizer_init=True, gpu_memory_utilization=0.3)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    preempted = [0]
    stock_preempt = scheduler._preempt_request

    def counting_preempt(*a, **kw):
        preempted[0] += 1
        return stock_preempt(*a, **kw)

    scheduler._preempt_request = counting_preempt
    pool = scheduler.kv_cache_manager.adapters
    calls = [0]
    stock_load_ahead = pool.load_ahead

    def counting_load_ahead(*a, **kw):  # skipped in steps that preempted (evicted: the heads only)
        calls[0] += 1
        return stock_load_ahead(*a, **kw)

    pool.load_ahead = counting_load_ahead
    rng = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(3, 500) for _ in range(rng.randint(20, 60))])
               for _ in folders]
    loras = [LoRARequest(f"a{i}", i + 1, str(f)) for i, f in enumerate(folders)]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0.0)
    llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    stats = scheduler.kv_cache_manager.adapters.stats()
    out = {k: stats[k] for k in ("loads", "loaded_ahead", "ahead_wasted", "evictions", "reloads")}
    out.update(preempted=preempted[0], keep_free=keep_free, head_ahead=head_ahead, steps=stats["schedules"],
               load_ahead_calls=calls[0])
    del llm
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep-free", default="0.25", help="KEEP_FREE values, one engine each, e.g. 0.25,0.02")
    p.add_argument("--head-ahead", default="2",
                   help="HEAD_AHEAD values (the next admissions' adapters loaded early with only "
                        "vLLM's watermark free; 0: off), one engine per pair with --keep-free")
    p.add_argument("--adapters", type=int, default=300, help="adapters = requests")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--blocks", type=int, default=160, help="KV blocks (num_gpu_blocks_override)")
    p.add_argument("--setting", help=argparse.SUPPRESS)  # one engine, in a child process
    args = p.parse_args()
    from vllm_slora.testing.adapters import make_adapters
    from vllm_slora.testing.models import make_tiny_llama

    root = Path(os.environ.get("SLORA_AHEAD_DIR") or tempfile.mkdtemp(prefix="slora-ahead-"))
    model = root / "model"
    if not (model / "model.safetensors").exists():
        make_tiny_llama(model)
    folders = sorted((root / "adapters").glob("*")) or make_adapters(root / "adapters", model, [8] * args.adapters, seed=3)
    folders = folders[:args.adapters]
    if args.setting:
        keep_free, head_ahead = args.setting.split(":")
        print("RESULT " + json.dumps(run(model, folders, float(keep_free), int(head_ahead), args)), flush=True)
        return
    import subprocess
    import sys

    settings = [(float(k), int(h)) for k in args.keep_free.split(",") for h in args.head_ahead.split(",")]
    env = dict(os.environ, SLORA_AHEAD_DIR=str(root), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    print("| KEEP_FREE | HEAD_AHEAD | steps | early-load calls | loads | loaded ahead | ahead, evicted unused "
          "| evictions | reloads | preempted |\n|---|---|---|---|---|---|---|---|---|---|")
    for keep_free, head_ahead in settings:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--setting", f"{keep_free}:{head_ahead}"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"| {keep_free} | {head_ahead} | failed: {proc.stderr[-300:]!r} |")
            continue
        r = json.loads(line[7:])
        print(f"| {keep_free} | {head_ahead} | {r['steps']} | {r['load_ahead_calls']} | {r['loads']} | {r['loaded_ahead']} | "
              f"{r['ahead_wasted']} | {r['evictions']} | {r['reloads']} | {r['preempted']} |", flush=True)


if __name__ == "__main__":
    main()
