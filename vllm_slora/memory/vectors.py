"""Vector tables: which pool rows hold each resident rank-vector.

One index space of vectors for all module kinds: an adapter of rank r gets
the range ``start .. start+r-1`` (first fit) and, for each kind it has, its
A- and B-vectors' page rows are written into that kind's ``a_rows`` /
``b_rows`` at those indices.

The tables have a fixed capacity (``vector_capacity``), allocated once when
the KV cache exists, so that CUDA graphs captured with them never see them
move. When free indices are fragmented, ``compact`` moves resident ranges to
the front (row ids only, never weights) and reports the new starts.
"""

from __future__ import annotations

import torch

from vllm_slora.memory.layout import GROUPS, KINDS, AdapterMeta, PageGeometry

# At most this many resident rank-vectors (sum of resident ranks): 1,024
# adapters of rank 128. Keeps the tables of a large KV pool small (7B: 160 MB).
MAX_VECTORS = 1 << 17


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
        self.a_rows: dict[str, torch.Tensor] = {}
        self.b_rows: dict[str, torch.Tensor] = {}
        for kind in KINDS:
            k, n = geometry.width(kind)
            self.a_rows[kind] = torch.zeros(capacity, k // d, dtype=torch.int32, device=device)
            self.b_rows[kind] = torch.zeros(capacity, n // d, dtype=torch.int32, device=device)
        self.group_tables = {g: ([self.a_rows[k] for k in kinds], [self.b_rows[k] for k in kinds])
                             for g, kinds in GROUPS.items()}

    @property
    def resident(self) -> int:
        return sum(self.used.values())

    def fits(self, rank: int) -> bool:
        return self.resident + rank <= self.capacity

    def add(self, meta: AdapterMeta, rows: torch.Tensor) -> int:
        """Reserve ``meta.rank`` vectors and write their page rows; return start.

        Call ``compact`` first when ``find(meta.rank)`` is None but ``fits``.
        """
        start = self.find(meta.rank)
        if start is None:
            raise RuntimeError(f"vector tables full: {self.resident} of {self.capacity} vectors "
                               f"resident, an adapter of rank {meta.rank} does not fit")
        self._take(start, meta.rank)
        d, r = self.geo.page_width, meta.rank
        for kind, (a_off, b_off) in meta.offsets(self.geo).items():
            k, n = self.geo.width(kind)
            ra = self.geo.a_vectors(kind, r)  # < r on TP ranks of column-parallel kinds
            self.a_rows[kind][start:start + ra] = rows[a_off:a_off + ra * k // d].view(ra, k // d)
            self.b_rows[kind][start:start + r] = rows[b_off:b_off + r * n // d].view(r, n // d)
        return start

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
        queued that reads them, so in-flight steps see the old rows.
        """
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
