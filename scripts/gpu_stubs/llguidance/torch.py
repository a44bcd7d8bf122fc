"""Stand-in for llguidance, left out of the GPU bundle (64 MiB a call).

vLLM 0.34 names ``llguidance.LLMatcher`` in a class annotation at import
(``vllm/v1/structured_output/backend_guidance.py``), so the module must
exist; only structured outputs with the guidance backend use it, which the
benchmarks and tests never ask for. Every name is a placeholder type whose
use raises ImportError.
"""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise ImportError(f"llguidance.{name}: llguidance is not in this bundle (stand-in)")

    return type(name, (), {"__init__": missing, "__call__": missing})
