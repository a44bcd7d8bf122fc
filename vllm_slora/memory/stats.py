"""Paging counters of a running ``vllm.LLM``, read from its worker.

The worker keeps its own counters (loads, evictions, pages written, host
cache) and the scheduler's, which arrive with every step's paging plan
(``scheduler``: loads, evictions, reloads, resident adapters and pages, free
blocks, peak resident, most distinct adapters in one step).
"""

from __future__ import annotations


def collect(llm) -> dict:
    """Counters of S-LoRA mode (``{}`` when the mode is off)."""
    from vllm_slora.activation import is_enabled

    return llm.collective_rpc("slora_stats")[0] if is_enabled() else {}
