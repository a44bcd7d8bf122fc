"""Page geometry of unified paging: how adapters sit in the KV-cache pool.

Vocabulary (used everywhere in ``vllm_slora.memory``):

- **block**: a KV-cache block id of vLLM's ``BlockPool``. Block ``b`` is block
  ``b`` of every layer's KV buffer, so one block id gives an adapter room in
  every layer at once (S-LoRA's layout: layer i's adapter vectors sit beside
  layer i's KV vectors).
- **pool**: one layer's KV buffer viewed as ``[num_rows, D]`` in the adapter
  dtype. **page**: one row of the pool. A block holds ``rows_per_block``
  pages in each layer.
- **rank-vector**: a row of A (width K) or a column of B (width N) of one
  module; stored as ``W // D`` pages anywhere in the pool.
- **module kind**: one of the seven Llama projections (``KINDS``).
- **vector table**: per module kind, int32 ``a_rows [V, K//D]`` and ``b_rows
  [V, N//D]``: the pages of each resident rank-vector. An adapter of rank r
  owns vectors ``start .. start+r-1`` of every kind's table. Its pages have
  the same row ids in every layer, so one table per kind serves all layers.
- **layer group**: the module kinds one vLLM layer computes (``GROUPS``:
  qkv_proj = q, k, v; o_proj; gate_up_proj = gate, up; down_proj). An adapter
  has all kinds of a group or none (missing slices are zero pages), so the
  slices of a fused layer share its rank.
- **fused adapter**: one trained on a checkpoint that stores a packed layer
  as one weight (Phi-3's ``qkv_proj``, ``gate_up_proj``), so it has one A
  ``[r, K]`` and one B ``[sum of the slices' N, r]`` per group. It is packed
  as the slices' kinds: the A copied for each slice, the B split by rows
  (``B x A x`` is the slices' outputs in turn, so this is exact). An adapter
  names a group fused or by its slices, not both.
- **packed adapter**: per layer, the ``[rows, D]`` block of pages an adapter
  fills, in the order given by ``AdapterMeta.offsets``; the pager copies it
  into the pool rows of the adapter's blocks with one indexed copy per layer.
- **tensor parallelism** (S-LoRA's partition, ``vllm_slora/testing/tp_reference.py``): with
  ``--tensor-parallel-size P`` every worker's KV blocks hold 1/P of the KV
  heads, and its pages hold its shard of each adapter. Column-parallel kinds
  (q, k, v, gate, up): the A-vectors ``j % P == p`` (full width K; rank p has
  ``len(range(p, r, P))`` of them, at the first indices of the adapter's
  vector range) and every B-vector's rows ``N_p`` (width N / P). Row-parallel
  kinds (o, down): every A-vector's columns ``K_p`` (width K / P) and every
  B-vector's rows ``N_p`` (width N / P). ``PageGeometry.widths`` are these
  per-rank widths; the scheduler budgets every adapter at rank 0's page
  count (the largest), so block ids and vector ranges agree on all ranks.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch

# Module kinds in packing order, with the packed vLLM layer each belongs to.
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
GROUPS = {"qkv_proj": PACKED["qkv_proj"], "o_proj": ("o_proj",),
          "gate_up_proj": PACKED["gate_up_proj"], "down_proj": ("down_proj",)}
# Megatron partition of the vLLM layer each kind belongs to.
COLUMN_PARALLEL = frozenset(PACKED["qkv_proj"] + PACKED["gate_up_proj"])
MAX_PAGE_WIDTH = 256
_KEY = re.compile(r"layers\.(\d+)\.(?:[\w.]+\.)?(\w+)\.lora_([AB])(?:\.default)?\.weight$")


def module_widths(hf_config) -> dict[str, tuple[int, int]]:
    """(K in, N out) of each module kind of a Llama-like ``hf_config``."""
    h = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or h // heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    q, kv, inter = heads * head_dim, kv_heads * head_dim, hf_config.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


MOE_ATTRS = ("num_local_experts", "num_experts", "n_routed_experts")


def is_moe(hf_config) -> bool:
    """A mixture-of-experts model (Mixtral, Qwen MoE, DeepSeek): its MLPs are experts."""
    return any((getattr(hf_config, a, None) or 0) > 0 for a in MOE_ATTRS)


def lora_targets(hf_config) -> tuple[str, ...]:
    """The module kinds paged LoRA serves on this model: all seven, or on a
    mixture-of-experts model the attention projections (its experts are not
    linear layers that paged LoRA wraps)."""
    if is_moe(hf_config):
        return GROUPS["qkv_proj"] + GROUPS["o_proj"]
    return tuple(module_widths(hf_config))


def largest_pow2_divisor(n: int, cap: int) -> int:
    return min(n & -n, cap)


def shard_widths(hf_config, tp_size: int) -> dict[str, tuple[int, int]]:
    """(A-vector width, B-vector width) of each kind on one of ``tp_size`` ranks."""
    full = module_widths(hf_config)
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    if tp_size > 1 and (kv_heads % tp_size or hf_config.num_attention_heads % tp_size):
        raise ValueError(f"vllm_slora shards adapters like the heads: "
                         f"{hf_config.num_attention_heads} query and {kv_heads} KV heads do "
                         f"not split over --tensor-parallel-size {tp_size}")
    out = {}
    for kind, (k, n) in full.items():
        if n % tp_size or k % tp_size:
            raise ValueError(f"{kind} ({k} x {n}) does not split over {tp_size} ranks")
        out[kind] = (k if kind in COLUMN_PARALLEL else k // tp_size, n // tp_size)
    return out


@dataclass(frozen=True)
class PageGeometry:
    """Page width D and block capacity, the same in scheduler and workers."""

    page_width: int  # D
    dtype: torch.dtype  # adapter dtype (= vLLM's lora_dtype)
    rows_per_block: int  # pages per block per layer
    num_layers: int
    widths: tuple[tuple[int, int], ...]  # (A, B vector width) per kind on this rank, KINDS order
    full_widths: tuple[tuple[int, int], ...]  # (K, N) per kind of the whole model
    tp_size: int = 1
    tp_rank: int = 0

    @classmethod
    def create(cls, hf_config, dtype: torch.dtype, page_size_bytes: int, tp_size: int = 1,
               tp_rank: int = 0) -> "PageGeometry":
        """D = largest power of two <= 256 dividing every width and half a block.

        Half a block: some KV layouts keep K and V of a block in two ranges.
        ``page_size_bytes``: one block of one layer on one rank.
        """
        widths = shard_widths(hf_config, tp_size)
        esize = torch.empty((), dtype=dtype).element_size()
        if page_size_bytes % (2 * esize):
            raise ValueError(f"KV block of {page_size_bytes} bytes per layer cannot hold "
                             f"{dtype} pages; use a KV cache dtype whose block is a "
                             f"multiple of {2 * esize} bytes")
        g = math.gcd(page_size_bytes // (2 * esize), *[w for kn in widths.values() for w in kn])
        d = largest_pow2_divisor(g, MAX_PAGE_WIDTH)
        full = module_widths(hf_config)
        return cls(page_width=d, dtype=dtype, rows_per_block=page_size_bytes // (d * esize),
                   num_layers=hf_config.num_hidden_layers,
                   widths=tuple(widths[k] for k in KINDS),
                   full_widths=tuple(full[k] for k in KINDS), tp_size=tp_size, tp_rank=tp_rank)

    def width(self, kind: str) -> tuple[int, int]:
        """(A-vector, B-vector) width of ``kind`` on this rank ((K, N) without TP)."""
        return self.widths[KINDS.index(kind)]

    def a_vectors(self, kind: str, rank: int, tp_rank: int | None = None) -> int:
        """A-vectors of a rank-``rank`` adapter on ``kind`` that a TP rank holds."""
        if kind in COLUMN_PARALLEL and self.tp_size > 1:
            return len(range(self.tp_rank if tp_rank is None else tp_rank, rank, self.tp_size))
        return rank

    def adapter_rows(self, rank: int, kinds, tp_rank: int | None = None) -> int:
        """Pages per layer of a rank-``rank`` adapter on ``kinds`` (on ``tp_rank``)."""
        return sum(self.a_vectors(k, rank, tp_rank) * self.width(k)[0]
                   + rank * self.width(k)[1] for k in kinds) // self.page_width

    def blocks_for(self, rank: int, kinds) -> int:
        """Blocks an adapter of ``rank`` on ``kinds`` needs (its pages, in blocks).

        TP rank 0 holds the most pages; every rank gets that many blocks.
        """
        return -(-self.adapter_rows(rank, kinds, tp_rank=0) // self.rows_per_block)


@dataclass(frozen=True)
class AdapterMeta:
    """What the scheduler and the pager need to know of a PEFT folder."""

    path: str
    rank: int
    kinds: tuple[str, ...]  # module kinds the adapter has, in KINDS order
    scale: float  # lora_alpha / r (or / sqrt(r) with rslora)
    version: tuple = ()  # file_version of the folder when it was read

    def offsets(self, geo: PageGeometry) -> dict[str, tuple[int, int]]:
        """Row offset of each kind's A vectors and B vectors in the packed adapter."""
        out, row = {}, 0
        for kind in self.kinds:
            k, n = geo.width(kind)
            a = geo.a_vectors(kind, self.rank) * k // geo.page_width
            out[kind] = (row, row + a)
            row += a + self.rank * n // geo.page_width
        return out

    def rows(self, geo: PageGeometry) -> int:
        return geo.adapter_rows(self.rank, self.kinds)

    def restricted(self, kinds: frozenset[str] | None) -> "AdapterMeta":
        """This adapter with only the module kinds in ``kinds`` (``deployment_kinds``;
        None: all): the others are neither paged in nor applied."""
        if kinds is None or set(self.kinds) <= kinds:
            return self
        return dataclasses.replace(self, kinds=tuple(k for k in self.kinds if k in kinds))


def deployment_kinds(target_modules) -> frozenset[str] | None:
    """The module kinds vLLM's ``--lora-target-modules`` (``LoRAConfig.target_modules``)
    lets LoRA apply to, as stock vLLM reads it: a layer group whose vLLM layer
    (qkv_proj, o_proj, gate_up_proj, down_proj) or one of whose slices is
    named, all of the group's kinds (its fused layer applies every slice of
    an adapter); None: no restriction. ``ValueError`` for a full module
    path (stock can name one layer's module; paged LoRA serves a group in
    every layer or in none)."""
    if target_modules is None:
        return None
    per_layer = [t for t in target_modules if "." in t]
    if per_layer:
        raise ValueError(f"--lora-target-modules {', '.join(per_layer)}: vllm_slora serves a "
                         f"projection in every layer or in none; name module suffixes "
                         f"(e.g. qkv_proj, o_proj), or drop --plugin vllm_slora")
    named = set(target_modules)
    return frozenset(k for group, kinds in GROUPS.items()
                     if group in named or named & set(kinds) for k in kinds)


def split_key(key: str) -> tuple[int, str, str] | None:
    """'...layers.3.self_attn.q_proj.lora_A.weight' -> (3, 'q_proj', 'A');
    a fused module keeps its name ('qkv_proj': ``PACKED`` gives its kinds)."""
    m = _KEY.search(key)
    return (int(m.group(1)), m.group(2), m.group(3)) if m else None


def adapter_kinds(modules) -> tuple[str, ...]:
    """The module kinds of an adapter's ``modules`` (kinds and fused names),
    with fused groups completed, in ``KINDS`` order; ``ValueError`` for a
    group named both fused and by its slices (which A would the slices take?).
    A fused vLLM layer (qkv_proj, gate_up_proj) runs one kernel call for all
    its slices, which share the adapter's rank: an adapter on q and v also
    gets (zero) k pages."""
    kinds = set()
    for module in modules:
        kinds |= set(PACKED.get(module, (module,)))
    for fused, group in PACKED.items():
        both = [f"'{k}'" for k in group if k in modules]
        if fused in modules and both:
            raise ValueError(f"has LoRA weights for both '{fused}' and {', '.join(both)}; a "
                             f"layer group is either fused or split: re-save the adapter with "
                             f"one of the two")
        if kinds & set(group):
            kinds |= set(group)
    return tuple(k for k in KINDS if k in kinds)


def slice_rows(module: str, widths) -> list[tuple[str, int]]:
    """(kind, rows of B) of each kind a ``module``'s weights hold: a fused
    module's slices in the checkpoint's order, else the kind itself;
    ``widths``: ``module_widths`` (full K, N of each kind)."""
    return [(k, widths[k][1]) for k in PACKED.get(module, (module,))]


def lora_shape(module: str, ab: str, rank: int, widths) -> tuple[int, int]:
    """Shape of ``module``'s LoRA A (``[r, K]``) or B (``[N, r]``; a fused
    module's N is its slices' in turn) at ``rank``; ``widths`` as for ``slice_rows``."""
    rows = slice_rows(module, widths)
    return (rank, widths[rows[0][0]][0]) if ab == "A" else (sum(n for _, n in rows), rank)
