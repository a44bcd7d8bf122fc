"""The package as pip installs it: entry point, package list, patches."""

from __future__ import annotations

import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_entry_point_is_registered():
    eps = {ep.name: ep for ep in entry_points(group="vllm.general_plugins")}
    assert "vllm_slora" in eps
    assert eps["vllm_slora"].load().__module__ == "vllm_slora.activation"


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"vllm_slora." + ".".join(p.parent.relative_to(ROOT / "vllm_slora").parts)
             for p in (ROOT / "vllm_slora").rglob("__init__.py")}
    found = {f.rstrip(".") for f in found} | {"vllm_slora.patches"}
    assert found <= listed, f"add to pyproject.toml packages: {sorted(found - listed)}"


def test_patches_install_as_vllm_slora_patches():
    import vllm_slora.patches as patches

    assert Path(patches.__file__).resolve().parent == ROOT / "patches"
    for entry in patches.CLI_PATCHES + patches.MODE_PATCHES:
        name, _, function = entry.partition(":")  # "module:function": a part applied on its own
        mod = __import__(f"vllm_slora.patches.{name}", fromlist=["apply"])
        assert mod.__doc__ and "Why" in mod.__doc__, f"{name}: docstring must say why"
        assert mod.TARGET.startswith("vllm."), name
        assert callable(getattr(mod, function or "apply"))
        if function:
            assert f"``{function}``" in mod.__doc__, f"{entry}: the docstring must say why"
        assert f"`{name}.py`" in (ROOT / "patches" / "README.md").read_text(), \
            f"patches/README.md has no row for {name}.py"


def test_guard_refuses_a_changed_target():
    import vllm.engine.arg_utils as arg_utils

    from vllm_slora.patches import PatchTargetChanged, guard

    guard(arg_utils, "EngineArgs.add_cli_args")
    with pytest.raises(PatchTargetChanged, match="EngineArgs.no_such_method"):
        guard(arg_utils, "EngineArgs.no_such_method")


def test_the_copied_row_parallel_forward_is_guarded():
    from vllm_slora.tensor_parallel import check_row_parallel_copy
    from vllm_slora.patches import PatchTargetChanged

    check_row_parallel_copy()  # this vLLM's original is the one copied

    def forward(self, input_):  # another vLLM's
        return self.quant_method.apply(self, input_, None)

    with pytest.raises(PatchTargetChanged, match="copies vLLM 0.26-0.34's RowParallelLinear.forward"):
        check_row_parallel_copy(forward)


def test_the_engine_never_imports_test_or_benchmark_code():
    """Every module the engine can run, imported in a fresh process, pulls in
    nothing of ``vllm_slora.testing`` (tiny models, baselines, references)
    or ``benchmarks``: the runtime package holds what runs."""
    import subprocess
    import sys

    code = """
import importlib, pathlib, pkgutil, sys
import vllm_slora, vllm_slora.patches
root = pathlib.Path(vllm_slora.__file__).parent
names = [".".join(("vllm_slora",) + p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
         for p in root.rglob("*.py") if p.relative_to(root).parts[0] not in ("testing", "demo.py")]
names += ["vllm_slora.patches." + m.name for m in pkgutil.iter_modules(vllm_slora.patches.__path__)]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.startswith(("vllm_slora.testing", "benchmarks")))
print(len(names), leaked)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd="/", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    count, leaked = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(count) > 40, out.stdout  # the walk found the package's modules
    assert leaked == "[]", f"the engine's modules import {leaked}"


def test_every_touch_point_exists_in_this_vllm():
    """Every ``TOUCHES`` table (patches and the engine modules outside them,
    as the drift check reads them) holds on the installed vLLM: each
    attribute meant for this release exists. In a child process: importing
    that much of vLLM on CPU swaps Triton for vLLM's placeholder, which the
    kernel tests' interpreter must not see."""
    import subprocess

    code = """
from collections import defaultdict
from vllm_slora.compat import touch_points
from vllm_slora.patches import guard_touches
tables = defaultdict(lambda: defaultdict(list))
for p in touch_points():
    tables[(p.owner, p.table)][p.module].append(f"{p.attribute}@{p.span}")
assert len(tables) >= 20, len(tables)
for table in tables.values():
    guard_touches({module: tuple(attrs) for module, attrs in table.items()})
print("checked", len(tables))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "checked" in proc.stdout, proc.stderr[-3000:]
