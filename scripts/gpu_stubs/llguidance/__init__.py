"""Stand-ins for llguidance and outlines_core, left out of the GPU bundle
(64 MiB a call).

vLLM 0.34 names ``llguidance.LLMatcher`` and ``outlines_core.Guide`` in
class annotations at import (``vllm/v1/structured_output/backend_guidance.py``,
``backend_outlines.py``), so the modules must exist; only structured outputs
with those backends use them, which the benchmarks and tests never ask for.
Every name is a placeholder type whose use raises ImportError.
"""


def stand_in(package: str):
    """A module ``__getattr__`` that gives placeholder types for ``package``."""

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise ImportError(f"{package}.{name}: {package} is not in this bundle (stand-in)")

        return type(name, (), {"__init__": missing, "__call__": missing})

    return __getattr__


__getattr__ = stand_in("llguidance")
