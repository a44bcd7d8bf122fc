"""Stand-in for the CUTLASS DSL (``cutlass``) and QuACK (``quack``, kernels
written in it), absent from the GPU bundle.

vLLM 0.34's kernel warm-up imports a MiniMax-M3 module for every model
(``kernel_warmup`` -> ``minimax_m3_msa_warmup``), which imports ``cutlass``
and ``quack`` and builds CuTe DSL kernels at import. On PYTHONPATH only when
SLORA_CUTLASS_STUB=1 (scripts/gpu_graphs_run.sh): every name of it and of
its submodules is a permissive placeholder (attributes, calls, subscripts,
decorators and base classes all succeed), so such modules import; nothing
built from it may run, and a dense model runs none of it.
"""

import importlib.abc
import importlib.machinery
import sys
import types


class _Any:
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Any(f"{self._name}.{name}")

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]  # used as a decorator
        return _Any(f"{self._name}(...)")

    def __getitem__(self, key):
        return _Any(f"{self._name}[...]")

    def __mro_entries__(self, bases):
        return (object,)

    def __iter__(self):
        return iter(())

    def __bool__(self):
        return False

    def __repr__(self):
        return f"<cutlass stand-in {self._name}>"

    def _same(self, *args, **kwargs):
        return self

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = _same
    __floordiv__ = __mod__ = __pow__ = __or__ = __ror__ = __and__ = __neg__ = _same
    __lt__ = __le__ = __gt__ = __ge__ = _same

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Any(f"{self.__name__}.{name}")


STUBBED = ("cutlass", "quack")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in STUBBED and fullname != __name__:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
sys.modules[__name__].__class__ = _Module
