"""Kernel tests run Triton under its interpreter when there is no GPU.

TRITON_INTERPRET must be set before ``triton.jit`` decorates our kernels,
i.e. before ``vllm_slora.kernels.pages`` (every Triton kernel) is first imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
