"""Heterogeneous-rank LoRA ops that read adapters straight from KV-cache pages.

Vocabulary
----------
page
    One row of ``pool``: D contiguous elements. D is a power of two dividing
    every projection width of the model and the size of a KV block, given to
    the kernels as a constexpr (128 or 256 for Llama, 32/64 for tiny models).
pool
    Per model layer, a 2-D view ``[num_rows, D]`` (fp16, bf16 or fp32) of that
    layer's KV-cache buffer. Pages of adapters and of KV blocks share it.
rank-vector
    A LoRA adapter of rank r on a module with input width K and output width
    N has A [r, K] and B [N, r]. It is stored as 2r rank-vectors: A-vector j
    is row j of A (K elements), B-vector j is column j of B (N elements). A
    vector of width W is W // D chunks, one page each, anywhere in the pool.
vector table
    ``a_rows`` int32 [V, K // D]: a_rows[v, c] is the pool row holding chunk c
    of A-vector v; ``b_rows`` int32 [V, N // D] likewise for B-vectors.
    Adapter l owns vectors lora_start[l] .. lora_start[l] + lora_rank[l] - 1.
MBGMV
    Multi-size Batched Gather Matrix-Vector: decode, a few tokens each with
    its own adapter and rank.
MBGMM
    Multi-size Batched Gather Matrix-Matrix: prefill, segments (runs of
    tokens sharing an adapter) x rank.
    Both are served by one grouped kernel family (``grouped.py``): tokens
    are grouped per token (small decode batches), per segment (prefill) or
    per adapter (larger decode batches, grouped on device), and every tile
    of up to BM tokens of a group reads its adapter's pages once.

Per batch: ``token_lora`` int32 [T] (adapter of each token, -1 = none),
``lora_start`` int32 [L], ``lora_rank`` int32 [L], ``lora_scale`` fp32 [L]
(alpha / r). For token i with l = token_lora[i] >= 0 and r = lora_rank[l]:
``v[i, j] = sum_k x[i, k] A_l[j, k]`` (j < r, fp32 buffer [T, R_MAX]) and
``y[i, n] += lora_scale[l] * sum_j v[i, j] B_l[n, j]``. A rank-8 token does
rank-8 work. Fused slices (q,k,v or gate,up) pass one vector table per slice,
share lora_start/lora_rank (vector v means the same (adapter, rank index) in
every slice's table), use ``v`` [S, T, R_MAX] and write slice s of ``y``
[T, sum N_s] at column N_0 + .. + N_{s-1}.

Worked example of the geometry (Llama-2-7B): docs/unified-paging.md.

Backends
--------
The ops run Triton kernels on CUDA tensors and the PyTorch reference
(``reference.py``, the spec) otherwise. The plugin's ``kernels`` setting
(``VLLM_SLORA_KERNELS``) = ``triton``, ``torch`` or ``bmm`` (padded gather +
torch.bmm, the S-LoRA ablation baseline; ``bmm.py``) forces one. All equal
the reference.

Files: ``grouped.py`` (the op on Triton) over ``grouping.py`` (tokens by
adapter), ``plan.py`` (tile sizes, split-K), ``shrink.py``, ``expand.py``,
``tiles.py`` (a work item's tile), ``pages.py`` (reading pages) and
``knobs.py`` (tuning); ``replay.py`` (eager launches replayed),
``variants.py`` (the kernel variants compiled at start-up).

The three public ops are registered torch custom ops (``vllm_slora::
paged_lora_shrink``, ``paged_lora_expand``, ``paged_lora``, with fake
implementations), so torch.compile / dynamo treat them as opaque. They are
registered with ``torch.library.Library`` rather than the
``torch.library.custom_op`` decorator: the same schema and fake kernel, a
fifth of the eager dispatch cost (about 7 us against 37 us per call on the
CPU machine).

Metadata, CUDA graphs: no op reads a tensor on the host when ``max_rank`` is
given; grids depend on shapes only. ``group_by_adapter(token_lora, L)``
builds the per-adapter token lists (one launch); pass its result as
``meta`` to reuse it across layers (otherwise the ops build it per call
when a batch has more than ``knobs.PER_TOKEN_MAX_T`` tokens and no
segments).
"""

from collections.abc import Sequence

import torch

from vllm_slora.config import slora_config
from vllm_slora.kernels import bmm, reference
from vllm_slora.kernels.reference import gather_adapter

__all__ = [
    "BACKENDS",
    "batch_meta",
    "gather_adapter",
    "group_by_adapter",
    "paged_lora",
    "paged_lora_expand",
    "paged_lora_shrink",
]

BACKENDS = ("triton", "torch", "bmm")
# Tests and benchmarks force a backend here; otherwise the plugin's setting
# (``SLoraConfig.kernels``: "auto" picks by device).
BACKEND_OVERRIDE: str | None = None

Tables = torch.Tensor | Sequence[torch.Tensor]
Segments = tuple[torch.Tensor, torch.Tensor] | None


def _backend(x: torch.Tensor) -> str:
    chosen = BACKEND_OVERRIDE or slora_config().kernels
    if chosen != "auto":
        return chosen
    return "triton" if x.is_cuda else "torch"


def _table_list(rows: Tables) -> list[torch.Tensor]:
    return [rows] if isinstance(rows, torch.Tensor) else list(rows)


def _segments(seg_start, seg_lora) -> Segments:
    if seg_start is None and seg_lora is None:
        return None
    if seg_start is None or seg_lora is None:
        raise ValueError("segments need both seg_start and seg_lora")
    return seg_start, seg_lora


def _split_segments(segments: Segments):
    return (None, None) if segments is None else tuple(segments)


# ---- implementations behind the custom ops --------------------------------


def _shrink_impl(x, pool, a_rows, lora_start, lora_rank, token_lora, out,
                 seg_start, seg_lora, meta) -> None:  # fmt: skip
    fused = out.dim() == 3
    backend = _backend(x)
    if backend == "triton":
        from vllm_slora.kernels.shrink import shrink

        out3 = out if fused else out.unsqueeze(0)
        segments = _segments(seg_start, seg_lora)
        shrink(x, pool, a_rows, lora_start, lora_rank, token_lora, out3, segments, meta)
    else:
        impl = reference if backend == "torch" else bmm
        rows = a_rows if fused else a_rows[0]
        impl.paged_lora_shrink(x, pool, rows, lora_start, lora_rank, token_lora, out)


def _expand_impl(v, pool, b_rows, lora_start, lora_rank, lora_scale, token_lora, y,
                 seg_start, seg_lora, meta) -> None:  # fmt: skip
    fused = v.dim() == 3
    backend = _backend(y)
    if backend == "triton":
        from vllm_slora.kernels.expand import expand

        v3 = v if fused else v.unsqueeze(0)
        segments = _segments(seg_start, seg_lora)
        expand(
            v3, pool, b_rows, lora_start, lora_rank, lora_scale, token_lora, y, segments, meta
        )
    else:
        impl = reference if backend == "torch" else bmm
        rows = b_rows if fused else b_rows[0]
        impl.paged_lora_expand(v, pool, rows, lora_start, lora_rank, lora_scale, token_lora, y)


def _lora_impl(x, y, pool, a_rows, b_rows, lora_start, lora_rank, lora_scale, token_lora,
               seg_start, seg_lora, max_rank, meta) -> None:  # fmt: skip
    if max_rank < 0:  # not given: one host sync
        max_rank = max(int(lora_rank.max()), 1) if lora_rank.numel() else 1
    backend = _backend(x)
    if backend == "triton":
        from vllm_slora.kernels import grouped

        segments = _segments(seg_start, seg_lora)
        grouped.lora(
            x, y, pool, a_rows, b_rows, lora_start, lora_rank, lora_scale, token_lora,
            max_rank, segments, meta,
        )  # fmt: skip
        return
    impl = reference if backend == "torch" else bmm
    v = torch.empty(len(a_rows), x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    impl.paged_lora_shrink(x, pool, a_rows, lora_start, lora_rank, token_lora, v)
    impl.paged_lora_expand(v, pool, b_rows, lora_start, lora_rank, lora_scale, token_lora, y)


def _nothing(*args) -> None:
    return None


_SCHEMAS = {
    "paged_lora_shrink": (
        "(Tensor x, Tensor pool, Tensor[] a_rows, Tensor lora_start, Tensor lora_rank, "
        "Tensor token_lora, Tensor(a!) out, Tensor? seg_start, Tensor? seg_lora, "
        "Tensor? meta) -> ()",
        _shrink_impl,
    ),
    "paged_lora_expand": (
        "(Tensor v, Tensor pool, Tensor[] b_rows, Tensor lora_start, Tensor lora_rank, "
        "Tensor lora_scale, Tensor token_lora, Tensor(a!) y, Tensor? seg_start, "
        "Tensor? seg_lora, Tensor? meta) -> ()",
        _expand_impl,
    ),
    "paged_lora": (
        "(Tensor x, Tensor(a!) y, Tensor pool, Tensor[] a_rows, Tensor[] b_rows, "
        "Tensor lora_start, Tensor lora_rank, Tensor lora_scale, Tensor token_lora, "
        "Tensor? seg_start, Tensor? seg_lora, int max_rank, Tensor? meta) -> ()",
        _lora_impl,
    ),
}


def _register() -> None:
    if hasattr(torch.ops, "vllm_slora") and hasattr(torch.ops.vllm_slora, "paged_lora"):
        return  # already registered (module reloaded)
    lib = torch.library.Library("vllm_slora", "FRAGMENT")
    for name, (schema, impl) in _SCHEMAS.items():
        lib.define(name + schema)
        lib.impl(name, impl, "CompositeExplicitAutograd")
        torch.library.register_fake(f"vllm_slora::{name}", _nothing, lib=lib)
    globals()["_LIB"] = lib  # keep the registrations alive


_register()


# ---- public API --------------------------------------------------------------


def group_by_adapter(token_lora: torch.Tensor, num_loras: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Per-adapter token lists for a batch, on device (``grouping.group_by_adapter``).

    Pass the result as ``meta`` to the ops of every layer of the batch;
    ``out``: a static buffer of ``grouping.meta_size(T, num_loras)`` to fill.
    """
    from vllm_slora.kernels import grouping

    return grouping.group_by_adapter(token_lora, num_loras, out)


def batch_meta(token_lora: torch.Tensor, num_loras: int, segments: Segments = None,
               out: torch.Tensor | None = None) -> torch.Tensor | None:  # fmt: skip
    """``group_by_adapter`` of a batch if the ops will use it, else None.

    They use it only with the Triton backend, without segments, above
    ``knobs.PER_TOKEN_MAX_T`` tokens (smaller batches: one tile per token).
    The decision depends on shapes and the backend only (CUDA-graph safe).
    """
    if _backend(token_lora) != "triton" or segments is not None:
        return None
    from vllm_slora.kernels import grouping, knobs

    if token_lora.shape[0] <= knobs.PER_TOKEN_MAX_T:
        return None
    return grouping.group_by_adapter(token_lora, num_loras, out)


def paged_lora_shrink(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_rows: Tables,
    lora_start: torch.Tensor,
    lora_rank: torch.Tensor,
    token_lora: torch.Tensor,
    out: torch.Tensor,
    segments: Segments = None,
    meta: torch.Tensor | None = None,
) -> None:
    """out[i, :r] = x[i] @ A_l^T for each token i with adapter l >= 0 of rank r.

    Args:
        x: [T, K], fp16/bf16 (fp32 on CPU), contiguous rows.
        pool: [num_rows, D], x's dtype: one layer's page pool.
        a_rows: int32 [V, K // D], or a list of S tables (fused slices).
        lora_start, lora_rank: int32 [L].
        token_lora: int32 [T], -1 = no LoRA.
        out: fp32 [T, R_MAX] ([S, T, R_MAX] for fused slices); written only at
            [..., i, :rank] of LoRA tokens.
        segments: optional (seg_start int32 [NSEG+1], seg_lora int32 [NSEG]),
            runs of consecutive tokens sharing an adapter (must agree with
            token_lora); the kernels then group tokens by segment.
        meta: optional ``group_by_adapter(token_lora, L)`` of this batch.
    """
    seg_start, seg_lora = _split_segments(segments)
    torch.ops.vllm_slora.paged_lora_shrink(
        x, pool, _table_list(a_rows), lora_start, lora_rank, token_lora, out,
        seg_start, seg_lora, meta,
    )  # fmt: skip


def paged_lora_expand(
    v: torch.Tensor,
    pool: torch.Tensor,
    b_rows: Tables,
    lora_start: torch.Tensor,
    lora_rank: torch.Tensor,
    lora_scale: torch.Tensor,
    token_lora: torch.Tensor,
    y: torch.Tensor,
    segments: Segments = None,
    meta: torch.Tensor | None = None,
) -> None:
    """y[i] += lora_scale[l] * v[i, :r] @ B_l^T in place, for tokens with l >= 0.

    Args:
        v: fp32 [T, R_MAX] ([S, T, R_MAX] for fused slices); only [..., :r] read.
        pool: [num_rows, D], y's dtype.
        b_rows: int32 [V, N // D], or a list of S tables of widths N_s.
        lora_start, lora_rank: int32 [L]; lora_scale: fp32 [L].
        token_lora: int32 [T], -1 = no LoRA (y row left bit-unchanged).
        y: [T, N] ([T, sum N_s] for fused slices), contiguous rows.
        segments, meta: as in ``paged_lora_shrink``.
    """
    seg_start, seg_lora = _split_segments(segments)
    torch.ops.vllm_slora.paged_lora_expand(
        v, pool, _table_list(b_rows), lora_start, lora_rank, lora_scale, token_lora, y,
        seg_start, seg_lora, meta,
    )  # fmt: skip


def paged_lora(
    x: torch.Tensor,
    y: torch.Tensor,
    pool: torch.Tensor,
    a_rows: Tables,
    b_rows: Tables,
    lora_start: torch.Tensor,
    lora_rank: torch.Tensor,
    lora_scale: torch.Tensor,
    token_lora: torch.Tensor,
    segments: Segments = None,
    max_rank: int | None = None,
    meta: torch.Tensor | None = None,
    dispatch: bool = True,
) -> None:
    """y += lora_scale * x @ A^T @ B^T per token: shrink then expand, in place.

    Shapes as in ``paged_lora_shrink`` / ``paged_lora_expand``. The fp32
    intermediate v [S, T, max_rank] (and split-K partials) live inside the
    op. Pass ``max_rank`` (>= every lora_rank) to avoid the host sync that
    reading lora_rank.max() costs; ``meta`` as in ``paged_lora_shrink``.
    This is the fastest path: on the Triton backend the shrink's split-K
    partials are summed by the expand instead of a separate launch.
    ``dispatch=False`` calls the implementation without going through the
    registered custom op (no dispatcher: about 8 us less host time per call
    on the CPU machine), for callers that are themselves inside an opaque
    op, as the LoRA layers are; torch.compile must not trace such a call.
    """
    seg_start, seg_lora = _split_segments(segments)
    op = torch.ops.vllm_slora.paged_lora if dispatch else _lora_impl
    op(
        x, y, pool, _table_list(a_rows), _table_list(b_rows), lora_start, lora_rank,
        lora_scale, token_lora, seg_start, seg_lora, -1 if max_rank is None else int(max_rank),
        meta,
    )  # fmt: skip
