"""Which part of the plugin's CUDA-graph path breaks the GPU parity test.

    python scripts/gpu_parity_diag.py OUT_DIR [--deadline-s 480]

Runs the parity test's workload (``tests/gpu/test_graphs_parity.py``) under
variants, each in its own process, until the deadline (``--only`` picks):
the plugin with graphs (as the test), with graphs and async scheduling
off, with graphs and no programmatic dependent launch (``VLLM_SLORA_PDL=0``),
with the LoRA op between graph pieces (``VLLM_SLORA_CUDAGRAPH=between-pieces``), eager,
and stock with graphs. Writes ``OUT_DIR/diag.json`` (per variant: ok or the
error's tail; outputs compared with the plugin eager and with stock) and
each failing variant's stderr tail to ``OUT_DIR/<variant>.err``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.gpu.test_graphs_parity import workloads  # noqa: E402
from vllm_slora.testing.compare import compare_runs  # noqa: E402
from vllm_slora.testing.runner import run_workload  # noqa: E402


def variants(base: dict) -> dict:
    g = base["graphs"]
    return {
        "graphs": g,
        "graphs-sync": dataclasses.replace(g, llm_kwargs=dict(g.llm_kwargs, async_scheduling=False)),
        "graphs-nopdl": dataclasses.replace(g, env=dict(g.env, VLLM_SLORA_PDL="0")),
        "eager": base["eager"],
        "between-pieces": base["pieces"],
        "stock": base["stock"],
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--deadline-s", type=float, default=480)
    p.add_argument("--only", default="")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results, report = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = variants(workloads(Path(tmp)))
        for name, w in runs.items():
            if args.only and name not in args.only.split(","):
                continue
            left = args.deadline_s - (time.perf_counter() - started)
            if left < 60:
                report[name] = {"status": "not run (deadline)"}
                continue
            t0 = time.perf_counter()
            try:
                results[name] = run_workload(w, timeout=left - 10)
                report[name] = {"status": "ok", "elapsed_s": round(time.perf_counter() - t0, 1),
                                "cudagraph_mode": results[name].get("cudagraph_mode")}
            except Exception as e:  # noqa: BLE001 - reported, the next variant runs
                text = str(e)
                (args.out / f"{name}.err").write_text(text)
                report[name] = {"status": "failed", "elapsed_s": round(time.perf_counter() - t0, 1),
                                "error": text[-600:]}
            print(name, report[name]["status"], report[name].get("elapsed_s"), flush=True)
            (args.out / "diag.json").write_text(json.dumps(report, indent=1))
    for name, r in results.items():
        for ref in ("eager", "stock"):
            if ref in results and ref != name:
                got = compare_runs(r["outputs"], results[ref]["outputs"])
                report[name][f"vs_{ref}"] = {k: got[k] for k in ("identical", "requests", "clear")}
    (args.out / "diag.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
