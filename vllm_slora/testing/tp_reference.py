"""S-LoRA's tensor-parallel scheme for paged LoRA: the sharded math.

The engine runs it under ``--tensor-parallel-size P``: each rank's pages hold
its shard (``memory/layout.py``: ``shard_widths``; ``memory/packing.py``)
and ``PagedLoRALinear`` (``vllm_slora/layers.py``) does the collectives below
with vLLM's TP group. This module is the same partition in plain
torch.distributed, tested against the unsharded math (``tests/tp/``);
``tests/tp/test_engine_tp.py`` checks the engine at TP 2 against TP 1.
Vocabulary: see ``vllm_slora/kernels/__init__.py``.

Partition, matching vLLM's Megatron layers (P = tensor-parallel size, rank p):

- Column-parallel layers (qkv_proj, gate_up_proj: W split along N). Rank p
  holds the A rank-vectors j with ``j % P == p`` (strided, so every adapter's
  rank splits as evenly as P allows, with no padding to a multiple of P) and
  the rows ``N_p`` of B with all r columns. Shrink gives each rank its
  rank-vectors' part of v; one all-gather of v (T x ceil(R/P) per rank) makes
  v whole, and each rank expands into its own output columns. Extra
  communication per token and layer: an all-gather of R values per slice
  (fp32: 4 R bytes received per slice, (P-1)/P of it from other ranks).
- Row-parallel layers (o_proj, down_proj: W split along K). Rank p holds the
  columns ``K_p`` of A and the rows ``N_p`` of B. Shrink gives a partial v;
  one all-reduce of v (T x R) completes it; each rank adds its LoRA output
  into its columns ``N_p`` of the base layer's partial sum, so the base
  layer's own all-reduce carries the LoRA output too. Extra communication per
  token and layer: an all-reduce of R values (fp32: ~2 (P-1)/P x 4 R bytes
  per rank with a ring).

For comparison, vLLM 0.26's own LoRA path with ``fully_sharded_loras``
(``vllm/lora/layers/column_parallel_linear.py: _mcp_apply``,
``row_parallel_linear.py: RowParallelLinearWithShardedLoRA``) moves the same
kinds of collectives but of ``max_lora_rank`` values per token (stacked
buffers padded to the largest rank) rather than the batch's largest rank;
without ``fully_sharded_loras`` column-parallel layers need no collective
(A replicated on every rank, P times the memory) and row-parallel layers
all-reduce T x max_lora_rank.

Each rank's pool therefore holds about 1/P of every resident adapter's pages.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vllm_slora.kernels import reference


def column_shard(a: torch.Tensor, b: torch.Tensor, p: int, world: int):
    """(A [r_p, K], B [N_p, r]) of rank p for a column-parallel layer."""
    return a[p::world], b.tensor_split(world, dim=0)[p]


def row_shard(a: torch.Tensor, b: torch.Tensor, p: int, world: int):
    """(A [r, K_p], B [N_p, r]) of rank p for a row-parallel layer."""
    return a.tensor_split(world, dim=1)[p], b.tensor_split(world, dim=0)[p]


def page(adapters: list[tuple[torch.Tensor, torch.Tensor]], d: int, seed: int = 0):
    """Page adapters (A [r, K], B [N, r]) into one scattered pool.

    Returns pool [rows, D], a_rows int32 [V, K // D], b_rows int32 [V, N // D],
    lora_start, lora_rank int32 [L]. Unused rows are NaN.
    """
    ranks = [a.shape[0] for a, _ in adapters]
    k, n = adapters[0][0].shape[1], adapters[0][1].shape[0]
    v_total = sum(ranks)
    rows = v_total * (k + n) // d
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(rows + 7, generator=gen).to(torch.int32)
    pool = torch.full((rows + 7, d), float("nan"), dtype=adapters[0][0].dtype)
    a_rows = perm[: v_total * k // d].view(v_total, k // d)
    b_rows = perm[v_total * k // d : rows].view(v_total, n // d)
    starts = [sum(ranks[:i]) for i in range(len(ranks))]
    for (a, b), s, r in zip(adapters, starts, ranks):
        if r:
            pool[a_rows[s : s + r].reshape(-1).long()] = a.reshape(-1, d)
            pool[b_rows[s : s + r].reshape(-1).long()] = b.t().reshape(-1, d)
    return (pool, a_rows, b_rows, torch.tensor(starts, dtype=torch.int32),
            torch.tensor(ranks, dtype=torch.int32))


def column_parallel_lora(x, y_p, paged_a, paged_b, lora_scale, token_lora, r_max, group=None):
    """y_p += LoRA output columns of this rank; x [T, K] whole, y_p [T, N_p].

    ``paged_a``: page() of this rank's A shards; ``paged_b``: page() of its B
    shards (ranks as the whole adapter). One all-gather of v.
    """
    world, p = dist.get_world_size(group), dist.get_rank(group)
    pool_a, a_rows, _, start_a, rank_a = paged_a
    local = -(-r_max // world)
    v_p = torch.zeros(x.shape[0], local, dtype=torch.float32)
    reference.paged_lora_shrink(x, pool_a, a_rows, start_a, rank_a, token_lora, v_p)
    parts = [torch.empty_like(v_p) for _ in range(world)]
    dist.all_gather(parts, v_p, group=group)
    # Rank-vector j lives on rank j % P at local index j // P.
    j = torch.arange(r_max)
    v = torch.stack(parts)[j % world, :, j // world].t().contiguous()
    pool_b, _, b_rows, start_b, rank_b = paged_b
    reference.paged_lora_expand(v, pool_b, b_rows, start_b, rank_b, lora_scale, token_lora, y_p)


def row_parallel_lora(x_p, partial, n_offset, paged_a, paged_b, lora_scale, token_lora,
                      r_max, group=None):
    """Add this rank's LoRA columns into ``partial`` [T, N], the base layer's
    partial sum before its all-reduce; x_p [T, K_p]. One all-reduce of v."""
    pool_a, a_rows, _, start, rank = paged_a
    v = torch.zeros(x_p.shape[0], r_max, dtype=torch.float32)
    reference.paged_lora_shrink(x_p, pool_a, a_rows, start, rank, token_lora, v)
    dist.all_reduce(v, group=group)
    pool_b, _, b_rows, start_b, rank_b = paged_b
    cols = partial[:, n_offset : n_offset + b_rows.shape[1] * pool_b.shape[1]]
    reference.paged_lora_expand(v, pool_b, b_rows, start_b, rank_b, lora_scale, token_lora, cols)
