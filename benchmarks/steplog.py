"""Where a point's steps spend their time, from the engine core's step log.

Every offline engine writes one record per step (``patches/vllm_v1_engine_core.py``,
``VLLM_SLORA_STEP_LOG``): ``[time, tokens, requests, decode requests, host s,
host s of schedule, execute_model, sample_tokens, update_from_output, CPU s,
{plugin's figures by name}]`` (older logs end after the calls), each
record with its own step's calls (logs before 2026-12-07 paired a step
with the calls made since the previous record: with async scheduling the
next step's schedule and launch, so their slow "decode" steps were the
launches of the eager prefills after them).
``summarize`` takes the steps of a window (the point's steady window) and
splits them by how vLLM runs them: ``decode`` (every request one token: a
full CUDA graph when the batch fits a capture size), ``mixed`` (prompt
tokens too, at most the largest capture size: piecewise graphs) and
``large`` (more tokens than any capture size: no graph); and apart, the
decode steps of an unchanged batch (``unchanged_decode``: with async
scheduling a step may wait for earlier steps' GPU work, so only where no
request starts or ends is a decode step's period its graph's pace), and
the decode steps whose own ``execute_model`` took over ``SLOW_STEP_S``
(``slow_decode``: a graph's launch that waited, for an upload or the GPU) with
their time beyond that pace as a share of the window. Per kind: its share
of the steps, mean tokens, mean period (time since the previous step's
results, i.e. the step's share of the wall clock) and mean host seconds of
the engine's thread. Over all steps also the decode rate (decoding requests
per second: how many requests ran, times how fast) and the mean requests
per step (the batch's size, which KV memory may bound). ``host_share`` near 1 means the engine's thread set the
pace, not the GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

KINDS = ("decode", "mixed", "large")
# As in patches/vllm_v1_engine_core.py (not imported: it needs vLLM; a test checks both).
CALLS = ("schedule", "execute_model", "sample_tokens", "update_from_output")
SLOW_STEP_S = 0.015


def read(path: str | Path) -> list[list[float]]:
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written as we read
            continue
    return out


def kind(tokens: int, requests: int, decode: int, graph_max: int) -> str:
    if tokens > graph_max:
        return "large"
    return "decode" if decode == requests else "mixed"


def summarize(records: list[list[float]], t0: float, t1: float, graph_max: int,
              only: str | None = None) -> dict | None:
    """Steps whose period lies inside [t0, t1] (wall-clock seconds); with
    ``only`` (one of ``KINDS``), the steps of that kind alone."""
    steps, settled = [], []
    for prev, rec in zip(records, records[1:]):
        if prev[0] >= t0 and rec[0] <= t1 and (only is None or kind(*rec[1:4], graph_max) == only):
            steps.append((rec[0] - prev[0], *rec[1:]))
            if (kind(*rec[1:4], graph_max) == kind(*prev[1:4], graph_max) == "decode"
                    and rec[2] == prev[2]):
                settled.append(rec[0] - prev[0])
    if not steps:
        return None
    wall = sum(s[0] for s in steps)
    out = {"steps": len(steps), "period_ms": 1e3 * wall / len(steps),
           "tokens_per_step": sum(s[1] for s in steps) / len(steps),
           "host_ms": 1e3 * sum(s[4] for s in steps) / len(steps),
           "host_share": sum(s[4] for s in steps) / wall if wall > 0 else None,
           # Decoding requests per second: generated tokens less each request's first
           # (the rate the batch's size and the step's pace give together).
           "decode_tok_s": sum(s[3] for s in steps) / wall if wall > 0 else None,
           "requests_per_step": sum(s[2] for s in steps) / len(steps),
           "graph_max": graph_max, "kinds": {}}
    n, at = len(steps), 5 + len(CALLS)
    if all(len(s) >= at for s in steps):  # the host seconds of each call
        out["calls_ms"] = {c: 1e3 * sum(s[5 + i] for s in steps) / n for i, c in enumerate(CALLS)}
    if all(len(s) >= at + 2 for s in steps):  # CPU seconds, the plugin's seconds
        out["cpu_ms"] = 1e3 * sum(s[at] for s in steps) / n
        names = sorted({k for s in steps for k in s[at + 1]})
        # per step: seconds (names ending in _s) as ms (named _ms), counts as they are
        out["plugin"] = {k.removesuffix("_s") + "_ms" if k.endswith("_s") else k:
                         (1e3 if k.endswith("_s") else 1) * sum(s[at + 1].get(k, 0.0) for s in steps) / n
                         for k in names}
    for k in KINDS:
        mine = [s for s in steps if kind(s[1], s[2], s[3], graph_max) == k]
        if mine:
            n = len(mine)
            out["kinds"][k] = {"share": n / len(steps), "tokens": sum(s[1] for s in mine) / n,
                               "period_ms": 1e3 * sum(s[0] for s in mine) / n,
                               "host_ms": 1e3 * sum(s[4] for s in mine) / n,
                               "time_share": sum(s[0] for s in mine) / wall if wall > 0 else None}
    if settled:
        # Decode steps of an unchanged batch (the same requests as the step
        # before, all decoding): their period is the captured decode step's
        # pace. Where requests end or start, a step may wait for the GPU work
        # of earlier ones (async scheduling queues up to two steps), so its
        # period says little about its own work.
        out["unchanged_decode"] = {"steps": len(settled),
                                   "period_ms": 1e3 * sum(settled) / len(settled)}
        # Decode steps whose own execute_model took over SLOW_STEP_S: a
        # graph's launch takes a few ms, so these waited (with the plugin,
        # for an upload). What they take beyond an unchanged-batch step, as a
        # share of the window, is what they cost the throughput.
        slow = [st for st in steps if len(st) > 6 and st[6] > SLOW_STEP_S
                and kind(st[1], st[2], st[3], graph_max) == "decode"]
        if slow and wall > 0:
            pace = sum(settled) / len(settled)
            out["slow_decode"] = {"steps": len(slow),
                                  "period_ms": 1e3 * sum(st[0] for st in slow) / len(slow),
                                  "execute_ms": 1e3 * sum(st[6] for st in slow) / len(slow),
                                  "excess_share": sum(st[0] - pace for st in slow) / wall}
    return out


def line(label: str, s: dict | None) -> str:
    """One markdown row: label | steps | tokens/step | period | host | per kind."""
    if not s:
        return f"| {label} | - | - | - | - | - | - | - |"
    cells = []
    for k in KINDS:
        d = s["kinds"].get(k)
        cells.append(f"{100 * d['share']:.0f}% x {d['tokens']:.0f} tok, {d['period_ms']:.1f} ms"
                     if d else "-")
    return (f"| {label} | {s['steps']} | {s['tokens_per_step']:.0f} | {s['period_ms']:.1f} | "
            f"{s['host_ms']:.1f} ({100 * s['host_share']:.0f}%) | " + " | ".join(cells) + " |")


def host_line(label: str, s: dict | None) -> str | None:
    """One markdown row of where the engine thread's time went, per step:
    label | host | CPU | each call | the plugin's own figures."""
    if not s or "calls_ms" not in s:
        return None
    calls = " | ".join(f"{s['calls_ms'][c]:.1f}" for c in CALLS)
    cpu = f"{s['cpu_ms']:.1f}" if "cpu_ms" in s else "-"
    plugin = ", ".join(f"{k} {v:.1f}" for k, v in (s.get("plugin") or {}).items())
    return f"| {label} | {s['host_ms']:.1f} | {cpu} | {calls} | {plugin or '-'} |"


HOST_HEADER = ("| point | host ms/step | of it CPU | schedule | execute_model | sample_tokens | "
               "update_from_output | the plugin's own, per step |\n|---|---|---|---|---|---|---|---|")

HEADER = ("| point | steps | tokens/step | ms/step | host ms/step (share) | decode steps | "
          "mixed steps (piecewise) | larger than any graph |\n|---|---|---|---|---|---|---|---|")


def point_windows(events_path: str | Path) -> dict[str, tuple[float, float]]:
    """Each point's [begin, end] (wall-clock seconds) from a run's events log."""
    out, begin = {}, None
    for e in read(events_path):
        if e["ev"] == "point_begin":
            begin = e["t"]
        elif e["ev"] == "point" and begin is not None:
            out[e["label"]] = (begin, e["t"])
    return out


def main(argv=None) -> None:
    """Where one point's steps spent the engine thread's time, per kind of step."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("steps", help="<run>/logs/<system>.steps.jsonl")
    p.add_argument("--events", help="its events log (default: beside it, .events.jsonl)")
    p.add_argument("--point", required=True, help="the point's label, e.g. n=2000")
    p.add_argument("--skip-s", type=float, default=3.0, help="seconds after the point's start left out")
    p.add_argument("--graph-max", type=int, default=256, help="largest CUDA-graph batch")
    args = p.parse_args(argv)
    events = args.events or args.steps.removesuffix(".steps.jsonl") + ".events.jsonl"
    t0, t1 = point_windows(events)[args.point]
    records = read(args.steps)
    print(HOST_HEADER.replace("| point |", "| steps |", 1))
    for k in (*KINDS, None):
        row = host_line(k or "all", summarize(records, t0 + args.skip_s, t1, args.graph_max, only=k))
        if row:
            print(row)
    whole = summarize(records, t0 + args.skip_s, t1, args.graph_max)
    print("\n" + HEADER.replace("| point |", "| steps |", 1) + "\n" + line("all", whole))
    if whole:
        print(f"\ndecode tokens/s {whole['decode_tok_s']:,.0f} (requests a step {whole['requests_per_step']:.0f})")
    settled = (whole or {}).get("unchanged_decode")
    if settled:
        print(f"\ndecode steps of an unchanged batch: {settled['steps']}, "
              f"{settled['period_ms']:.1f} ms each (no request started or ended)")
    slow = (whole or {}).get("slow_decode")
    if slow:
        print(f"\ndecode steps whose execute_model took over {1e3 * SLOW_STEP_S:.0f} ms: "
              f"{slow['steps']}, {slow['period_ms']:.1f} ms each ({slow['execute_ms']:.1f} in "
              f"execute_model); beyond an unchanged-batch step, {100 * slow['excess_share']:.1f}% "
              f"of the window")


if __name__ == "__main__":
    main()
