"""Random paged adapters and batches, for the kernel tests and benchmark.

Vocabulary and layout: see ``vllm_slora/kernels/__init__.py``.

Pages are placed at a random permutation of pool rows, and rows left over
are filled with NaN so that a kernel reading a wrong page cannot pass a test.
"""

from dataclasses import dataclass

import torch


@dataclass
class PagedAdapters:
    """L adapters on one module of S slices, paged into one pool.

    pool: [num_rows, D]; a_rows[s]: int32 [V, K // D]; b_rows[s]: int32
    [V, N_s // D]; lora_start, lora_rank: int32 [L]; lora_scale: fp32 [L];
    dense[l][s] = (A [r, K], B [N_s, r]) as unpaged tensors.
    """

    pool: torch.Tensor
    a_rows: list[torch.Tensor]
    b_rows: list[torch.Tensor]
    lora_start: torch.Tensor
    lora_rank: torch.Tensor
    lora_scale: torch.Tensor
    dense: list[list[tuple[torch.Tensor, torch.Tensor]]]

    @property
    def max_rank(self) -> int:
        return max(int(self.lora_rank.max()), 1)


def make_paged_adapters(
    ranks: list[int],
    k: int,
    ns: list[int],
    d: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    slack: float = 1.25,
    seed: int = 0,
) -> PagedAdapters:
    """Adapters of the given ranks on a module K -> N_0 + .. + N_{S-1}.

    Values are scaled so that v and the LoRA output are O(1) in fp16/bf16.
    """
    gen = torch.Generator().manual_seed(seed)
    v_total = sum(ranks)
    pages = sum(v_total * (k + n) // d for n in ns)
    num_rows = max(int(pages * slack), pages + 1)
    pool = torch.full((num_rows, d), float("nan"), dtype=dtype)
    perm = torch.randperm(num_rows, generator=gen).to(torch.int32)
    next_row = 0

    def take(width: int) -> torch.Tensor:
        nonlocal next_row
        n = v_total * width // d
        rows = perm[next_row : next_row + n].view(v_total, width // d)
        next_row += n
        return rows

    a_rows = [take(k) for _ in ns]
    b_rows = [take(n) for n in ns]
    starts = [sum(ranks[:i]) for i in range(len(ranks))]
    dense = []
    for start, r in zip(starts, ranks):
        per_slice = []
        for s, n in enumerate(ns):
            a = (torch.randn(r, k, generator=gen) / k**0.5).to(dtype)
            b = (torch.randn(n, r, generator=gen) / max(r, 1) ** 0.5).to(dtype)
            pool[a_rows[s][start : start + r].reshape(-1).long()] = a.reshape(-1, d)
            pool[b_rows[s][start : start + r].reshape(-1).long()] = b.t().reshape(-1, d)
            per_slice.append((a.to(device), b.to(device)))
        dense.append(per_slice)
    scale = torch.rand(len(ranks), generator=gen) + 0.5
    return PagedAdapters(
        pool=pool.to(device),
        a_rows=[t.to(device) for t in a_rows],
        b_rows=[t.to(device) for t in b_rows],
        lora_start=torch.tensor(starts, dtype=torch.int32, device=device),
        lora_rank=torch.tensor(ranks, dtype=torch.int32, device=device),
        lora_scale=scale.to(device),
        dense=dense,
    )


def make_segments(
    lengths: list[int], seg_lora: list[int], device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(token_lora [T], (seg_start [NSEG+1], seg_lora [NSEG])), all int32."""
    seg_start = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
    lora = torch.tensor(seg_lora, dtype=torch.int32)
    token_lora = torch.repeat_interleave(lora, torch.tensor(lengths))
    return token_lora.to(device), (seg_start.to(device), lora.to(device))


def dense_lora(
    x: torch.Tensor, y: torch.Tensor, adapters: PagedAdapters, token_lora: torch.Tensor
) -> torch.Tensor:
    """Plain per-token formula from unpaged weights: y + scale * x @ A^T @ B^T.

    Returns a new tensor of y's dtype; rows with token_lora -1 equal y.
    """
    out = y.clone()
    for i, lora in enumerate(token_lora.tolist()):
        if lora < 0:
            continue
        scale = float(adapters.lora_scale[lora])
        delta = torch.cat(
            [x[i].float() @ a.float().t() @ b.float().t() for a, b in adapters.dense[lora]]
        )
        out[i] = (y[i].float() + scale * delta).to(y.dtype)
    return out
