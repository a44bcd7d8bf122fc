"""Where the engine's thread spends its time: the step log's stack samples.

    VLLM_SLORA_STEP_STACKS=1 python -m benchmarks.run ...   # writes logs/<engine>.steps.jsonl.stacks
    python -m benchmarks.stacks RUN_DIR/logs/slora.steps.jsonl.stacks [--from T0 --to T1 | --events
        RUN_DIR/logs/slora.events.jsonl] [--top 25] [--slow]

Each sample is the engine thread's Python stack (leaf first; a wait inside a
C call shows as the Python line that made it). Printed: the share of samples
in which each function appears (inclusive) and the share of each leaf line
(where the thread was: running Python there or waiting in the C call it
made), over the samples written between T0 and T1 (wall-clock seconds). With
``--slow``, only the samples of slow steps (execute_model over
``SLOW_STEP_S`` of ``patches/vllm_v1_engine_core.py``: steps that wait for
the GPU to drain or for an upload).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def load(path: str | Path, t0: float | None = None, t1: float | None = None,
         slow: bool = False) -> tuple[Counter, int]:
    stacks: Counter = Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (t0 is not None and rec["t"] < t0) or (t1 is not None and rec["t"] > t1):
            continue
        prefix = "slow_" if slow else ""
        total += rec.get(prefix + "samples", 0)
        stacks.update(rec.get(prefix + "stacks", {}))
    return stacks, total


def shares(stacks: Counter, total: int) -> tuple[list, list]:
    """(inclusive function shares, leaf line shares), largest first."""
    inclusive: Counter = Counter()
    leaves: Counter = Counter()
    for stack, n in stacks.items():
        frames = stack.split(";")
        leaves[frames[0]] += n
        for fn in {f.split(":", 2)[0] + ":" + f.split(":", 2)[2] for f in frames}:
            inclusive[fn] += n
    norm = max(total, 1)
    return ([(f, n / norm) for f, n in inclusive.most_common()],
            [(f, n / norm) for f, n in leaves.most_common()])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path")
    p.add_argument("--from", dest="t0", type=float)
    p.add_argument("--to", dest="t1", type=float)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--events", help="the engine's events file: one report per measured point")
    p.add_argument("--slow", action="store_true", help="only the samples of slow steps")
    args = p.parse_args(argv)
    windows = [("all", args.t0, args.t1)]
    if args.events:
        windows, begun = [], {}
        for line in Path(args.events).read_text().splitlines():
            ev = json.loads(line)
            if ev["ev"] == "point_begin":
                begun[ev["label"]] = ev["t"]
            elif ev["ev"] == "point" and ev["label"] in begun:
                windows.append((ev["label"], begun[ev["label"]], ev["t"]))
    for label, t0, t1 in windows:
        stacks, total = load(args.path, t0, t1, args.slow)
        inclusive, leaves = shares(stacks, total)
        print(f"== {label}: {total} samples{' of slow steps' if args.slow else ''}")
        print("inclusive (function in the stack):")
        for f, s in inclusive[:args.top]:
            print(f"  {100 * s:5.1f}%  {f}")
        print("leaf lines (where the thread was):")
        for f, s in leaves[:args.top]:
            print(f"  {100 * s:5.1f}%  {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
