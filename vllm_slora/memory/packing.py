"""Packing an adapter into its pages: per layer, the ``[rows, D]`` block it fills.

``pack_adapter`` packs loaded tensors (tests, benchmarks); ``pack_file_bytes``
packs the raw bytes of the safetensors file on the device, as the uploads
do (``uploads.py``), falling back to ``pack_adapter`` where the layout needs
it. Both give the same rows (tested). Order of rows: ``AdapterMeta.offsets``.
"""

from __future__ import annotations

import json

import torch

from vllm_slora.memory.layout import (COLUMN_PARALLEL, KINDS, PACKED, AdapterMeta, PageGeometry,
                                      lora_shape, slice_rows, split_key)


def _kept(module: str, meta: AdapterMeta) -> bool:
    """Whether ``meta`` has a kind of ``module`` (a kind or a fused name)."""
    return any(k in meta.kinds for k in PACKED.get(module, (module,)))


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
        if not _kept(module, meta):
            continue  # a group --lora-target-modules leaves out (AdapterMeta.restricted)
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
        if parts is not None and not _kept(parts[1], meta):
            continue  # a group --lora-target-modules leaves out
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
    starts_t = torch.tensor(starts, dtype=torch.int64)
    if torch.device(device).type == "cuda":  # one copy, not waiting for the stream
        starts_t = starts_t.pin_memory().to(device, non_blocking=True)
    else:
        starts_t = starts_t.to(device)
    file_dtypes = {dtype for *_, dtype, _ in plan}
    if len(file_dtypes) == 1 and all(len(have) == layers for *_, have, _, _ in plan):
        # Every kind's A and B in every layer, one dtype (any PEFT adapter of
        # this model): one gather over all of them, a handful of launches
        # (each a hand-over of the GIL between an upload's lane and the
        # engine's thread) instead of five per kind and A or B.
        dtype = file_dtypes.pop()
        typed = data[:data.numel() // dtype.itemsize * dtype.itemsize].view(dtype)
        group, pattern = _whole_pattern(meta, geo, plan, device)
        packed = torch.empty(layers, meta.rows(geo), d, dtype=geo.dtype, device=device)
        by_layer = starts_t.view(len(plan), layers).t()  # [layer, part]: its tensor's start
        step = max(1, GATHER_ELEMENTS // pattern.numel())  # layers a gather (bounded temps)
        for lo in range(0, layers, step):
            index = by_layer[lo:lo + step, group]
            index += pattern
            out = packed[lo:lo + step].view(-1)
            if dtype == geo.dtype:
                torch.index_select(typed, 0, index.view(-1), out=out)
            else:
                out.copy_(typed[index.view(-1)])
        return packed
    packed = torch.empty(layers, meta.rows(geo), d, dtype=geo.dtype, device=device)
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
# Elements of the int64 index of one whole-adapter gather (64 MB): a rank-64
# adapter on q,k,v,o of a 7B model gathers 4 layers at a time, rank 8 all 32.
GATHER_ELEMENTS = 8 << 20


def _whole_pattern(meta: AdapterMeta, geo: PageGeometry, plan: list,
                   device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each element of one layer's packed pages: its part of ``plan``
    (a kind's A or B, int64) and its element index in that part's file
    tensor (``_pattern``'s, int64), cached per adapter shape."""
    key = ("whole", meta.rank, geo.page_width, geo.tp_rank, geo.tp_size, str(device),
           tuple(part[:6] for part in plan))  # (kind, A or B, K, N, first row, end row)
    found = _PATTERNS.get(key)
    if found is None:
        d = geo.page_width
        if sum(hi - lo for *_, lo, hi, _, _, _ in plan) != meta.rows(geo):
            raise AssertionError(f"adapter '{meta.path}': its parts do not cover its pages")
        group = torch.empty(meta.rows(geo) * d, dtype=torch.int64, device=device)
        pattern = torch.empty_like(group)
        for i, (kind, ab, k, n, lo, hi, *_) in enumerate(plan):
            group[lo * d:hi * d] = i
            pattern[lo * d:hi * d] = _pattern(kind, ab, meta.rank, k, n, geo, device)
        found = _PATTERNS[key] = _cached(torch.stack([group, pattern]))
    _used_here(found)
    return found[0], found[1]


def _cached(t: torch.Tensor) -> torch.Tensor:
    """``t`` made on this thread's stream, ready for any stream before it is
    shared: lanes use the cache from their own streams."""
    if t.is_cuda:
        torch.cuda.current_stream(t.device).synchronize()
    return t


def _used_here(t: torch.Tensor) -> None:
    """A cached tensor read by work queued on this thread's stream: if the
    cache lets it go meanwhile, its memory is reused only after that work."""
    if t.is_cuda:
        t.record_stream(torch.cuda.current_stream(t.device))


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
        pattern = _cached(grid.reshape(-1).to(device))
        if len(_PATTERNS) > 64:  # shapes of one model: a handful
            _PATTERNS.clear()
        _PATTERNS[key] = pattern
    _used_here(pattern)
    return pattern
