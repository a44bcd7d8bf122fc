"""Which Triton kernel variants a range of step sizes launches.

A variant is a set of compile-time constants (tile shapes, warps, pipeline
depth, grouping mode, split-K summing); the launch grid and the
non-specialised integers may differ between sizes of one variant without
a new compilation. ``representative_sizes`` gives one token count per
variant, so that running those compiles every variant once (start-up)
instead of during serving.
"""

from __future__ import annotations

import torch

from vllm_slora.kernels import _backend
from vllm_slora.kernels import grouped


def compiled_backend(x: torch.Tensor) -> bool:
    """Whether the ops on ``x``'s device run compiled Triton kernels."""
    return x.is_cuda and _backend(x) == "triton"


def representative_sizes(lo: int, limits, k: int, n_max: int, s: int, d: int,
                         dtype: torch.dtype, device: torch.device) -> list[int]:  # fmt: skip
    """One token count in [lo, limits.max_tokens] per kernel variant of a
    module of input width k, widest output n_max and s slices (the engine's
    static R_MAX and adapter slots, as the LoRA layers call the ops)."""
    seen: dict[tuple, int] = {}
    r_max, num_loras = limits.max_rank, limits.max_loras
    token_lora = torch.empty(limits.max_tokens, dtype=torch.int32)  # shapes only
    for t in range(max(lo, 1), limits.max_tokens + 1):
        groups = grouped.make_groups(token_lora[:t], num_loras, None, None, build_meta=False)
        pl = grouped.plan(groups, t, k, n_max, s, r_max, d, device, dtype)
        fused = grouped.fuse_partials(groups, pl, r_max)
        chunk = grouped.meta_chunk(t) if groups.mode == grouped.ADAPTERS else 0
        key = (groups.mode, pl.bm, pl.br_s, pl.bk, pl.npg, pl.warps_s, pl.stages_s, pl.bn,
               pl.br_e, pl.warps_e, pl.stages_e, pl.nbp, pl.split > 1, pl.split if fused else 1,
               chunk, t <= chunk)
        seen.setdefault(key, t)
    return sorted(seen.values())
