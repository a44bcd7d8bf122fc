"""Facts about the device that plans and launches depend on."""

from __future__ import annotations

import functools
import math
import os

import torch


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int | None) -> int:
    if device_index is None or not torch.cuda.is_available():
        # The CPU interpreter: a small GPU, so that interpreted grids stay
        # small while still exercising split-K.
        return 8
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_index(device: torch.device) -> int | None:
    """The CUDA device's index (the current one if unset); None on CPU."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def interpreter_active() -> bool:
    """Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_f32(x: torch.Tensor) -> bool:
    """Kernels do their dots in fp32: fp32 tensors, or the CPU interpreter,
    whose tl.dot is wrong for bf16."""
    return x.dtype == torch.float32 or not x.is_cuda
