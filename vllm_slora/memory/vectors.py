"""Vector tables: which pool rows hold each resident rank-vector.

One index space of vectors for all module kinds: an adapter of rank r gets
the range ``start .. start+r-1`` (first fit) and, for each kind it has, its
A- and B-vectors' page rows are written into that kind's ``a_rows`` /
``b_rows`` at those indices.

Every table is a view of one int32 buffer, so that the entries of all the
adapters a plan pages in reach the device together: ``add`` reserves the
range and queues the entries on the host, ``pending`` hands them over (flat
positions and values), and ``write`` puts them in place with one
``index_copy_`` (the pager sends them with the plan's rows, one copy).

The tables have a fixed capacity (``vector_capacity``), allocated once when
the KV cache exists, so that CUDA graphs captured with them never see them
move. When free indices are fragmented, ``compact`` moves resident ranges to
the front (row ids only, never weights) and reports the new starts.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_slora.memory.layout import GROUPS, KINDS, AdapterMeta, PageGeometry

# At most this many resident rank-vectors (sum of resident ranks): 1,024
# adapters of rank 128. Keeps the tables of a large KV pool small (7B: 160 MB).
MAX_VECTORS = 1 << 17
# Each table starts at a multiple of this many int32 (256 bytes): the
# kernels are compiled for 16-byte aligned pointers.
ALIGN = 64


def vector_capacity(geo: PageGeometry, num_blocks: int) -> int:
    """Resident rank-vectors the tables hold: every vector an adapter can
    have while its pages fit the pool (each rank costs at least the pages of
    one kind's A- and B-vector), capped at ``MAX_VECTORS``. The scheduler and
    the workers compute it alike."""
    fewest = min(geo.adapter_rows(1, [kind], tp_rank=0) for kind in KINDS)
    return max(1, min(MAX_VECTORS, num_blocks * geo.rows_per_block // max(fewest, 1)))


class VectorSpace:
    def __init__(self, geometry: PageGeometry, device: torch.device, capacity: int):
        self.geo = geometry
        self.device = device
        self.capacity = capacity
        self.free: list[tuple[int, int]] = [(0, capacity)]  # (start, length), sorted, merged
        self.used: dict[int, int] = {}  # start -> length
        d = geometry.page_width
        spans, total = {}, 0
        for kind in KINDS:
            k, n = geometry.width(kind)
            for ab, w in (("a", k // d), ("b", n // d)):
                spans[kind, ab] = (total, w)
                total += -(-capacity * w // ALIGN) * ALIGN
        self.table = torch.zeros(total, dtype=torch.int32, device=device)
        self._spans = spans  # (kind, "a" | "b") -> (offset in table, width)
        self.a_rows: dict[str, torch.Tensor] = {}
        self.b_rows: dict[str, torch.Tensor] = {}
        for kind in KINDS:
            for ab, tables in (("a", self.a_rows), ("b", self.b_rows)):
                off, w = spans[kind, ab]
                tables[kind] = self.table[off:off + capacity * w].view(capacity, w)
        self.group_tables = {g: ([self.a_rows[k] for k in kinds], [self.b_rows[k] for k in kinds])
                             for g, kinds in GROUPS.items()}
        # Entries added but not written yet: flat positions, values (host).
        self._positions: list[np.ndarray] = []
        self._values: list[np.ndarray] = []

    @property
    def resident(self) -> int:
        return sum(self.used.values())

    def fits(self, rank: int) -> bool:
        return self.resident + rank <= self.capacity

    def add(self, meta: AdapterMeta, rows: np.ndarray) -> int:
        """Reserve ``meta.rank`` vectors for the adapter whose packed pages
        are pool rows ``rows`` (int64, host); queue their table entries
        (``pending``, ``write``); return the start.

        Call ``compact`` first when ``find(meta.rank)`` is None but ``fits``.
        """
        start = self.find(meta.rank)
        if start is None:
            raise RuntimeError(f"vector tables full: {self.resident} of {self.capacity} vectors "
                               f"resident, an adapter of rank {meta.rank} does not fit")
        self._take(start, meta.rank)
        r = meta.rank
        for kind, (a_off, b_off) in meta.offsets(self.geo).items():
            ra = self.geo.a_vectors(kind, r)  # < r on TP ranks of column-parallel kinds
            for ab, first, count in (("a", a_off, ra), ("b", b_off, r)):
                off, w = self._spans[kind, ab]
                at = off + start * w
                self._positions.append(np.arange(at, at + count * w, dtype=np.int64))
                self._values.append(rows[first:first + count * w])
        return start

    def pending(self) -> tuple[np.ndarray, np.ndarray]:
        """The queued entries (flat positions into ``table``, values), int64,
        handed over: the caller sends them to the device and calls ``write``."""
        if not self._positions:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        out = np.concatenate(self._positions), np.concatenate(self._values).astype(np.int64)
        self._positions, self._values = [], []
        return out

    def write(self, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Entries ``pending`` handed over, now on the tables' device, in place
        (on the current stream: after the steps already queued)."""
        if positions.numel():
            self.table.index_copy_(0, positions, values.to(torch.int32))

    def remove(self, start: int) -> None:
        length = self.used.pop(start)
        self.free.append((start, length))
        self.free.sort()
        merged = [self.free[0]]
        for s, n in self.free[1:]:
            ps, pn = merged[-1]
            if ps + pn == s:
                merged[-1] = (ps, pn + n)
            else:
                merged.append((s, n))
        self.free = merged

    def find(self, n: int) -> int | None:
        return next((s for s, length in self.free if length >= n), None)

    def compact(self) -> dict[int, int]:
        """Move every resident range to the front, in order; {old start: new start}.

        Table rows are copied on the current stream, after the work already
        queued that reads them, so in-flight steps see the old rows. Entries
        still pending would land at the old starts: write them first.
        """
        if self._positions:
            raise RuntimeError("vector table entries are pending: write them before compacting")
        moves, at = {}, 0
        for start in sorted(self.used):
            length = self.used[start]
            if start != at:
                for table in (*self.a_rows.values(), *self.b_rows.values()):
                    table[at:at + length] = table[start:start + length].clone()
            moves[start] = at
            at += length
        self.used = {moves[s]: n for s, n in self.used.items()}
        self.free = [(at, self.capacity - at)] if at < self.capacity else []
        return moves

    def _take(self, start: int, n: int) -> None:
        i = next(i for i, (s, _) in enumerate(self.free) if s == start)
        s, length = self.free[i]
        if length == n:
            del self.free[i]
        else:
            self.free[i] = (s + n, length - n)
        self.used[start] = n
