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

import functools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

# Module kinds in packing order, with the packed vLLM layer each belongs to.
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
GROUPS = {"qkv_proj": PACKED["qkv_proj"], "o_proj": ("o_proj",),
          "gate_up_proj": PACKED["gate_up_proj"], "down_proj": ("down_proj",)}
# Megatron partition of the vLLM layer each kind belongs to.
COLUMN_PARALLEL = frozenset(PACKED["qkv_proj"] + PACKED["gate_up_proj"])
MAX_PAGE_WIDTH = 256
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
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


def tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a safetensors file, from its header only."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


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


def file_version(path: str) -> tuple:
    """(size, mtime_ns, inode) of an adapter folder's two files, None for a
    missing one: a folder rewritten or replaced in place gets a new version."""
    out = []
    for name in (CONFIG_FILE, ADAPTER_FILE):
        try:
            st = os.stat(Path(path) / name)
            out.append((st.st_size, st.st_mtime_ns, st.st_ino))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def read_adapter_meta(path: str) -> AdapterMeta:
    """Rank, module kinds and scale of a PEFT folder (reads only headers),
    cached per file version: an adapter replaced on disk is read again, so
    every part of the engine budgets and packs the files as they are now."""
    return _read_adapter_meta(str(path), file_version(path))


@functools.lru_cache(maxsize=65536)
def _read_adapter_meta(path: str, version: tuple) -> AdapterMeta:
    # Reads what packing needs, with the checks packing relies on; the front
    # end's full validation, with a message per fault, is
    # ``vllm_slora.adapters.check_adapter``.
    folder = Path(path)
    cfg_file, weights = folder / CONFIG_FILE, folder / ADAPTER_FILE
    if not cfg_file.exists() or not weights.exists():
        raise FileNotFoundError(f"adapter folder '{path}' needs adapter_config.json and "
                                f"{ADAPTER_FILE} (save it with PEFT's save_pretrained)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"adapter '{path}' has rank_pattern/alpha_pattern; paged LoRA needs "
                         f"one rank per adapter: re-save it without per-module ranks")
    modules, rank = set(), None
    for key, shape in tensor_shapes(weights).items():
        parts = split_key(key)
        if parts is None or (parts[1] not in KINDS and parts[1] not in PACKED):
            raise ValueError(f"adapter '{path}' has weight '{key}'; paged LoRA supports "
                             f"only LoRA A/B of {', '.join(KINDS + tuple(PACKED))}")
        r = shape[0] if parts[2] == "A" else shape[1]
        if rank is not None and r != rank:
            raise ValueError(f"adapter '{path}': '{key}' has rank {r}, others {rank}; "
                             f"paged LoRA needs one rank per adapter")
        rank = r
        modules.add(parts[1])
    if rank is None:
        raise ValueError(f"adapter '{path}' has no LoRA weights")
    try:
        kinds = adapter_kinds(modules)
    except ValueError as e:
        raise ValueError(f"adapter '{path}' {e}") from None
    return AdapterMeta(path=str(path), rank=rank, kinds=kinds, scale=lora_scale(cfg, rank),
                       version=version)


def lora_scale(cfg: dict, rank: int) -> float:
    """PEFT's scaling of an adapter config: lora_alpha / r (/ sqrt(r) with rslora)."""
    alpha = cfg.get("lora_alpha", rank)
    return float(alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank)


def pack_adapter(meta: AdapterMeta, geo: PageGeometry, tensors: dict,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """PEFT tensors -> packed adapter ``[num_layers, rows, D]`` in the adapter dtype, on ``device``.

    Each tensor is copied once, straight into its pages (B transposed on the
    way, converted to the adapter dtype); only pages no tensor fills (layers
    or slices of a fused group the adapter lacks) are zeroed. A fused
    module's A is copied for each of its slices and its B split by rows
    into theirs, before the TP shard is cut per slice. With tensor
    parallelism, this rank's shard (see the module docstring).
    """
    d, r = geo.page_width, meta.rank
    p, world = geo.tp_rank, geo.tp_size
    packed = torch.empty(geo.num_layers, meta.rows(geo), d, dtype=geo.dtype, device=device)
    offsets = meta.offsets(geo)
    widths = dict(zip(KINDS, geo.full_widths))
    filled = set()
    for key, t in tensors.items():
        layer, module, ab = split_key(key)
        if layer >= geo.num_layers:
            raise ValueError(f"adapter '{meta.path}': '{key}' is for layer {layer}, "
                             f"the model has {geo.num_layers}")
        rows = slice_rows(module, widths)
        want = lora_shape(module, ab, r, widths)
        if tuple(t.shape) != want:
            raise ValueError(f"adapter '{meta.path}': '{key}' has shape {tuple(t.shape)}, "
                             f"the model needs {want}; was it trained for another model?")
        kinds = [kind for kind, _ in rows]
        parts = [t] * len(kinds) if ab == "A" else t.split([n for _, n in rows])
        for kind, part in zip(kinds, parts):
            a_off, b_off = offsets[kind]
            if ab == "A":  # [r, K]: rank-vectors are rows
                if world > 1:
                    part = (part[p::world] if kind in COLUMN_PARALLEL
                            else part.tensor_split(world, dim=1)[p])
                off = a_off
            else:  # [N, r]: rank-vectors are columns
                if world > 1:
                    part = part.tensor_split(world, dim=0)[p]
                part, off = part.t(), b_off
            packed[layer, off:off + part.numel() // d].view(part.shape).copy_(part)
            filled.add((layer, kind, ab))
    for layer in range(geo.num_layers):
        for kind in meta.kinds:
            a_off, b_off = offsets[kind]
            end = b_off + r * geo.width(kind)[1] // d
            for ab, lo, hi in (("A", a_off, b_off), ("B", b_off, end)):
                if (layer, kind, ab) not in filled:
                    packed[layer, lo:hi].zero_()
    return packed


# safetensors dtype names of the floating types an adapter file may hold
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                       "F64": torch.float64}


def read_header(f) -> tuple[dict, int]:
    """(tensor entries, offset of the data) of an open safetensors file."""
    import struct

    (length,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def tensors_from_bytes(path: str, data: torch.Tensor, header: dict) -> dict[str, torch.Tensor]:
    """Views of the tensors of a safetensors file whose data section is the
    uint8 tensor ``data`` (on any device), by name, in the file's dtypes."""
    tensors = {}
    for key, entry in header.items():
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"adapter '{path}': '{key}' has dtype {entry['dtype']}; "
                             f"LoRA weights must be F16, BF16, F32 or F64")
        lo, hi = entry["data_offsets"]
        raw = data[lo:hi]
        if lo % dtype.itemsize:  # safetensors does not promise aligned tensors
            raw = raw.clone()
        tensors[key] = raw.view(dtype).view(entry["shape"])
    return tensors


def pack_file_bytes(meta: AdapterMeta, geo: PageGeometry, data: torch.Tensor, header: dict,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """``pack_adapter`` of a safetensors file whose data section is the uint8
    tensor ``data`` (on ``device``), in a few launches per module kind.

    ``pack_adapter`` copies tensor by tensor: 256 copies for q,k,v,o of a
    32-layer model, about 11 ms of Python per adapter on the CPU machine,
    held by the upload threads against the engine's thread (the GIL). Here
    one gather per (kind, A or B) takes every layer's tensor at once, through
    an index made of the layers' offsets in the file (one small copy to the
    device per adapter) and one pattern per shape (B's transpose, the TP
    shard), cached. Files with a tensor ``pack_adapter`` would refuse, a
    fused module (its name is not a kind of ``meta``), or a kind whose
    tensors differ in dtype or are not aligned to their element size, take
    ``pack_adapter``'s path. The same result, bit for bit (tested).
    """
    fallback = lambda: pack_adapter(meta, geo, tensors_from_bytes(meta.path, data, header),  # noqa: E731
                                    device)
    groups: dict[tuple[str, str], list[tuple[int, dict]]] = {}
    for key, entry in header.items():
        parts = split_key(key)
        if parts is None or parts[0] >= geo.num_layers or parts[1] not in meta.kinds:
            return fallback()  # fused, or the error that names the tensor
        groups.setdefault((parts[1], parts[2]), []).append((parts[0], entry))
    d, r, layers = geo.page_width, meta.rank, geo.num_layers
    offsets = meta.offsets(geo)
    plan, starts = [], []
    for kind in meta.kinds:
        k, n = geo.full_widths[KINDS.index(kind)]
        a_off, b_off = offsets[kind]
        end = b_off + r * geo.width(kind)[1] // d
        for ab, lo, hi in (("A", a_off, b_off), ("B", b_off, end)):
            entries = sorted(groups.get((kind, ab), []), key=lambda e: e[0])
            dtypes = {_SAFETENSORS_DTYPES.get(e["dtype"]) for _, e in entries}
            dtype = dtypes.pop() if len(dtypes) == 1 else None
            want = [r, k] if ab == "A" else [n, r]
            if entries and (dtype is None or any(e["shape"] != want
                                                 or e["data_offsets"][0] % dtype.itemsize
                                                 for _, e in entries)):
                return fallback()
            plan.append((kind, ab, k, n, lo, hi, [layer for layer, _ in entries], dtype,
                         len(starts)))
            starts += [e["data_offsets"][0] // dtype.itemsize for _, e in entries]
    packed = torch.empty(layers, meta.rows(geo), d, dtype=geo.dtype, device=device)
    starts_t = torch.tensor(starts, dtype=torch.int64)
    if torch.device(device).type == "cuda":  # one copy, not waiting for the stream
        starts_t = starts_t.pin_memory().to(device, non_blocking=True)
    else:
        starts_t = starts_t.to(device)
    for kind, ab, k, n, lo, hi, have, dtype, first in plan:
        dst = packed[:, lo:hi].view(layers, -1)
        if len(have) < layers:  # layers the adapter lacks: zero pages
            dst[sorted(set(range(layers)) - set(have))] = 0
        if not have:
            continue
        typed = data[:data.numel() // dtype.itemsize * dtype.itemsize].view(dtype)
        index = (starts_t[first:first + len(have), None]
                 + _pattern(kind, ab, r, k, n, geo, device)[None, :])
        if len(have) == layers:
            dst.copy_(typed[index])
        else:
            dst[have] = typed[index].to(geo.dtype)
    return packed


_PATTERNS: dict[tuple, torch.Tensor] = {}


def _pattern(kind: str, ab: str, r: int, k: int, n: int, geo: PageGeometry,
             device) -> torch.Tensor:  # fmt: skip
    """Element index into one file tensor of each element of its packed pages
    (A [r, K]: rank-vectors are rows; B [N, r]: columns, so transposed; this
    TP rank's shard, as ``pack_adapter`` cuts it), int64, cached per shape."""
    p, world = geo.tp_rank, geo.tp_size
    key = (kind in COLUMN_PARALLEL, ab, r, k, n, p, world, str(device))
    pattern = _PATTERNS.get(key)
    if pattern is None:
        if ab == "A":
            grid = torch.arange(r * k).view(r, k)
            if world > 1:
                grid = grid[p::world] if kind in COLUMN_PARALLEL else grid.tensor_split(world, 1)[p]
        else:
            grid = torch.arange(n * r).view(n, r)
            if world > 1:
                grid = grid.tensor_split(world, dim=0)[p]
            grid = grid.t()
        pattern = grid.reshape(-1).to(device)
        if len(_PATTERNS) > 64:  # shapes of one model: a handful
            _PATTERNS.clear()
        _PATTERNS[key] = pattern
    return pattern
