"""Compatibility shim for Triton's CPU interpreter (TRITON_INTERPRET=1).

Triton 3.6's interpreter holds scalars as 1-element numpy arrays and gives
its tensors ``__index__ = int(array)``, which newer numpy rejects ("only
0-dimensional arrays can be converted to Python scalars"; a
DeprecationWarning on numpy 2.3). Any ``range(..., runtime_int, ...)`` in a
kernel hits it, so the CPU dry run failed on machines with a newer numpy.
``patch()`` makes ``__index__`` take the single element explicitly. It
changes nothing outside interpreted kernels and is a no-op without
TRITON_INTERPRET=1.
"""

import os

_PATCHED = False


def patch() -> None:
    global _PATCHED
    if _PATCHED or os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - other Triton layouts
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:  # pragma: no cover
        return

    def _index(self):
        data = self.handle.data
        return int(data.reshape(-1)[0]) if data.size == 1 else int(data)

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    interpreter._patch_lang_tensor = _patch_lang_tensor
    _PATCHED = True
