"""Vector tables: which pool rows hold each resident rank-vector.

One index space of vectors for all module kinds: an adapter of rank r gets
the range ``start .. start+r-1`` (first fit) and, for each kind it has, its
A- and B-vectors' page rows are written into that kind's ``a_rows`` /
``b_rows`` at those indices. Tables grow by doubling when no range fits;
moving an adapter in the tables would only copy row ids, never weights.
"""

from __future__ import annotations

import torch

from vllm_slora.memory.layout import GROUPS, KINDS, AdapterMeta, PageGeometry

INITIAL_CAPACITY = 256


class VectorSpace:
    def __init__(self, geometry: PageGeometry, device: torch.device):
        self.geo = geometry
        self.device = device
        self.capacity = 0
        self.free: list[tuple[int, int]] = []  # (start, length), sorted, merged
        self.a_rows: dict[str, torch.Tensor] = {}
        self.b_rows: dict[str, torch.Tensor] = {}
        self.group_tables: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._grow(INITIAL_CAPACITY)

    def add(self, meta: AdapterMeta, rows: torch.Tensor) -> int:
        """Reserve ``meta.rank`` vectors and write their page rows; return start."""
        start = self._reserve(meta.rank)
        d, r = self.geo.page_width, meta.rank
        for kind, (a_off, b_off) in meta.offsets(self.geo).items():
            k, n = self.geo.width(kind)
            ra = self.geo.a_vectors(kind, r)  # < r on TP ranks of column-parallel kinds
            self.a_rows[kind][start:start + ra] = rows[a_off:a_off + ra * k // d].view(ra, k // d)
            self.b_rows[kind][start:start + r] = rows[b_off:b_off + r * n // d].view(r, n // d)
        return start

    def remove(self, start: int, rank: int) -> None:
        self._release(start, rank)

    def _reserve(self, n: int) -> int:
        for i, (s, length) in enumerate(self.free):
            if length >= n:
                self.free[i] = (s + n, length - n)
                if length == n:
                    del self.free[i]
                return s
        self._grow(max(self.capacity, n))
        return self._reserve(n)

    def _release(self, start: int, n: int) -> None:
        self.free.append((start, n))
        self.free.sort()
        merged = [self.free[0]]
        for s, length in self.free[1:]:
            ps, pl = merged[-1]
            if ps + pl == s:
                merged[-1] = (ps, pl + length)
            else:
                merged.append((s, length))
        self.free = merged

    def _grow(self, extra: int) -> None:
        old, new = self.capacity, self.capacity + extra
        d = self.geo.page_width
        for kind in KINDS:
            k, n = self.geo.width(kind)
            self.a_rows[kind] = _grown(self.a_rows.get(kind), new, k // d, self.device)
            self.b_rows[kind] = _grown(self.b_rows.get(kind), new, n // d, self.device)
        self.group_tables = {g: ([self.a_rows[k] for k in kinds], [self.b_rows[k] for k in kinds])
                             for g, kinds in GROUPS.items()}
        self.capacity = new
        self._release(old, extra)


def _grown(table: torch.Tensor | None, rows: int, cols: int, device) -> torch.Tensor:
    out = torch.zeros(rows, cols, dtype=torch.int32, device=device)
    if table is not None:
        out[: table.shape[0]] = table
    return out
