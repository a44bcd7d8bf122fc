"""``python -m benchmarks.kernels --dry-run`` runs on CPU (about 10 s).

It runs the kernels under Triton's interpreter, on GPU machines too (where it
used to fail on newer numpy: ``vllm_slora/kernels/_interp.py``). The dry run
is a CPU smoke test, so the subprocess is given no GPU.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_dry_run(tmp_path):
    out = tmp_path / "kernels.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernels", "--dry-run", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "worst relative error" in proc.stdout and out.exists()


def test_benchmark_dry_run_random_pages(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernels", "--dry-run", "--pages", "random"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_block_page_layout_is_the_engines():
    """Every page in one row; a vector's pages consecutive; an adapter's pages
    fill whole blocks of its own (as the engine allocates them)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.kernels.cases import BLOCK_ROWS, page_tables

    k, ns, d, ranks = 4096, [4096, 1024], 256, [8, 64, 1, 16]
    tables, num_rows = page_tables(torch, k, ns, ranks, d, "blocks", seed=0)
    rows = torch.cat([t.reshape(-1) for t in tables])
    assert rows.unique().numel() == rows.numel() and int(rows.max()) < num_rows
    for t in tables:
        assert torch.equal(t[:, 1:] - t[:, :-1], torch.ones_like(t[:, 1:]))
    start = 0
    for r in ranks:
        mine = torch.cat([t[start : start + r].reshape(-1) for t in tables])
        blocks = (mine // BLOCK_ROWS).unique()
        assert blocks.numel() == -(-mine.numel() // BLOCK_ROWS)
        start += r
    others = torch.cat([tables[i].reshape(-1) for i in range(4)])
    assert (others // BLOCK_ROWS).unique().numel() == sum(
        -(-r * (2 * k + sum(ns)) // d // BLOCK_ROWS) for r in ranks
    )


def test_lora_step_dry_run_engine_pages(tmp_path):
    # The decode step's kernels under a knob variant, pages placed as the
    # engine places them; every case checked against the reference.
    out = tmp_path / "lora-step.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.lora_step", "--dry-run", "--pages", "random,blocks",
         "--variants", "devsplit", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    import json

    cases = json.loads(out.read_text())["cases"]
    assert {c["pages"] for c in cases} == {"random", "blocks"}
    assert all(c["variant"] == "devsplit" and c["max_rel_err"] < 1e-4 for c in cases)


def test_programs_per_sm():
    sys.path.insert(0, str(ROOT))
    from benchmarks.regs import programs_per_sm

    # The q,k,v shrink: 72 KB of pipeline buffers leave room for 3 programs.
    assert programs_per_sm(96, 72 * 1024, 4) == 3
    # Registers bind: 200 a thread x 8 warps is 51,200 of the SM's 65,536.
    assert programs_per_sm(200, 8 * 1024, 8) == 1
    # Warps bind: 64 a SM.
    assert programs_per_sm(32, 0, 16) == 4


def test_regs_compiles_the_kernels_for_hopper():
    # The launches of a decode step's o call, caught and compiled for sm_90
    # on this machine (no GPU): registers, shared memory, programs an SM.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.regs", "--modules", "o", "--variants", "default"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [r.split("|")[1:-1] for r in proc.stdout.splitlines() if r.startswith("| default")]
    assert [r[2].strip() for r in rows] == ["shrink_kernel", "expand_kernel"]
    for r in rows:
        regs, smem_kb, programs = int(r[4]), int(r[6]), int(r[7])
        assert 0 < regs <= 255 and smem_kb > 0 and programs >= 1


def test_lora_step_rejects_an_unknown_placement():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.lora_step", "--dry-run", "--pages", "random,rows"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 2 and "random and/or blocks" in proc.stderr


def test_kernel_table_lists_each_modules_kernels():
    # `lora_step --kernels`: one line per case and module, its kernels by time.
    sys.path.insert(0, str(ROOT))
    from benchmarks.lora_step import kernel_table

    rows = [{"pages": "blocks", "batch": 216, "adapters": 216, "variant": "devsplit",
             "kernel_us": {"qkv": {"_shrink_kernel": 70.04, "_expand_kernel": 81.26},
                           "o": {"_expand_kernel": 30.0}}},
            {"batch": 216, "adapters": 5, "variant": "default"}]  # timed without --kernels
    lines = kernel_table(rows).splitlines()
    assert lines[2:] == ["| blocks | 216 | 216 | devsplit | qkv | shrink_kernel 70.0, "
                         "expand_kernel 81.3 |",
                         "| blocks | 216 | 216 | devsplit | o | expand_kernel 30.0 |"]
