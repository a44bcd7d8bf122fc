"""Two trees' kernel benchmarks side by side: did a change move our kernels?

    python -m benchmarks.kernels.compare --old A1.json A2.json --new B1.json B2.json

Each JSON is one ``python -m benchmarks.kernels`` run; runs of one tree are
taken by their median per case (GPU time, ``us_ours``; eager time,
``eager_us_ours``). Prints per case new/old and the plans (which must
match: a change of plan is a change of behaviour), then the geometric mean
of new/old over the cases and the spread between one tree's own runs (the
noise a difference must exceed to mean anything).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

from benchmarks.kernels.report import geomean

KEY = ("model", "module", "ranks", "mode", "batch")
TIMES = ("us_ours", "eager_us_ours")


def load(paths: list[str]) -> dict[tuple, list[dict]]:
    cases: dict[tuple, list[dict]] = {}
    for path in paths:
        with open(path) as f:
            for row in json.load(f)["rows"]:
                cases.setdefault(tuple(row[k] for k in KEY), []).append(row)
    return cases


def median(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else math.nan


def spread(rows: list[dict], key: str) -> float:
    """Largest / smallest of one tree's runs of a case (1.0 = identical)."""
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and r[key] > 0]
    return max(values) / min(values) if len(values) > 1 else math.nan


def compare(old: dict, new: dict) -> tuple[list[str], dict]:
    lines = ["| case | plan old / new | GPU us old / new | new/old | eager us old / new | new/old |",
             "|---|---|---|---|---|---|"]
    ratios: dict[str, list[float]] = {t: [] for t in TIMES}
    spreads: dict[str, list[float]] = {t: [] for t in TIMES}
    plans_differ = []
    for key in sorted(set(old) & set(new), key=str):
        o, n = old[key], new[key]
        po, pn = o[0].get("plan"), n[0].get("plan")
        if po != pn:
            plans_differ.append(key)
        cells = []
        for t in TIMES:
            mo, mn = median(o, t), median(n, t)
            r = mn / mo if mo > 0 else math.nan
            if not math.isnan(r):
                ratios[t].append(r)
            spreads[t] += [s for s in (spread(o, t), spread(n, t)) if not math.isnan(s)]
            cells.append(f"{mo:.1f} / {mn:.1f} | {r:.3f}")
        lines.append(f"| {' '.join(map(str, key))} | {po} / {pn} | " + " | ".join(cells) + " |")
    summary = {
        "cases": len(set(old) & set(new)),
        "plans_differ": [" ".join(map(str, k)) for k in plans_differ],
        **{f"geomean_new_over_old_{t}": geomean(ratios[t]) if ratios[t] else None for t in TIMES},
        **{f"median_spread_within_tree_{t}": statistics.median(spreads[t]) if spreads[t] else None
           for t in TIMES},
    }
    return lines, summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", nargs="+", required=True, help="JSON runs of the tree before")
    p.add_argument("--new", nargs="+", required=True, help="JSON runs of the tree after")
    p.add_argument("--out", help="write the summary as JSON here")
    args = p.parse_args(argv)
    lines, summary = compare(load(args.old), load(args.new))
    print("\n".join(lines))
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 1 if summary["plans_differ"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
