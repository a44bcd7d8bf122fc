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
- **packed adapter**: per layer, the ``[rows, D]`` block of pages an adapter
  fills, in the order given by ``AdapterMeta.offsets``; the pager copies it
  into the pool rows of the adapter's blocks with one indexed copy per layer.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

# Module kinds in packing order, with the packed vLLM layer each belongs to.
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
GROUPS = {"qkv_proj": PACKED["qkv_proj"], "o_proj": ("o_proj",),
          "gate_up_proj": PACKED["gate_up_proj"], "down_proj": ("down_proj",)}
MAX_PAGE_WIDTH = 256
ADAPTER_FILE = "adapter_model.safetensors"
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


def largest_pow2_divisor(n: int, cap: int) -> int:
    return min(n & -n, cap)


@dataclass(frozen=True)
class PageGeometry:
    """Page width D and block capacity, the same in scheduler and workers."""

    page_width: int  # D
    dtype: torch.dtype  # adapter dtype (= vLLM's lora_dtype)
    rows_per_block: int  # pages per block per layer
    num_layers: int
    widths: tuple[tuple[int, int], ...]  # (K, N) per kind, in KINDS order

    @classmethod
    def create(cls, hf_config, dtype: torch.dtype, page_size_bytes: int) -> "PageGeometry":
        """D = largest power of two <= 256 dividing every width and half a block.

        Half a block: some KV layouts keep K and V of a block in two ranges.
        """
        widths = module_widths(hf_config)
        esize = torch.empty((), dtype=dtype).element_size()
        if page_size_bytes % (2 * esize):
            raise ValueError(f"KV block of {page_size_bytes} bytes per layer cannot hold "
                             f"{dtype} pages; use a KV cache dtype whose block is a "
                             f"multiple of {2 * esize} bytes")
        g = math.gcd(page_size_bytes // (2 * esize), *[w for kn in widths.values() for w in kn])
        d = largest_pow2_divisor(g, MAX_PAGE_WIDTH)
        return cls(page_width=d, dtype=dtype, rows_per_block=page_size_bytes // (d * esize),
                   num_layers=hf_config.num_hidden_layers,
                   widths=tuple(widths[k] for k in KINDS))

    def width(self, kind: str) -> tuple[int, int]:
        return self.widths[KINDS.index(kind)]

    def rows_per_rank(self, kinds) -> int:
        """Pages per layer one rank of an adapter on ``kinds`` takes."""
        return sum(sum(self.width(k)) for k in kinds) // self.page_width

    def blocks_for(self, rank: int, kinds) -> int:
        """Blocks an adapter of ``rank`` on ``kinds`` needs (its pages, in blocks)."""
        return -(-rank * self.rows_per_rank(kinds) // self.rows_per_block)


@dataclass(frozen=True)
class AdapterMeta:
    """What the scheduler and the pager need to know of a PEFT folder."""

    path: str
    rank: int
    kinds: tuple[str, ...]  # module kinds the adapter has, in KINDS order
    scale: float  # lora_alpha / r (or / sqrt(r) with rslora)

    def offsets(self, geo: PageGeometry) -> dict[str, tuple[int, int]]:
        """Row offset of each kind's A vectors and B vectors in the packed adapter."""
        out, row = {}, 0
        for kind in self.kinds:
            k, n = geo.width(kind)
            out[kind] = (row, row + self.rank * k // geo.page_width)
            row += self.rank * (k + n) // geo.page_width
        return out

    def rows(self, geo: PageGeometry) -> int:
        return self.rank * geo.rows_per_rank(self.kinds)


def split_key(key: str) -> tuple[int, str, str] | None:
    """'...layers.3.self_attn.q_proj.lora_A.weight' -> (3, 'q_proj', 'A')."""
    m = _KEY.search(key)
    return (int(m.group(1)), m.group(2), m.group(3)) if m else None


@functools.lru_cache(maxsize=65536)
def read_adapter_meta(path: str) -> AdapterMeta:
    """Rank, module kinds and scale of a PEFT folder (reads only headers)."""
    from safetensors import safe_open

    folder = Path(path)
    cfg_file, weights = folder / "adapter_config.json", folder / ADAPTER_FILE
    if not cfg_file.exists() or not weights.exists():
        raise FileNotFoundError(f"adapter folder '{path}' needs adapter_config.json and "
                                f"{ADAPTER_FILE} (save it with PEFT's save_pretrained)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"adapter '{path}' has rank_pattern/alpha_pattern; paged LoRA needs "
                         f"one rank per adapter: re-save it without per-module ranks")
    kinds, rank = set(), None
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            parts = split_key(key)
            if parts is None or parts[1] not in KINDS:
                raise ValueError(f"adapter '{path}' has weight '{key}'; paged LoRA supports "
                                 f"only LoRA A/B of {', '.join(KINDS)}")
            shape = f.get_slice(key).get_shape()
            r = shape[0] if parts[2] == "A" else shape[1]
            if rank is not None and r != rank:
                raise ValueError(f"adapter '{path}': '{key}' has rank {r}, others {rank}; "
                                 f"paged LoRA needs one rank per adapter")
            rank = r
            kinds.add(parts[1])
    if rank is None:
        raise ValueError(f"adapter '{path}' has no LoRA weights")
    # A fused vLLM layer (qkv_proj, gate_up_proj) runs one kernel call for all
    # its slices, which share the adapter's rank: an adapter on q and v also
    # gets (zero) k pages.
    for group in PACKED.values():
        if kinds & set(group):
            kinds |= set(group)
    alpha = cfg.get("lora_alpha", rank)
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    return AdapterMeta(path=str(path), rank=rank,
                       kinds=tuple(k for k in KINDS if k in kinds), scale=float(scale))


def pack_adapter(meta: AdapterMeta, geo: PageGeometry, tensors: dict) -> torch.Tensor:
    """PEFT tensors -> packed adapter ``[num_layers, rows, D]`` in the adapter dtype.

    Layers or kinds the adapter does not have are left zero.
    """
    d, r = geo.page_width, meta.rank
    packed = torch.zeros(geo.num_layers, meta.rows(geo), d, dtype=geo.dtype)
    offsets = meta.offsets(geo)
    for key, t in tensors.items():
        layer, kind, ab = split_key(key)
        if layer >= geo.num_layers:
            raise ValueError(f"adapter '{meta.path}': '{key}' is for layer {layer}, "
                             f"the model has {geo.num_layers}")
        k, n = geo.width(kind)
        a_off, b_off = offsets[kind]
        want = (r, k) if ab == "A" else (n, r)
        if tuple(t.shape) != want:
            raise ValueError(f"adapter '{meta.path}': '{key}' has shape {tuple(t.shape)}, "
                             f"the model needs {want}; was it trained for another model?")
        if ab == "A":  # [r, K]: rank-vectors are rows
            rows = t.reshape(r * k // d, d)
            packed[layer, a_off:a_off + rows.shape[0]] = rows
        else:  # [N, r]: rank-vectors are columns
            rows = t.t().reshape(r * n // d, d)
            packed[layer, b_off:b_off + rows.shape[0]] = rows
    return packed
