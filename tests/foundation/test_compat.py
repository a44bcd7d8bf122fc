"""The drift check (``python -m vllm_slora.compat``) on two made-up releases:
what it finds for a touch point that stayed, changed, moved or went, and
what it says of a release outside the supported range."""

from __future__ import annotations

import zipfile

from vllm_slora.compat import Release, TouchPoint, check, main, render, touch_points

OLD = {
    "vllm/__init__.py": "",
    "vllm/core.py": (
        "from vllm.helpers import *\n"
        "from vllm.spec import Spec as KVSpec\n\n"
        "class Engine:\n"
        "    size: int = 4\n\n"
        "    def step(self):\n"
        "        return 1\n\n"
        "    def add(self, x):\n"
        "        return x\n\n"
        "def plan(n):\n"
        "    return n\n"),
    "vllm/helpers.py": "def helper():\n    return 0\n",
    "vllm/spec.py": "class Base:\n    page: int = 1\n\nclass Spec(Base):\n    pass\n",
}
NEW = dict(OLD)
NEW["vllm/core.py"] = (
    "from vllm.helpers import *\n"
    "from vllm.spec import Spec as KVSpec\n\n"
    "class Engine:\n"
    "    size: int = 4\n\n"
    "    def step(self):\n"
    "        return 2  # changed\n\n"
    "    def add(self, x):\n"
    "        return x\n")
NEW["vllm/planning.py"] = "def plan(n):\n    return n\n"  # moved here


def make_wheel(path, files):
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def point(attribute, module="vllm.core", span="0.26-"):
    return TouchPoint("patches/x.py", "TOUCHES", module, attribute, span)


def test_each_kind_of_drift(tmp_path):
    old = Release("0.34.0", make_wheel(tmp_path / "old.whl", OLD))
    new = Release("0.35.0", make_wheel(tmp_path / "new.whl", NEW))
    points = [point("Engine.add"), point("Engine.step"), point("plan"), point("Engine.gone"),
              point("helper"),  # through ``import *``
              point("KVSpec.page"),  # re-exported class, field of its base
              point("Engine.size", span="0.26-0.33"), point("Engine.size", span="0.35-")]
    got = {(f.point.attribute, f.point.span): f for f in check(points, new, old)}
    assert got["Engine.add", "0.26-"].status == "same"
    assert got["Engine.step", "0.26-"].status == "changed"
    assert got["Engine.step", "0.26-"].detail == "vllm/core.py: +1 -1 lines"
    assert got["plan", "0.26-"].status == "moved" and "vllm/planning.py" in got["plan", "0.26-"].detail
    assert got["Engine.gone", "0.26-"].status == "gone"
    assert got["helper", "0.26-"].status == "same" and got["helper", "0.26-"].detail == "vllm/helpers.py"
    assert got["KVSpec.page", "0.26-"].status == "same"
    assert got["Engine.size", "0.26-0.33"].status == "not applicable"
    assert got["Engine.size", "0.35-"].status == "new"
    report = render(list(got.values()), "0.35.0", "0.34.0")
    assert "The guards refuse vLLM 0.35.0: the plugin supports 0.26.0 to 0.34.x" in report
    rows = [line for line in report.splitlines() if line.startswith("| `")]
    assert len(rows) == len(points) and rows[0].startswith("| `vllm.core:Engine.gone`")  # worst first


def test_the_command_writes_its_report(tmp_path, capsys):
    make_wheel(tmp_path / "vllm-0.33.0-py3-none-any.whl", OLD)
    make_wheel(tmp_path / "vllm-0.34.0-py3-none-any.whl", NEW)
    out = tmp_path / "report.md"
    assert main(["0.34.0", "--wheels", str(tmp_path), "--out", str(out)]) == 0  # against 0.33.0
    text = out.read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    assert text.startswith("# Drift report: vLLM 0.34.0 against 0.33.0")
    assert "The guards accept vLLM 0.34.0" in text
    assert f"{len(touch_points())} touch points" in text  # the plugin's own tables


def test_touch_points_cover_every_patch():
    owners = {p.owner for p in touch_points()}
    from pathlib import Path

    patches = {f"patches/{p.name}" for p in (Path(__file__).parents[2] / "patches").glob("vllm_*.py")}
    assert patches <= owners, patches - owners
