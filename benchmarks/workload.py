"""S-LoRA's synthetic workload (Sheng et al. 2023, section 7; their
``benchmarks/trace.py``), seeded, written to and replayed from a JSONL trace
so that every system sees the same requests.

- ``n`` adapters; adapter ``i`` has a rank drawn from ``ranks`` by a generator
  seeded with (seed, i), so adapter ``i`` is the same whatever ``n``.
- Popularity: ``x ~ Power(alpha)`` on [0, 1) (density ``alpha x^(alpha-1)``),
  adapter ``floor(x n)``, i.e. ``P(index < k) = (k / n)^alpha``. This is
  S-LoRA's convention: ``alpha = 1`` is uniform, ``alpha < 1`` skews requests
  toward the low indices (adapter 0 the most popular).
- Arrivals: Gamma inter-arrival times of mean ``1 / rate`` and coefficient of
  variation ``cv`` (shape ``1 / cv^2``, scale ``cv^2 / rate``; ``cv = 1`` is
  Poisson).
- Input and output lengths uniform on ``[Il, Iu]`` and ``[Ol, Ou]``
  (inclusive); prompts are random token ids in ``[3, vocab)``; every request
  ignores EOS and generates exactly its output length.

Lengths, prompts and arrival times depend only on (seed, num_requests,
ranges, rate, cv), not on ``n`` or ``alpha``: traces at different ``n`` differ
only in which adapter serves each request, and the no-LoRA base run replays
the very same requests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from vllm_slora.testing.adapters import ALL_SEVEN, ATTN

TARGETS = {"attn": ATTN, "all": ALL_SEVEN}


@dataclass(frozen=True)
class WorkloadSpec:
    n_adapters: int
    num_requests: int
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    targets: str = "attn"  # "attn": q,k,v,o; "all": the seven projections
    alpha: float = 1.0
    rate: float = 1.0  # requests per second (online replay)
    cv: float = 1.0
    input_range: tuple[int, int] = (8, 512)
    output_range: tuple[int, int] = (8, 512)
    vocab_size: int = 32000
    seed: int = 0

    def __post_init__(self):
        if self.targets not in TARGETS:
            raise ValueError(f"targets={self.targets!r}; expected one of {', '.join(TARGETS)}")
        for name, (lo, hi) in (("input_range", self.input_range), ("output_range", self.output_range)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{name}={lo, hi} must satisfy 1 <= low <= high")
        if self.n_adapters < 0 or self.num_requests < 1 or self.alpha <= 0 or self.rate <= 0 or self.cv <= 0:
            raise ValueError(f"invalid workload {self}")


@dataclass(frozen=True)
class Adapter:
    name: str
    rank: int


@dataclass(frozen=True)
class Request:
    i: int
    arrival_s: float
    adapter: str | None  # an Adapter name; None for the no-LoRA base
    prompt: list[int]
    output_len: int


@dataclass
class Trace:
    spec: WorkloadSpec
    adapters: list[Adapter]
    requests: list[Request] = field(default_factory=list)

    def without_adapters(self) -> "Trace":
        """The same requests with no adapter at all (the ``base`` system)."""
        return Trace(replace(self.spec, n_adapters=0), [],
                     [replace(r, adapter=None) for r in self.requests])


def adapter_name(i: int) -> str:
    return f"a{i:04d}"


def adapter_ranks(spec: WorkloadSpec) -> list[Adapter]:
    ranks = list(spec.ranks)
    return [Adapter(adapter_name(i), int(ranks[np.random.default_rng([spec.seed, 2, i]).integers(len(ranks))]))
            for i in range(spec.n_adapters)]


def generate(spec: WorkloadSpec) -> Trace:
    """The seeded trace of ``spec`` (see the module docstring)."""
    rng = np.random.default_rng([spec.seed, 0])
    n = spec.num_requests
    input_lens = rng.integers(spec.input_range[0], spec.input_range[1] + 1, n)
    output_lens = rng.integers(spec.output_range[0], spec.output_range[1] + 1, n)
    intervals = rng.gamma(1.0 / spec.cv**2, spec.cv**2 / spec.rate, n)
    arrivals = np.cumsum(intervals) - intervals[0]  # the first request at t = 0
    prompts = [rng.integers(3, spec.vocab_size, int(length)).tolist() for length in input_lens]

    adapters = adapter_ranks(spec)
    if adapters:
        pick = np.random.default_rng([spec.seed, 1, spec.n_adapters, round(spec.alpha * 1e6)])
        index = np.minimum((pick.power(spec.alpha, n) * len(adapters)).astype(int), len(adapters) - 1)
        names = [adapters[k].name for k in index]
    else:
        names = [None] * n
    requests = [Request(i, round(float(arrivals[i]), 6), names[i], prompts[i], int(output_lens[i]))
                for i in range(n)]
    return Trace(spec, adapters, requests)


def write_trace(path: str | Path, trace: Trace) -> Path:
    """One header line (spec, adapters), then one line per request."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.write(json.dumps({"spec": asdict(trace.spec),
                            "adapters": [asdict(a) for a in trace.adapters]}) + "\n")
        for r in trace.requests:
            f.write(json.dumps(asdict(r)) + "\n")
    return path


def read_trace(path: str | Path) -> Trace:
    lines = Path(path).read_text().splitlines()
    head = json.loads(lines[0])
    spec = head["spec"]
    spec = WorkloadSpec(**{**spec, "ranks": tuple(spec["ranks"]),
                           "input_range": tuple(spec["input_range"]),
                           "output_range": tuple(spec["output_range"])})
    return Trace(spec, [Adapter(**a) for a in head["adapters"]],
                 [Request(**json.loads(line)) for line in lines[1:] if line])
