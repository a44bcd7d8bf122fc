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
from vllm_slora.kernels.grouped import fuse_partials
from vllm_slora.kernels.grouping import ADAPTERS, make_groups, meta_chunk
from vllm_slora.kernels.plan import plan, shape_of


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
        groups = make_groups(token_lora[:t], num_loras, None, None, build_meta=False)
        pl = plan(shape_of(groups, t, k, n_max, s, r_max, d, device, dtype))
        fused = fuse_partials(groups, pl, r_max)
        chunk = meta_chunk(t) if groups.mode == ADAPTERS else 0
        key = (groups.mode, *pl.constants(), pl.split > 1, pl.split if fused else 1,
               chunk, t <= chunk)
        seen.setdefault(key, t)
    return sorted(seen.values())
