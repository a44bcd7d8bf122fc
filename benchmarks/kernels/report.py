"""What the benchmark prints and writes: per case the derived ratios and HBM%,
the table row, the closing summary against the targets, the plot and the
JSON.

HBM% = bytes the op must move (x, the pages of the adapters in use, y read and
written) / GPU time / 3.35 TB/s; its target applies to decode. "v1 us" is the
first MBGMV (one program per token, mbgmv.py), kept as a baseline for small
decode batches. The summary gives per (model, module, ranks, mode) the
geometric mean of ours/stock over batch sizes and the largest decode HBM%.
"""

import json
import os
import platform

from benchmarks.kernels.cases import BLOCK_ROWS, DRY, FULL

H100_PEAK_BYTES_PER_S = 3.35e12
TARGET_MIXED = 1 / 1.5  # ours/stock, issue 5
TARGET_UNIFORM = 1.0
TARGET_HBM_PCT = 70.0


def ratios_and_bandwidth(row, ad, k, ns, x, token_lora, mode):
    out = {}
    for other in ("stock", "bmm", "v1"):
        if f"us_{other}" in row:
            out[f"ours/{other}"] = row["us_ours"] / max(row[f"us_{other}"], 1e-3)
    if "eager_us_stock" in row:
        out["eager ours/stock"] = row["eager_us_ours"] / row["eager_us_stock"]
    # Bytes the op must move: x, the pages of the adapters in use, y in+out.
    used = token_lora.unique()
    used = used[used >= 0]
    ranks = int(ad.lora_rank[used.long()].sum())
    elem = x.element_size()
    nbytes = elem * (x.numel() + ranks * len(ns) * k + ranks * sum(ns) + 2 * x.shape[0] * sum(ns))
    out["bytes"] = nbytes
    out["hbm_pct_of_h100_peak"] = (
        100 * nbytes / (max(row["us_ours"], 1e-3) * 1e-6) / H100_PEAK_BYTES_PER_S
    )
    return out


def geomean(xs) -> float:
    import math

    return math.exp(sum(math.log(max(x, 1e-9)) for x in xs) / len(xs))


def summarize(rows) -> list[str]:
    """Per (model, module, ranks, mode): geometric mean of ours/stock over
    batch sizes and the largest decode HBM%; then the cases off target."""
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["module"], r["ranks"], r["mode"]), []).append(r)
    lines.append(
        f"summary: geomean ours/stock over batch sizes (target mix <= {TARGET_MIXED:.2f}, "
        f"uniform <= {TARGET_UNIFORM:.2f}); decode max HBM% (target >= {TARGET_HBM_PCT:.0f})"
    )
    lines.append(f"{'model':5} {'module':8} {'ranks':8} {'mode':8} {'geo o/s':>8} {'worst':>6} "
                 f"{'maxHBM%':>8}  verdict  {'eager geo o/s':>13}")  # fmt: skip
    misses = []
    for key, rs in groups.items():
        ratios = [r["ours/stock"] for r in rs if "ours/stock" in r]
        if not ratios:
            continue
        geo = geomean(ratios)
        target = TARGET_MIXED if key[2].startswith("mix") else TARGET_UNIFORM
        hbm = max((r.get("hbm_pct_of_h100_peak", 0.0) for r in rs), default=0.0)
        hbm_s = f"{hbm:8.1f}" if key[3] == "decode" else f"{'-':>8}"
        verdict = "ok" if geo <= target else "MISS"
        eager = [r["eager ours/stock"] for r in rs if "eager ours/stock" in r]
        eager_s = f"{geomean(eager):13.2f}" if eager else f"{'-':>13}"
        lines.append(f"{key[0]:5} {key[1]:8} {key[2]:8} {key[3]:8} {geo:8.2f} {max(ratios):6.2f} "
                     f"{hbm_s}  {verdict:7}  {eager_s}")  # fmt: skip
        for r in rs:
            if r.get("ours/stock", 0) > target:
                misses.append(r)
    decode = [r for r in rows if r["mode"] == "decode" and "hbm_pct_of_h100_peak" in r]
    if decode:
        best = max(decode, key=lambda r: r["hbm_pct_of_h100_peak"])
        lines.append(
            f"decode HBM%: max {best['hbm_pct_of_h100_peak']:.1f} "
            f"({best['model']} {best['module']} {best['ranks']} T={best['tokens']}); at T=512: "
            + ", ".join(f"{r['module']}/{r['ranks']} {r['hbm_pct_of_h100_peak']:.0f}"
                        for r in decode if r["tokens"] == 512 and r["model"] == "7b")  # fmt: skip
        )
    lines.append(f"cases off target (ours/stock): {len(misses)} of "
                 f"{sum(1 for r in rows if 'ours/stock' in r)}")  # fmt: skip
    for r in misses:
        lines.append(f"  {r['model']} {r['module']} {r['ranks']} {r['mode']} {r['batch']}: "
                     f"{r['ours/stock']:.2f} ({r['us_ours']:.1f} vs {r['us_stock']:.1f} us, "
                     f"plan {r['plan']})")  # fmt: skip
    return lines


HEADER = (
    f"{'model':5} {'module':8} {'ranks':8} {'mode':8} {'batch':>5} {'tokens':>6} "
    f"{'ours us':>9} {'stock us':>9} {'bmm us':>9} {'o/stock':>8} {'o/bmm':>7} {'HBM%':>6} "
    f"{'v1 us':>7} {'plan':>10} {'eager: ours':>11} {'stock':>7} {'o/s':>5}"
)


def print_row(row, dry):
    if dry:
        errs = " ".join(f"{k}={v:.1e}" for k, v in row.items() if k.startswith("err_"))
        print(f"{row['model']:5} {row['module']:8} {row['ranks']:8} {row['mode']:8} "
              f"{row['batch']:>5} {row['tokens']:>6} {row['plan']:>8}  {errs}",
              flush=True)  # fmt: skip
        return

    def f(key, fmt):
        return format(row[key], fmt) if key in row else "-"

    print(
        f"{row['model']:5} {row['module']:8} {row['ranks']:8} {row['mode']:8} {row['batch']:>5} "
        f"{row['tokens']:>6} {f('us_ours', '9.1f')} {f('us_stock', '9.1f'):>9} "
        f"{f('us_bmm', '9.1f'):>9} {f('ours/stock', '8.2f'):>8} {f('ours/bmm', '7.2f'):>7} "
        f"{f('hbm_pct_of_h100_peak', '6.1f'):>6} {f('us_v1', '7.1f'):>7} {row['plan']:>10} "
        f"{f('eager_us_ours', '11.1f'):>11} {f('eager_us_stock', '7.1f'):>7} "
        f"{f('eager ours/stock', '5.2f'):>5}",
        flush=True,
    )


def plot(rows, path) -> str | None:
    """GPU time vs batch for every (model, module): ours, stock, padded bmm,
    one line style per rank set; decode on top, prefill below. Returns the
    PNG path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    panels = list(dict.fromkeys((r["model"], r["module"]) for r in rows if "us_ours" in r))
    if not panels:
        return None
    fig, axes = plt.subplots(2, len(panels), figsize=(3.3 * len(panels), 6.4), squeeze=False)
    colors = {"ours": "tab:blue", "stock": "tab:orange", "bmm": "tab:gray"}
    styles = {"r16": ":", "r64": "--", "mix8-64": "-"}
    for col, (model, mod) in enumerate(panels):
        for row_i, mode in enumerate(("decode", "prefill")):
            ax = axes[row_i][col]
            for rset, style in styles.items():
                rs = [r for r in rows if (r["model"], r["module"], r["ranks"], r["mode"])
                      == (model, mod, rset, mode)]  # fmt: skip
                for impl, color in colors.items():
                    pts = [(r["tokens"], r[f"us_{impl}"]) for r in rs if f"us_{impl}" in r]
                    if pts:
                        ax.plot(*zip(*pts), style, color=color, marker=".",
                                label=f"{impl} {rset}")  # fmt: skip
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"{model} {mod} {mode}", fontsize=9)
            ax.set_xlabel("tokens in batch", fontsize=8)
            if col == 0:
                ax.set_ylabel("GPU us per call", fontsize=8)
            ax.grid(True, alpha=0.3, which="both")
            ax.tick_params(labelsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_json(out, args, rows, wall, variants):
    import torch
    import triton

    meta = dict(
        command="python -m benchmarks.kernels" + (" --quick" if args.quick else "")
        + (" --dry-run" if args.dry_run else "")
        + (f" --pages {args.pages}" if args.pages != "blocks" else ""),
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        torch=torch.__version__, triton=triton.__version__, wall_s=wall,
        dtype="float16", page_width=(DRY if args.dry_run else FULL).d, pages=args.pages,
        block_rows=BLOCK_ROWS,
        timing="us_*: GPU time per call from CUDA-graph replays, L2 evicted before each "
        "call, flush-only graph subtracted (graph_us); eager_us_*: triton.testing.do_bench "
        "median of eager calls, L2 flushed",
    )  # fmt: skip
    try:
        import vllm

        meta["vllm"] = vllm.__version__
    except ImportError:
        pass
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as fh:
        json.dump({"meta": meta, "rows": rows, "variants": variants}, fh, indent=1)
    print(f"wrote {out}")
