"""The scheduler -> worker message of unified paging, one per scheduler step.

It rides on ``SchedulerOutput`` as the extra attribute ``slora`` (a plain
dataclass attribute survives the pickling of vLLM's multiproc executor; see
docs/unified-paging.md). Workers apply ``events`` in order before the step's
forward pass, so an eviction followed by a load into the same blocks is safe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_slora.memory.layout import AdapterMeta

ATTR = "slora"
# The worker -> scheduler answer: adapters whose upload failed during a step
# (lora id -> cause), on that step's ``ModelRunnerOutput``.
FAULTS_ATTR = "slora_faults"


@dataclass
class Load:
    lora_id: int
    path: str
    block_ids: list[int]
    # What the scheduler read of the adapter's files when it checked them
    # (layout.AdapterMeta), so that the worker does not read them again;
    # None: the worker reads them.
    meta: AdapterMeta | None = None


@dataclass
class Evict:
    lora_id: int


@dataclass
class PagingPlan:
    events: list[Load | Evict] = field(default_factory=list)
    # Adapters of the next waiting requests (paths): the worker reads their
    # files ahead into the OS page cache (``read_ahead.py``).
    prefetch: list[str] = field(default_factory=list)
    # The scheduler-side counters after this step (AdapterPool.stats()).
    stats: dict = field(default_factory=dict)
