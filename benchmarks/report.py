"""A run's results JSON rendered as a markdown table (ratios vs ``stock`` and
``base``) and PNG plots (throughput vs number of adapters; first-token latency
CDF). Re-render from a JSON, e.g. one brought back from the GPU machine:

    python -m benchmarks.report benchmarks/results/headline-offline.json

Runs of one workload split over several device calls (``--systems`` or
``--n`` subsets) merge into one file whose table marks each row's call and
computes ratios only between points of the same call:

    python -m benchmarks.report --merge OUT.json A.json B.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks import steplog
from benchmarks.systems import SYSTEMS

COLUMNS = {
    "n": "number of adapters in the trace",
    "system": "configuration; `best` marks the stock max_loras with the highest req/s at that n",
    "status": "ok | too slow (stopped at its time share; partial req/s in parentheses) | failed | "
              "start-up failed | start-up too slow | skipped (time budget)",
    "req/s": "finished requests / wall time of the measurement",
    "out tok/s": "generated tokens / wall time",
    "steady tok/s": "generated tokens / s over the steady window: from when the first wave "
                    "has its first tokens (tokens generated >= the fullest batch) to the last "
                    "moment the waiting queue was non-empty (the batch as full as it can be)",
    "mean batch": "mean running requests over the point (sampled every 0.5 s)",
    "queue>0": "share of the point's samples with requests waiting",
    "vs stock": "steady tok/s / steady tok/s of the best stock at that n (req/s where a "
                "point has no steady window)",
    "vs base": "the same against base (no LoRA; the same requests)",
    "TTFT p50/p90/p99": "first-token latency percentiles, s (offline: from handing the whole trace "
                        "to the engine, so mostly queueing)",
    "mean lat": "mean request latency (arrival to last token), s",
    "SLO": "share of the requests whose first token came within the SLO bound (unfinished count as misses)",
}


def point_at(system: dict, n: int) -> dict | None:
    """The measurement of ``system`` for the trace with ``n`` adapters (base: its only one)."""
    for p in system["points"]:
        if p["n"] == n or (system["system"] == "base" and p["n"] == 0):
            return p
    return None


def ok_rate(p: dict | None) -> float | None:
    """The point's throughput for ratios: steady tok/s, else req/s of a finished point."""
    if not p or p.get("status") not in ("ok", "window"):
        return None
    if p.get("steady_tok_per_s"):
        return p["steady_tok_per_s"]
    return p["req_per_s"] if p.get("status") == "ok" else None


def merge(paths: list[Path], out: Path) -> dict:
    """One results file from runs of the same workload split over device calls
    (``--systems`` / ``--n`` subsets): every system keeps the call that
    measured it, and the table compares points of one call only."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    first = runs[0]
    for r in runs[1:]:
        if r["workload"] != first["workload"] or r["config"]["arch"] != first["config"]["arch"]:
            raise ValueError(f"{r['name']} ran another workload than {first['name']}; "
                             f"only runs of one workload merge")
    merged = dict(first, name=out.stem, command=" ; ".join(r["command"] for r in runs),
                  calls=[{"id": r["created"], "device": r.get("device"), "command": r["command"],
                          "file": Path(p).name} for p, r in zip(paths, runs)],
                  systems=[dict(s, call=s.get("call") or r["created"]) for r in runs
                           for s in r["systems"]])
    merged["config"] = dict(first["config"],
                            n=sorted({n for r in runs for n in r["config"]["n"]}))
    out.write_text(json.dumps(merged, indent=1))
    return merged


def best_stock(results: dict, n: int, call: str | None = None) -> dict | None:
    """The stock configuration with the highest throughput at n (of one call, if given)."""
    rated = [(ok_rate(point_at(s, n)), s) for s in results["systems"]
             if s["system"] == "stock" and (call is None or call_of(s) == call)]
    rated = [(r, s) for r, s in rated if r is not None]
    return max(rated, key=lambda x: x[0])[1] if rated else None


def base_system(results: dict, call: str | None = None) -> dict | None:
    return next((s for s in results["systems"]
                 if s["system"] == "base" and (call is None or call_of(s) == call)), None)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def call_of(system: dict | None) -> str | None:
    """The device call that measured a system (a merged file holds several)."""
    return None if system is None else system.get("call")


def point_ratio(p: dict | None, q: dict | None) -> str:
    """p's throughput over q's, by the same method on both sides: steady tok/s
    where both have it, req/s where both finished, else none. (Callers pass
    points of one device call only.)"""
    if ok_rate(p) is None or ok_rate(q) is None:
        return "-"
    if p.get("steady_tok_per_s") and q.get("steady_tok_per_s"):
        return ratio(p["steady_tok_per_s"], q["steady_tok_per_s"])
    if p.get("status") == q.get("status") == "ok":
        return ratio(p["req_per_s"], q["req_per_s"])
    return "-"


def fmt(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def status_cell(p: dict | None) -> str:
    if p is None:
        return "not run"
    text = p["status"]
    if p.get("note"):
        note = p["note"] if len(p["note"]) <= 140 else p["note"][:140] + "..."
        text += f": {note}"
    return text.replace("|", "/")


def call_labels(results: dict) -> dict[str | None, str]:
    """Short labels (A, B, ...) of the device calls of a merged file."""
    calls = [c["id"] for c in results.get("calls") or []]
    return {c: chr(ord("A") + i) for i, c in enumerate(calls)}


def table(results: dict) -> list[str]:
    labels = call_labels(results)
    head = (["call"] if labels else []) + [
        "n", "system", "status", "req/s", "out tok/s", "steady tok/s", "mean batch", "queue>0",
        "vs stock", "vs base", "TTFT p50/p90/p99 (s)", "mean lat (s)",
        f"SLO ({results['config']['slo_ttft_s']:g} s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in results["config"]["n"]:
        best = best_stock(results, n)
        for s in results["systems"]:
            p = point_at(s, n)
            label = s["label"] + (" **best**" if s is best else "")
            ok = p is not None and p.get("status") in ("ok", "window")
            if p and p.get("req_per_s") is not None:
                shown = fmt(p["req_per_s"]) if p.get("status") == "ok" else f"({p['req_per_s']:.2f})"
            else:
                shown = "-"
            share = p.get("waiting_share") if p else None
            ttft = "/".join(fmt(p.get(k)) for k in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s")) if ok else "-"
            mine = call_of(s)
            stock_here, base_here = best_stock(results, n, mine), base_system(results, mine)
            lines.append("| " + " | ".join(([labels.get(mine, "?")] if labels else []) + [
                str(n), label, status_cell(p), shown, fmt(p.get("output_tok_per_s"), 0) if ok else "-",
                fmt(p.get("steady_tok_per_s"), 0) if ok else "-",
                fmt(p.get("mean_running"), 0) if ok else "-",
                f"{share:.0%}" if ok and share is not None else "-",
                point_ratio(p, point_at(stock_here, n) if stock_here else None),
                point_ratio(p, point_at(base_here, n) if base_here else None), ttft,
                fmt(p.get("latency_mean_s")) if ok else "-",
                f"{p['slo_attainment']:.0%}" if ok else "-"]) + " |")
    return lines


def summary(results: dict) -> list[str]:
    """The headline ratios: each plugin system vs best stock and vs base at each
    n, and its throughput at the largest n vs the smallest."""
    ns = results["config"]["n"]
    lines = []
    for s in results["systems"]:
        if not s["system"].startswith("slora"):
            continue
        parts = []
        for n in ns:
            p = point_at(s, n)
            best, base = best_stock(results, n, call_of(s)), base_system(results, call_of(s))
            parts.append(f"n={n}: vs stock {point_ratio(p, point_at(best, n) if best else None)}, "
                         f"vs base {point_ratio(p, point_at(base, n) if base else None)}")
        if len(ns) > 1:
            scale = point_ratio(point_at(s, max(ns)), point_at(s, min(ns)))
            parts.append(f"n={max(ns)} vs n={min(ns)}: {scale}")
        lines.append(f"- **{named(results, s)}**: " + "; ".join(parts))
    return lines


def step_rows(results: dict, line=steplog.line) -> list[str]:
    """One row (``line``) per measured point that has a step log."""
    rows = []
    for i, n in enumerate(results["config"]["n"]):
        for s in results["systems"]:
            p = point_at(s, n)
            if p and p.get("steps") and (i == 0 or s["system"] != "base"):  # base: one point
                row = line(f"n={n} {named(results, s)}", p["steps"])
                if row:
                    rows.append(row)
    return rows


def named(results: dict, s: dict) -> str:
    """A system's label, with its call in a merged file."""
    labels = call_labels(results)
    return s["label"] + (f" (call {labels.get(call_of(s), '?')})" if labels else "")


def engine_line(results: dict, s: dict) -> str:
    if s.get("start_s") is None:
        return f"- {named(results, s)}: {s.get('status', 'not run')}" + (
            f" after {s['wall_s']:.0f} s" if s.get("wall_s") else "")
    engine = ", ".join(f"{k} {v}" for k, v in (s.get("engine") or {}).items())
    return (f"- {named(results, s)}: start-up {s['start_s']:.0f} s, warm-up "
            f"{s.get('warmup_s') or 0:.1f} s, {s['wall_s']:.0f} s in all; {engine}")


def markdown(results: dict, stem: str) -> str:
    cfg, wl = results["config"], results["workload"]
    out = [f"# {results['name']}: {cfg['mode']} mode, {cfg['arch']}", "",
           f"Reproduce: `{results['command']}`", "",
           f"- when: {results['created']}; device: {results.get('device') or '?'}; "
           f"versions: {', '.join(f'{k} {v}' for k, v in (results.get('versions') or {}).items())}",
           f"- workload: {wl['num_requests']} requests per measurement, ranks {wl['ranks']} on "
           f"{wl['targets']}, alpha {wl['alpha']} (S-LoRA's power law: 1 = uniform), input "
           f"{wl['input_range']}, output {wl['output_range']} tokens (ignore_eos), seed {wl['seed']}"
           + (f", arrivals Gamma rate {wl['rate']}/s cv {wl['cv']}" if cfg["mode"] == "online" else
              ", all requests handed over at once"),
           f"- engines: {results['engine_note']}",
           f"- adapters: {results['adapters']['note']}"]
    out += [f"- **warning**: {w}" for w in results.get("warnings") or []] + [""]
    out += table(results)
    if results.get("calls"):
        out += ["", "## Calls (ratios only within one)", ""]
        out += [f"- {call_labels(results)[c['id']]}: {c['id']} on {c.get('device') or '?'}: "
                f"`{c['command']}`" for c in results["calls"]]
    out += ["", "## Plugin vs stock and base", ""] + (summary(results) or ["- no plugin system in this run"])
    steps = step_rows(results)
    if steps:
        out += ["", "## Steps in the steady window (engine core's step log, `benchmarks/steplog.py`)", "",
                steplog.HEADER] + steps
    host = step_rows(results, steplog.host_line)
    if host:
        out += ["", "## The engine thread's time per step (steady window; CPU below host: "
                "waiting, for the GPU, a lock or the GIL)", "", steplog.HOST_HEADER] + host
    out += ["", "## Engines", ""] + [engine_line(results, s) for s in results["systems"]]
    failures = [s for s in results["systems"] if s.get("error")]
    if failures:
        out += ["", "## Errors", ""] + [f"- {named(results, s)}: {s['error']}" for s in failures]
    out += ["", "## Systems", ""] + [f"- `{k}`: {v}" for k, v in SYSTEMS.items()]
    out += ["", "## Columns", ""] + [f"- {k}: {v}" for k, v in COLUMNS.items()]
    plots = results.get("plots") or []
    if plots:
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    elif results.get("plot_note"):
        out += ["", results["plot_note"]]
    return "\n".join(out) + "\n"


def plots(results: dict, out_dir: Path, stem: str) -> tuple[list[str], str | None]:
    """Write the PNGs; return their file names (or a note why there are none)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], (f"No plots: matplotlib is not installed here; render them with "
                    f"`python -m benchmarks.report {stem}.json`.")
    ns = results["config"]["n"]
    names = []
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {s["label"]: ("black" if s["system"] == "base" else cycle[i % len(cycle)])
             for i, s in enumerate(results["systems"])}

    # One unit for every curve: steady tok/s where every measured point has it.
    measured = [point_at(s, n) for s in results["systems"] for n in ns
                if ok_rate(point_at(s, n)) is not None]
    steady = bool(measured) and all(p.get("steady_tok_per_s") for p in measured)
    rate = (lambda p: p["steady_tok_per_s"]) if steady else (lambda p: p["req_per_s"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in results["systems"]:
        xs = [n for n in ns if ok_rate(point_at(s, n)) is not None
              and (steady or point_at(s, n)["status"] == "ok")]
        ys = [rate(point_at(s, n)) for n in xs]
        if not xs:
            continue
        style = {"base": ":", "stock": "--"}.get(s["system"], "-")
        ax.plot(xs, ys, style, color=color[s["label"]], marker="o", label=named(results, s))
    ax.set_xscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("number of adapters (n)")
    ax.set_ylabel("steady-state output tokens/s" if steady else "throughput (req/s)")
    ax.set_title(f"{results['config']['arch']}, {results['config']['mode']} ({results.get('device') or '?'})")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}-throughput.png", dpi=110)
    plt.close(fig)
    names.append(f"{stem}-throughput.png")

    fig, axes = plt.subplots(1, len(ns), figsize=(4.2 * len(ns), 3.8), squeeze=False)
    for ax, n in zip(axes[0], ns):
        for s in results["systems"]:
            p = point_at(s, n)
            if not p or p.get("status") != "ok" or not p.get("ttft_s"):
                continue
            xs = sorted(p["ttft_s"])
            ax.step(xs, [(i + 1) / p["requests"] for i in range(len(xs))], where="post", label=s["label"],
                    color=color[s["label"]])
        ax.axvline(results["config"]["slo_ttft_s"], color="grey", lw=0.8, ls=":")
        ax.set_title(f"n = {n}")
        ax.set_xlabel("first-token latency (s)")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("share of requests")
    if axes[0][-1].get_legend_handles_labels()[0]:
        axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}-ttft-cdf.png", dpi=110)
    plt.close(fig)
    names.append(f"{stem}-ttft-cdf.png")
    return names, None


def render(json_path: Path) -> str:
    """(Re)write the markdown and plots next to ``json_path``; return the markdown."""
    results = json.loads(json_path.read_text())
    stem = json_path.stem
    results["plots"], results["plot_note"] = plots(results, json_path.parent, stem)
    json_path.write_text(json.dumps(results, indent=1))
    md = markdown(results, stem)
    json_path.with_suffix(".md").write_text(md)
    return md


if __name__ == "__main__":
    if sys.argv[1:2] == ["--merge"]:  # --merge OUT.json A.json B.json ...
        merge([Path(a) for a in sys.argv[3:]], Path(sys.argv[2]))
        print(render(Path(sys.argv[2])))
    else:
        for arg in sys.argv[1:]:
            print(render(Path(arg)))
