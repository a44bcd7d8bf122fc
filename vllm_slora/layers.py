"""LoRA layers that read adapters from KV-cache pages.

``PagedLoRALinear`` wraps one vLLM linear layer of a model layer (``qkv_proj``,
``o_proj``, ``gate_up_proj`` or ``down_proj``): the base layer runs as usual,
then ``vllm_slora.kernels.paged_lora`` adds the batch's adapters, read through
the vector tables from that model layer's pool. It owns no weights: there is
no ``max_loras x max_rank`` tensor anywhere.

The LoRA part runs as the custom op ``torch.ops.vllm.slora_paged_lora`` so
that torch.compile treats it as opaque (its metadata is Python state of the
pager, set per step).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from vllm_slora.kernels import paged_lora

_LAYERS: dict[str, "PagedLoRALinear"] = {}
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


class PagedLoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, name: str, group: str, pager):
        super().__init__()
        m = _LAYER_INDEX.search(f".{name}")
        if m is None:
            raise ValueError(f"vllm_slora cannot tell the model layer of '{name}'")
        self.base_layer = base_layer
        self.layer_name = name
        self.group = group
        self.layer_idx = int(m.group(1))
        self.pager = pager
        _LAYERS[name] = self

    def forward(self, x: torch.Tensor):
        out = self.base_layer(x)
        y = out[0] if isinstance(out, tuple) else out
        torch.ops.vllm.slora_paged_lora(x, y, self.layer_name)
        return out

    def apply_lora(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y += adapters(x), in place; x [T, K], y [T, N] (or with a leading batch dim)."""
        batch = self.pager.batch
        if batch is None or batch.max_rank[self.group] == 0:
            return
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        token_lora = batch.token_lora
        t = x2.shape[0]
        if token_lora.shape[0] != t:  # padded (or trimmed) batches: pad tokens get no LoRA
            pad = token_lora.new_full((t,), -1)
            n = min(t, token_lora.shape[0])
            pad[:n] = token_lora[:n]
            token_lora = pad
        a_rows, b_rows = self.pager.vectors.group_tables[self.group]
        if len(a_rows) == 1:
            a_rows, b_rows = a_rows[0], b_rows[0]
        same = token_lora is batch.token_lora  # segments and meta describe it
        paged_lora(x2, y2, self.pager.pools[self.layer_idx], a_rows, b_rows,
                   batch.lora_start, batch.rank[self.group], batch.lora_scale, token_lora,
                   segments=batch.segments if same else None,
                   max_rank=batch.max_rank[self.group], meta=batch.meta if same else None)

    def extra_repr(self) -> str:
        return f"group={self.group}, layer={self.layer_idx}"


def _slora_paged_lora(x: torch.Tensor, y: torch.Tensor, layer_name: str) -> None:
    _LAYERS[layer_name].apply_lora(x, y)


def _slora_paged_lora_fake(x: torch.Tensor, y: torch.Tensor, layer_name: str) -> None:
    return None


def register_op() -> None:
    if hasattr(torch.ops.vllm, "slora_paged_lora"):
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(op_name="slora_paged_lora", op_func=_slora_paged_lora,
                              mutates_args=["y"], fake_impl=_slora_paged_lora_fake)
