"""LoRA layers that read adapters from KV-cache pages.

``PagedLoRALinear`` wraps one vLLM linear layer of a model layer (``qkv_proj``,
``o_proj``, ``gate_up_proj`` or ``down_proj``): the base layer runs as usual,
then ``vllm_slora.kernels.paged_lora`` adds the batch's adapters, read through
the vector tables from that model layer's pool. It owns no weights: there is
no ``max_loras x max_rank`` tensor anywhere.

The LoRA part runs as the custom op ``torch.ops.vllm.slora_paged_lora`` so
that torch.compile treats it as opaque. The op finds its layer through a
tensor argument, the layer's one-element ``lora_key`` buffer (looked up by
its address), never through a constant: a per-layer constant such as the
layer's name makes every piece of vLLM's piecewise graph different, so
inductor compiled all 33 pieces of a 7B model instead of one (60 s of
start-up against 7 s for the base model, H200), while buffers are graph
inputs and leave the pieces identical. Two engines in one process have their
own buffers, hence their own layers. Its per-step metadata are static
buffers of the pager (``memory/step.py``), so CUDA graphs capture it: in
full graphs (uniform decode) and in piecewise ones (mixed batches) alike.
Under tensor parallelism the layer runs S-LoRA's partition
(``tensor_parallel.py``).
"""

from __future__ import annotations

import re
import weakref

import torch
from torch import nn

from vllm_slora import tensor_parallel
from vllm_slora.kernels import batch_meta, grouped, knobs, paged_lora
from vllm_slora.kernels.replay import Recorder
from vllm_slora.memory.layout import COLUMN_PARALLEL, GROUPS

# vLLM internals this module relies on (the drift check's list).
TOUCHES = {"vllm.utils.torch_utils": ("direct_register_custom_op", "vllm_lib")}

# Layers by the address of their ``lora_key`` buffer (the op's handle on its layer).
_BY_KEY: "weakref.WeakValueDictionary[int, PagedLoRALinear]" = weakref.WeakValueDictionary()
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


class PagedLoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, name: str, group: str, pager):
        super().__init__()
        m = _LAYER_INDEX.search(f".{name}")
        if m is None:
            raise ValueError(f"vllm_slora cannot tell the model layer of '{name}'")
        self.base_layer = base_layer
        self.group = group
        self.layer_idx = int(m.group(1))
        self.pager = pager
        self.tp_size, self.tp_rank = pager.tp_size, pager.tp_rank
        self.row_parallel = GROUPS[group][0] not in COLUMN_PARALLEL
        # Set by the worker manager on the first LoRA layer of the forward.
        self.builds_meta = False
        if self.tp_size > 1 and self.row_parallel:
            tensor_parallel.check_row_parallel_copy()
        if self.tp_size > 1 and self.row_parallel and not base_layer.reduce_results:
            raise ValueError(f"vllm_slora: '{name}' does not all-reduce its output; "
                             f"the LoRA output has nowhere to join it")
        # The op's argument that names this layer: a graph input, not a constant.
        self.register_buffer("lora_key", torch.zeros(1, dtype=torch.int8, device=pager.device),
                             persistent=False)
        _BY_KEY[self.lora_key.data_ptr()] = self

    def forward(self, x: torch.Tensor):
        if self.tp_size > 1 and self.row_parallel:
            return tensor_parallel.row_parallel_forward(self, x)
        out = self.base_layer(x)
        y = out[0] if isinstance(out, tuple) else out
        torch.ops.vllm.slora_paged_lora(x, y, self.lora_key)
        return out

    def apply_lora(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y += adapters(x), in place; x [T, K], y [T, N] (or with a leading batch dim).

        Reads only the pager's static step buffers: what it launches depends
        on T and on whether the step has LoRA at all, never on which adapters
        it has, so a CUDA graph captured here replays any step of that size.
        """
        batch = self.pager.batch
        if batch is None:
            return
        step, limits = self.pager.step, self.pager.step.limits
        t = x.numel() // x.shape[-1]
        if self.builds_meta:  # the forward's first LoRA layer groups tokens for all
            self.pager.meta = batch_meta(step.token_lora[:t], limits.max_loras, out=step.meta_for(t))
        # No adapter of the step on this group (eager steps only: captures use
        # R_MAX): nothing to do, before any view (an eager step's host runs this per layer).
        if batch.max_rank[self.group] == 0:
            return
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y2 = y if y.dim() == 2 else y.view(-1, y.shape[-1])
        token_lora = step.token_lora[:t]  # past the step's tokens: -1 (padding)
        if self.tp_size > 1:
            tensor_parallel.apply_sharded(self, x2, y2, token_lora, step)
            return
        pool = self.pager.pools[self.layer_idx]
        replays = self.pager.replays
        if replays is not None and not torch.cuda.is_current_stream_capturing():
            # Eager steps (larger than any CUDA graph): the first layer's call
            # for this group and size is recorded, the others replay it.
            # One recording per group, the last size's: eager steps rarely
            # repeat a size, and each recording keeps its workspaces (a
            # cache by size grew to an out-of-memory at 2,000 adapters).
            key = (t, knobs.snapshot())
            last = replays.get(self.group)
            if last is not None and last[0] == key and last[1].matches(x=x2, pool=pool, y=y2):
                last[1](x=x2, pool=pool, y=y2)
                self.pager.counters["lora_replays"] += 1
                return
            replays.pop(self.group, None)  # its workspaces go before new ones are made
            a_rows, b_rows = self.pager.vectors.group_tables[self.group]
            record = Recorder(x=x2, pool=pool, y=y2)
            grouped.lora(x2, y2, pool, a_rows, b_rows, step.lora_start, step.rank[self.group],
                         step.lora_scale, token_lora, limits.max_rank, None, self.pager.meta,
                         record)
            recorded = record.result()
            if recorded is not None:
                replays[self.group] = (key, recorded)
            return
        a_rows, b_rows = self.pager.vectors.group_tables[self.group]
        if len(a_rows) == 1:
            a_rows, b_rows = a_rows[0], b_rows[0]
        # Already inside the opaque op vllm::slora_paged_lora: skip the
        # kernels' own custom-op dispatch.
        paged_lora(x2, y2, pool, a_rows, b_rows,
                   step.lora_start, step.rank[self.group], step.lora_scale, token_lora,
                   max_rank=limits.max_rank, meta=self.pager.meta, dispatch=False)

    def extra_repr(self) -> str:
        return f"group={self.group}, layer={self.layer_idx}"


def _slora_paged_lora(x: torch.Tensor, y: torch.Tensor, key: torch.Tensor) -> None:
    layer_of(key).apply_lora(x, y)


def layer_of(key: torch.Tensor) -> "PagedLoRALinear":
    """The layer whose ``lora_key`` buffer ``key`` is."""
    layer = _BY_KEY.get(key.data_ptr())
    if layer is None:
        raise RuntimeError("vllm_slora: the paged LoRA op got a tensor that is no layer's "
                           "lora_key (was the model moved after its LoRA layers were made?)")
    return layer


def _slora_paged_lora_fake(x: torch.Tensor, y: torch.Tensor, key: torch.Tensor) -> None:
    return None


def register_op() -> None:
    if hasattr(torch.ops.vllm, "slora_paged_lora"):
        return
    from vllm.platforms import current_platform
    from vllm.utils.torch_utils import direct_register_custom_op, vllm_lib

    direct_register_custom_op(op_name="slora_paged_lora", op_func=_slora_paged_lora,
                              mutates_args=["y"], fake_impl=_slora_paged_lora_fake)
    if current_platform.dispatch_key != "CPU":  # CPU tensors too (the reference path)
        vllm_lib.impl("slora_paged_lora", _slora_paged_lora, dispatch_key="CPU")
