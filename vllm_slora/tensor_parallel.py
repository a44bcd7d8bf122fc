"""S-LoRA's tensor-parallel partition inside the engine's LoRA layers.

The math and its communication, in plain torch.distributed and tested
against the unsharded math, are in ``vllm_slora/testing/tp_reference.py``.
On a column-parallel layer the shrink gives this rank's strided part of v,
one all-gather of v makes it whole and the expand writes this rank's output
columns. On a row-parallel layer the wrapper runs the base layer's matmul
without its all-reduce (``row_parallel_forward``, a copy of vLLM's
``RowParallelLinear.forward``, the same source from 0.26 to 0.34, guarded by
the original's source hash), the
shrink of this rank's input columns gives a partial v, one all-reduce of v
completes it, the expand adds this rank's LoRA columns into the partial sum,
and the base layer's all-reduce then carries base and LoRA outputs together.
"""

from __future__ import annotations

import functools
import hashlib
import inspect

import torch

from vllm_slora.kernels import paged_lora_expand, paged_lora_shrink

# sha256 (first 16 hex digits) of vLLM's ``RowParallelLinear.forward`` (0.26-0.34)
# source, which ``row_parallel_forward`` copies with the LoRA output added
# before the all-reduce (patches/README.md lists this touch point).
ROW_PARALLEL_FORWARD_SHA = "d90bdc0c707aa085"
# vLLM internals this module relies on (the drift check's list).
TOUCHES = {
    "vllm.model_executor.layers.linear": ("RowParallelLinear.forward",),
    "vllm.distributed": ("split_tensor_along_last_dim", "tensor_model_parallel_all_reduce",
                         "get_tp_group"),
}


@functools.cache
def check_row_parallel_copy(forward=None) -> None:
    """Refuse to run the copy of ``RowParallelLinear.forward`` (tensor
    parallelism) against a vLLM whose original differs from the one copied."""
    from vllm_slora.patches import PatchTargetChanged

    if forward is None:
        from vllm.model_executor.layers.linear import RowParallelLinear

        forward = RowParallelLinear.forward
    found = hashlib.sha256(inspect.getsource(forward).encode()).hexdigest()[:16]
    if found != ROW_PARALLEL_FORWARD_SHA:
        raise PatchTargetChanged(
            f"vllm_slora's tensor-parallel LoRA copies vLLM 0.26-0.34's RowParallelLinear.forward "
            f"(vllm_slora/tensor_parallel.py); this vLLM's differs (source sha256 {found}, copied "
            f"{ROW_PARALLEL_FORWARD_SHA}): run with tensor_parallel_size 1 or a vLLM 0.26.0")


def row_parallel_forward(layer, x: torch.Tensor):
    """vLLM's ``RowParallelLinear.forward`` with the LoRA output added to
    the partial sum before its all-reduce."""
    from vllm.distributed import (split_tensor_along_last_dim,
                                  tensor_model_parallel_all_reduce)

    base = layer.base_layer
    if not base.input_is_parallel:
        x = split_tensor_along_last_dim(x, num_partitions=layer.tp_size)[layer.tp_rank]
        x = x.contiguous()
    bias = None if (layer.tp_rank > 0 or base.skip_bias_add) else base.bias
    partial = base.quant_method.apply(base, x, bias)
    torch.ops.vllm.slora_paged_lora(x, partial, layer.lora_key)
    out = tensor_model_parallel_all_reduce(partial)
    if not base.return_bias:
        return out
    return out, (base.bias if base.skip_bias_add else None)


def apply_sharded(layer, x, y, token_lora, step) -> None:
    """This rank's part of the LoRA output, with one collective on v."""
    from vllm.distributed import get_tp_group

    g, p, world = layer.group, layer.tp_rank, layer.tp_size
    a_rows, b_rows = layer.pager.vectors.group_tables[g]
    pool, meta = layer.pager.pools[layer.layer_idx], layer.pager.meta
    t, r_max = x.shape[0], step.limits.max_rank
    if layer.row_parallel:
        # x: this rank's input columns; y: the full-width partial sum.
        v = torch.zeros(1, t, r_max, dtype=torch.float32, device=x.device)
        paged_lora_shrink(x, pool, a_rows, step.lora_start, step.rank_a[g], token_lora, v,
                          None, meta)
        v = get_tp_group().all_reduce(v)
        n_p = y.shape[1] // world
        y = y[:, p * n_p:(p + 1) * n_p]
    else:
        # A-vector j sits on rank j % P at local index j // P.
        local = -(-r_max // world)
        v_p = torch.zeros(len(a_rows), t, local, dtype=torch.float32, device=x.device)
        paged_lora_shrink(x, pool, a_rows, step.lora_start, step.rank_a[g], token_lora,
                          v_p, None, meta)
        parts = get_tp_group().all_gather(v_p, dim=0)  # [P * S, T, local]
        v = (parts.view(world, *v_p.shape).permute(1, 2, 3, 0)
             .reshape(v_p.shape[0], t, local * world).contiguous())
    paged_lora_expand(v, pool, b_rows, step.lora_start, step.rank[g], step.lora_scale,
                      token_lora, y, None, meta)
