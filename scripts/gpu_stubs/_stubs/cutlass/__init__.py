"""Stand-in for the CUTLASS DSL (``cutlass``), absent from the GPU bundle.

On PYTHONPATH only when SLORA_CUTLASS_STUB=1 (scripts/gpu_run.sh): importing
it and its submodules works; using anything from it raises ImportError, the
error vLLM's optional-kernel paths catch.
"""

import importlib.abc
import importlib.machinery
import sys
import types


class _Missing(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"cutlass.{name}: the CUTLASS DSL is not installed (stand-in)")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("cutlass."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Missing(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
sys.modules[__name__].__class__ = _Missing
