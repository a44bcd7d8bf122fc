"""The plugin's counters, gathered from the engine for tests and benchmarks."""

from __future__ import annotations


def collect(llm) -> dict:
    """Counters of S-LoRA mode for a ``vllm.LLM`` (empty until paging lands)."""
    return {}
