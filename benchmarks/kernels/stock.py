"""Stock vLLM 0.26's LoRA ops as ``PunicaWrapperGPU.add_lora_linear`` calls
them: lora_shrink then lora_expand with LoRAKernelMeta.meta_args, on the same
adapters laid out vLLM's way (stacked [max_loras, 1, max_rank, K] /
[max_loras, 1, N, max_rank], padded to the largest rank, the scale folded
into B), plus a torch emulation of their math for the CPU dry run, which
checks the layout we hand them without a GPU.
"""


def stock_layout(ad, r_max):
    """The adapters as vLLM stacks them (LoRA layers' lora_a/b_stacked).

    Per slice A [L, 1, r_max, K] and B [L, 1, N, r_max], zero-padded to
    r_max; vLLM folds the LoRA scale into B when it loads an adapter.
    """
    from vllm_slora.kernels.bmm import _padded

    meta = (ad.lora_start, ad.lora_rank)
    a = tuple(_padded(ad.pool, t, *meta, r_max).unsqueeze(1).contiguous() for t in ad.a_rows)
    scale = ad.lora_scale.to(ad.pool.dtype)[:, None, None, None]
    b = tuple(
        (_padded(ad.pool, t, *meta, r_max).transpose(1, 2).unsqueeze(1) * scale).contiguous()
        for t in ad.b_rows
    )
    return a, b


class Stock:
    """vLLM 0.26's lora_shrink / lora_expand on the stock stacked layout."""

    def __init__(self, torch, ad, r_max, token_lora, num_slices, x):
        from vllm.lora.ops.triton_ops import LoRAKernelMeta, lora_expand, lora_shrink
        from vllm.lora.ops.triton_ops import utils as stock_utils

        # The stock ops cache weight pointers/strides by data_ptr only; a new
        # tensor at a freed address would reuse stale strides.
        stock_utils._LORA_A_PTR_DICT.clear()
        stock_utils._LORA_B_PTR_DICT.clear()
        self.shrink, self.expand = lora_shrink, lora_expand
        self.a, self.b = stock_layout(ad, r_max)
        t = token_lora.shape[0]
        self.meta = LoRAKernelMeta.make(ad.lora_rank.shape[0], t, device=token_lora.device)
        self.meta.prepare_tensors(token_lora)
        self.args = self.meta.meta_args(t, False)
        self.buf = torch.empty(num_slices, t, r_max, dtype=torch.float32, device=token_lora.device)
        self.x = x

    def __call__(self, y):
        self.shrink(self.x, self.a, self.buf, *self.args, 1.0)
        self.expand(self.buf, self.b, y, *self.args, offset_start=0, add_inputs=True)


def stock_emulated(torch, stock_a, stock_b, x, y, token_lora):
    """Torch version of the stock ops' math on the stacked layout (dry run)."""
    for i, lora in enumerate(token_lora.tolist()):
        if lora < 0:
            continue
        v = [x[i].float() @ a[lora, 0].float().t() for a in stock_a]
        delta = torch.cat([vv @ b[lora, 0].float().t() for vv, b in zip(v, stock_b)])
        y[i] = (y[i].float() + delta).to(y.dtype)
