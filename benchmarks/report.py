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
    "point": "the trace: n adapters, and (online) its arrival rate, and what differs from S-LoRA's "
             "default workload (alpha < 1: skewed popularity; targets=all: the seven projections)",
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
    "vs stock": "steady tok/s / steady tok/s of the best stock at that point (online: achieved "
                "tok/s; req/s where a point has neither)",
    "vs base": "the same against base (no LoRA; the same requests)",
    "TTFT p50/p90/p99": "first-token latency percentiles, s (offline: from handing the whole trace "
                        "to the engine, so mostly queueing)",
    "mean lat": "mean request latency (arrival to last token), s",
    "SLO": "share of the requests whose first token came within the SLO bound (unfinished count as misses)",
}


def point_keys(results: dict) -> list[dict]:
    """The run's points in order: label, n, rate, alpha, targets, and the
    label of base's point with the same requests (files before points had
    labels only by n, and one base point)."""
    return results.get("points") or [{"label": f"n={n}", "n": n, "rate": None, "alpha": 1.0,
                                      "targets": "attn", "base": "base", "legacy": True} for n in results["config"]["n"]]


def point_at(system: dict | None, key: dict) -> dict | None:
    """The measurement of ``system`` at point ``key`` (base: the same requests without adapters)."""
    if system is None:
        return None
    base = system["system"] == "base"
    for p in system["points"]:
        if p["label"] == (key["base"] if base else key["label"]):
            return p
    # Files from before point labels: base had one point for every n.
    return system["points"][0] if base and len(system["points"]) == 1 and key.get("legacy") else None


def ok_rate(p: dict | None) -> float | None:
    """The point's throughput for ratios: steady tok/s, else (online) achieved
    tok/s, else req/s of a finished point."""
    if not p or p.get("status") not in ("ok", "window"):
        return None
    if p.get("steady_tok_per_s"):
        return p["steady_tok_per_s"]
    if p.get("achieved_tok_per_s"):
        return p["achieved_tok_per_s"]
    return p["req_per_s"] if p.get("status") == "ok" else None


def same_workload(workload: dict) -> dict:
    """A workload as compared for merging: files from before point grids had
    one targets, alpha and rate, not lists, and no online duration."""
    out = {k: v for k, v in workload.items() if k not in ("duration_s", "drain_s") or v is not None}
    for key in ("targets", "alpha", "rate"):
        if key in out and not isinstance(out[key], list):
            out[key] = [out[key]]
    return out


def merge(paths: list[Path], out: Path) -> dict:
    """One results file from runs of the same workload split over device calls
    (``--systems`` / ``--n`` subsets): every system keeps the call that
    measured it, and the table compares points of one call only."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    first = runs[0]
    for r in runs[1:]:
        if same_workload(r["workload"]) != same_workload(first["workload"]) \
                or r["config"]["arch"] != first["config"]["arch"]:
            raise ValueError(f"{r['name']} ran another workload than {first['name']}; "
                             f"only runs of one workload merge")
    merged = dict(first, name=out.stem, command=" ; ".join(r["command"] for r in runs),
                  calls=[{"id": r["created"], "device": r.get("device"), "command": r["command"],
                          "file": Path(p).name} for p, r in zip(paths, runs)],
                  systems=[dict(s, call=s.get("call") or r["created"]) for r in runs
                           for s in r["systems"]])
    merged["config"] = dict(first["config"],
                            n=sorted({n for r in runs for n in r["config"]["n"]}))
    keys = {k["label"]: k for r in runs for k in point_keys(r)}
    merged["points"] = sorted(keys.values(), key=lambda k: list(keys).index(k["label"]))
    out.write_text(json.dumps(merged, indent=1))
    return merged


def best_stock(results: dict, key: dict, call: str | None = None) -> dict | None:
    """The stock configuration with the highest throughput at a point (of one call, if given)."""
    rated = [(ok_rate(point_at(s, key)), s) for s in results["systems"]
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
    if p.get("achieved_tok_per_s") and q.get("achieved_tok_per_s"):
        return ratio(p["achieved_tok_per_s"], q["achieved_tok_per_s"])
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
        "point", "system", "status", "req/s", "out tok/s", "steady tok/s", "mean batch", "queue>0",
        "vs stock", "vs base", "TTFT p50/p90/p99 (s)", "mean lat (s)",
        f"SLO ({results['config']['slo_ttft_s']:g} s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in point_keys(results):
        best = best_stock(results, key)
        for s in results["systems"]:
            p = point_at(s, key)
            label = s["label"] + (" **best**" if s is best else "")
            ok = p is not None and p.get("status") in ("ok", "window")
            if p and p.get("req_per_s") is not None:
                shown = fmt(p["req_per_s"]) if p.get("status") == "ok" else f"({p['req_per_s']:.2f})"
            else:
                shown = "-"
            share = p.get("waiting_share") if p else None
            ttft = "/".join(fmt(p.get(k)) for k in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s")) if ok else "-"
            mine = call_of(s)
            stock_here, base_here = best_stock(results, key, mine), base_system(results, mine)
            lines.append("| " + " | ".join(([labels.get(mine, "?")] if labels else []) + [
                key["label"], label, status_cell(p), shown, fmt(p.get("output_tok_per_s"), 0) if ok else "-",
                fmt(p.get("steady_tok_per_s"), 0) if ok else "-",
                fmt(p.get("mean_running"), 0) if ok else "-",
                f"{share:.0%}" if ok and share is not None else "-",
                point_ratio(p, point_at(stock_here, key)), point_ratio(p, point_at(base_here, key)), ttft,
                fmt(p.get("latency_mean_s")) if ok else "-",
                f"{p['slo_attainment']:.0%}" if ok else "-"]) + " |")
    return lines


def n_series(results: dict) -> list[dict]:
    """The points that differ only in n (those with the first point's rate,
    alpha and targets), by n."""
    keys = point_keys(results)
    same = [k for k in keys if all(k.get(f) == keys[0].get(f) for f in ("rate", "alpha", "targets"))]
    return sorted(same, key=lambda k: k["n"])


def summary(results: dict) -> list[str]:
    """The headline ratios: each plugin system vs best stock and vs base at each
    point, and its throughput at the largest n vs the smallest."""
    lines = []
    series = n_series(results)
    for s in results["systems"]:
        if not s["system"].startswith("slora"):
            continue
        parts = []
        plugin = next((x for x in results["systems"] if x["system"] == "slora" and call_of(x) == call_of(s)),
                      None) if s["system"] != "slora" else None
        for key in point_keys(results):
            p = point_at(s, key)
            best, base = best_stock(results, key, call_of(s)), base_system(results, call_of(s))
            parts.append(f"{key['label']}: vs stock {point_ratio(p, point_at(best, key))}, "
                         f"vs base {point_ratio(p, point_at(base, key))}"
                         + (f", vs slora {point_ratio(p, point_at(plugin, key))}" if plugin else ""))
        if len(series) > 1:
            scale = point_ratio(point_at(s, series[-1]), point_at(s, series[0]))
            parts.append(f"n={series[-1]['n']} vs n={series[0]['n']}: {scale}")
        lines.append(f"- **{named(results, s)}**: " + "; ".join(parts))
    return lines


def step_rows(results: dict, line=steplog.line) -> list[str]:
    """One row (``line``) per measured point that has a step log."""
    rows, bases = [], set()
    for key in point_keys(results):
        for s in results["systems"]:
            p = point_at(s, key)
            if s["system"] == "base":  # base: once per point of its own
                if (key["base"], call_of(s)) in bases:
                    continue
                bases.add((key["base"], call_of(s)))
            if p and p.get("steps"):
                row = line(f"{key['label']} {named(results, s)}", p["steps"])
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
           f"versions: {', '.join(f'{k} {v}' for k, v in (results.get('versions') or {}).items())}"
           + (f"; code: {results.get('git_commit') or '?'}, source {results['source_hash']}"
              if results.get("source_hash") else ""),
           f"- workload: " + (f"{wl['num_requests']} requests per measurement" if wl.get("num_requests")
                              else f"{wl['duration_s']:g} s of arrivals per point (requests = rate x "
                                   f"duration), then " + (f"at most {wl['drain_s']:g} s for those in flight"
                                                           if wl.get("drain_s") is not None else "to completion"))
           + f", ranks {wl['ranks']} on "
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
    xc = cross_check_lines(results)
    if xc:
        out += ["", "## Cross-check: vLLM's own client against the same server", "",
                "The same server, right after our client's point: `vllm bench serve` with its random "
                "dataset (the same length ranges), Poisson arrivals at the same rate, as many requests, "
                "an adapter per request drawn uniformly among the point's n (folders of their own "
                "names: cold too).", ""] + xc
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
    """Write the PNGs; return their file names (or a note why there are none):
    throughput vs n (when the run has several n), SLO attainment and achieved
    throughput vs arrival rate (online, when it has several rates), and the
    first-token latency CDF of every point."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], (f"No plots: matplotlib is not installed here; render them with "
                    f"`python -m benchmarks.report {stem}.json`.")
    names = []
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {s["label"]: ("black" if s["system"] == "base" else cycle[i % len(cycle)])
             for i, s in enumerate(results["systems"])}
    style = (lambda s: {"base": ":", "stock": "--"}.get(s["system"], "-"))
    title = f"{results['config']['arch']}, {results['config']['mode']} ({results.get('device') or '?'})"

    def finish(fig, ax, name):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        names.append(name)

    series = n_series(results)
    if len({k["n"] for k in series}) > 1:
        # One unit for every curve: steady tok/s where every measured point has it.
        measured = [point_at(s, k) for s in results["systems"] for k in series if ok_rate(point_at(s, k))]
        steady = bool(measured) and all(p.get("steady_tok_per_s") for p in measured)
        achieved = not steady and bool(measured) and all(p.get("achieved_tok_per_s") for p in measured)
        unit = ("steady-state output tokens/s" if steady else
                "achieved output tokens/s" if achieved else "throughput (req/s)")
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for s in results["systems"]:
            keys = [k for k in series if ok_rate(point_at(s, k)) is not None
                    and (steady or achieved or point_at(s, k)["status"] == "ok")]
            if keys:
                ax.plot([k["n"] for k in keys], [ok_rate(point_at(s, k)) if steady or achieved
                                                 else point_at(s, k)["req_per_s"] for k in keys],
                        style(s), color=color[s["label"]], marker="o", label=named(results, s))
        ns = sorted({k["n"] for k in series})
        ax.set_xscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_xlabel("number of adapters (n)")
        ax.set_ylabel(unit)
        ax.set_title(title + (f", {series[0]['label'].split(' ', 1)[1]}" if " " in series[0]["label"] else ""))
        ax.grid(True, alpha=0.3)
        finish(fig, ax, f"{stem}-throughput.png")

    for key_n, keys in rate_series(results).items():
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for s in results["systems"]:
            got = [(k["rate"], point_at(s, k)) for k in keys]
            got = [(r, p) for r, p in got if p and p.get("status") in ("ok", "window") and p.get("requests")]
            if not got:
                continue
            kw = dict(color=color[s["label"]], marker="o", label=named(results, s))
            a1.plot([r for r, _ in got], [p["slo_attainment"] for _, p in got], style(s), **kw)
            a2.plot([r for r, _ in got], [p.get("achieved_tok_per_s") or p["output_tok_per_s"] for _, p in got],
                    style(s), **kw)
        slo = results["config"]["slo_ttft_s"]
        a1.set_ylabel(f"SLO attainment (first token within {slo:g} s)")
        a1.set_ylim(0, 1.02)
        a2.set_ylabel("achieved output tokens/s")
        a2.set_ylim(bottom=0)
        for ax in (a1, a2):
            ax.set_xlabel("arrival rate (requests/s)")
            ax.grid(True, alpha=0.3)
        a1.set_title(f"{title}, {key_n}")
        finish(fig, a2, f"{stem}-vs-rate{'' if len(rate_series(results)) == 1 else '-' + slug(key_n)}.png")

    keys = point_keys(results)[:8]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for s in results["systems"]:
            p = point_at(s, key)
            # Offline, a point cut at its window has the latencies of its finished requests only.
            shown = ("ok", "window") if p and p.get("achieved_tok_per_s") else ("ok",)
            if not p or p.get("status") not in shown or not p.get("ttft_s"):
                continue
            xs = sorted(p["ttft_s"])
            ax.step(xs, [(i + 1) / p["requests"] for i in range(len(xs))], where="post", label=s["label"],
                    color=color[s["label"]])
        ax.axvline(results["config"]["slo_ttft_s"], color="grey", lw=0.8, ls=":")
        ax.set_title(key["label"], fontsize=9)
        ax.set_xlabel("first-token latency (s)")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("share of requests")
    finish(fig, axes[0][-1], f"{stem}-ttft-cdf.png")
    return names, None


def rate_series(results: dict) -> dict[str, list[dict]]:
    """Online points that differ only in their arrival rate, by what they share
    (n, alpha, targets), for those with several rates."""
    groups: dict[str, list[dict]] = {}
    for k in point_keys(results):
        if k.get("rate") is not None:
            shared = " ".join(part for part in k["label"].split() if not part.startswith("rate="))
            groups.setdefault(shared, []).append(k)
    return {g: sorted(ks, key=lambda k: k["rate"]) for g, ks in groups.items() if len(ks) > 1}


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c == "." else "-" for c in text).replace("--", "-")


def cross_check_lines(results: dict) -> list[str]:
    """Our client and ``vllm bench serve`` at one point, against the same server."""
    lines = []
    for s in results["systems"]:
        xc = s.get("cross_check")
        if not xc:
            continue
        lines += [f"### {named(results, s)} at {xc['point']}", "",
                  "| client | finished | req/s | out tok/s | TTFT p50/p90/p99 (s) | mean lat (s) | SLO |",
                  "|---|---|---|---|---|---|---|"]
        for who, f in (("ours (`benchmarks/online.py`)", xc.get("ours")),
                       ("`vllm bench serve`", xc.get("vllm_bench_serve"))):
            if not f:
                lines.append(f"| {who} | - | - | - | - | - | - |")
                continue
            slo = f.get("slo_attainment")
            lines.append(f"| {who} | {f.get('finished')}/{f.get('requests')} | {fmt(f.get('req_per_s'))} | "
                         f"{fmt(f.get('output_tok_per_s'), 0)} | "
                         + "/".join(fmt(f.get(k)) for k in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s"))
                         + f" | {fmt(f.get('latency_mean_s'))} | {'-' if slo is None else f'{slo:.0%}'} |")
        lines += ["", f"vLLM's client: `{xc['command']}`" + (f" ({xc['error']})" if xc.get("error") else ""),
                  ""]
    return lines


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
