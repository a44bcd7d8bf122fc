"""The package as users install it: sdist and wheel built, the wheel installed
(not editable) in a fresh virtual environment beside vLLM, used from a
directory outside the repository, then uninstalled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from vllm_slora.testing.runner import EAGER_ENV  # the engines below run eager
from vllm_slora.versions import installed as installed_vllm

ROOT = Path(__file__).resolve().parents[2]

GENERATE = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
model, adapter = sys.argv[1], sys.argv[2]
llm = LLM(model=model, skip_tokenizer_init=True, enable_lora=True, max_lora_rank=16, seed=0, dtype="float32",
          enforce_eager=True)
prompts = [TokensPrompt(prompt_token_ids=[3 + (5 * i + j) % 200 for j in range(9 + 4 * i)]) for i in range(3)]
lora = LoRARequest("a", 1, adapter)
# Adapter requests only: stock's CPU ops give requests without one the last slot's adapter.
outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                    lora_request=[lora] * 3, use_tqdm=False)
print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""



def run(cmd, cwd, env=None, timeout=600):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **EAGER_ENV, **(env or {})})
    return proc, proc.stdout + proc.stderr


def tokens(out: str):
    return json.loads(next(line for line in out.splitlines() if line.startswith("TOKENS "))[7:])


def fresh_venv(path: Path) -> Path:
    """A new virtual environment that sees this one's vLLM and torch (a .pth to
    a view of its site-packages without vllm_slora, so nothing of the
    editable install leaks in) instead of installing them again."""
    base = Path(sysconfig.get_paths()["purelib"])
    view = path.parent / "base-site"
    view.mkdir()
    for entry in base.iterdir():
        if not entry.name.lower().startswith(("vllm_slora", "__editable__", "vllm-slora")):
            (view / entry.name).symlink_to(entry)
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(path)],
                   check=True)
    python = path / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz-beside-vllm.pth").write_text(str(view) + "\n")
    return python


@pytest.mark.slow
def test_wheel_beside_vllm_from_anywhere_then_uninstalled(tmp_path, tiny_model):
    from vllm_slora.testing.adapters import make_peft_adapter

    dist = tmp_path / "dist"
    proc, out = run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, ROOT], cwd=tmp_path)
    assert proc.returncode == 0, out[-3000:]
    wheel = next(dist.glob("vllm_slora-*.whl"))
    assert next(dist.glob("vllm_slora-*.tar.gz"))  # the wheel was built from this sdist
    names = zipfile.ZipFile(wheel).namelist()
    assert "vllm_slora/patches/vllm_envs.py" in names and "vllm_slora/kernels/__init__.py" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt")))
    assert b"vllm_slora = vllm_slora:register" in entry_points

    python = fresh_venv(tmp_path / "venv")
    proc, out = run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], cwd=tmp_path)
    assert proc.returncode == 0, out[-3000:]
    away = tmp_path / "elsewhere"
    away.mkdir()
    proc, out = run([python, "-c", "import vllm_slora, vllm; print(vllm_slora.__file__, vllm_slora.__version__)"],
                    cwd=away)
    assert proc.returncode == 0 and str(tmp_path / "venv") in out and "0.1.0" in out, out[-3000:]
    proc, out = run([python, "-m", "vllm.entrypoints.cli.main", "serve", "--help=plugin"], cwd=away)
    assert proc.returncode == 0 and "--plugin NAME" in out, out[-3000:]

    adapter = make_peft_adapter(tmp_path / "adapter", tiny_model, 8, seed=3)
    job = [python, "-c", GENERATE, tiny_model, adapter]
    proc, out = run(job, cwd=away)
    assert proc.returncode == 0, out[-3000:]
    stock = tokens(out)
    proc, out = run(job, cwd=away, env={"VLLM_SLORA": "1"})
    assert proc.returncode == 0, out[-3000:]
    assert f"vllm_slora 0.1.0: S-LoRA mode on (vLLM {installed_vllm()}" in out  # really in S-LoRA mode
    assert "read adapters from KV-cache pages" in out
    assert tokens(out) == stock

    # From the repository's root, Python imports the source tree first, which
    # has no vllm_slora.patches: refused with the fix, not a bare import error.
    proc, out = run([python, "-c", "import vllm_slora.activation as a; a.patches()"], cwd=ROOT)
    assert proc.returncode != 0 and "imported from its source tree" in out and "pip install -e" in out

    proc, out = run([python, "-m", "pip", "uninstall", "-y", "vllm-slora"], cwd=away)
    assert proc.returncode == 0, out[-3000:]
    proc, out = run([python, "-m", "vllm.entrypoints.cli.main", "serve", "--help"], cwd=away)
    assert proc.returncode == 0 and "--plugin" not in out, out[-3000:]
    proc, out = run(job, cwd=away, env={"VLLM_SLORA": "1"})  # the variable alone does nothing now
    assert proc.returncode == 0 and "S-LoRA mode on" not in out, out[-3000:]
    assert tokens(out) == stock
