"""Launches recorded once, replayed with other tensors: the eager path's host cost.

A step that fits no CUDA graph (more tokens than the largest capture size)
runs the paged LoRA op as Python in every LoRA layer: grouping and plan
checks, then two or three Triton launches, each through
``JITFunction.run`` (binding ~40 arguments, computing the specialization
key, looking the kernel up). On the H200 machine that is ~130 us of the
engine's thread per layer call, ~9 ms per eager step of a 7B model
(``benchmarks/stacks.py`` on the headline workload), and the engine's
thread, not the GPU, sets the pace of those steps.

Every LoRA layer of one step launches the same kernels with the same grid
and the same arguments except three tensors: the layer's input ``x``, its
page pool and its output ``y`` (the tables, per-step buffers and the
grouping are shared by all layers). ``Recorder`` runs a call's launches
once through Triton, keeping each compiled kernel, grid and bound argument
list; ``Replay.__call__`` launches them again with the layer's tensors
swapped in, straight through the compiled kernel's launcher (no binding,
no key). On the headline workload at 5 adapters this cut the plugin's
steady eager step from 38.9 to 33.5 ms (base: 31.4 and 30.1 ms in the two
calls; ``benchmarks/results/e2e-h200-2026-12-02.md``).
A replay is valid only where Triton would pick the same compiled kernel:
same dtypes, strides and 16-byte alignment of the swapped tensors
(``Replay.matches``), same shapes of everything else (the caller's key).
The interpreter (``TRITON_INTERPRET=1``) has no compiled kernels: nothing
is recorded there. CUDA-graph captures never record (a graph replays its
launches without Python anyway). ``VLLM_SLORA_REPLAY=0`` turns replays
off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

# VLLM_SLORA_REPLAY=0: every eager call through Triton (for comparison).
ENABLED = os.environ.get("VLLM_SLORA_REPLAY", "1").strip() != "0"

# Triton's pointer specialization: a pointer divisible by this is compiled
# as aligned (triton/backends/nvidia/compiler.py, "tt.divisibility").
ALIGN = 16


def enabled(like: torch.Tensor) -> bool:
    """Whether LoRA calls on ``like``'s device may be recorded and replayed:
    Triton kernels compiled for a GPU (not the interpreter, not the torch or
    bmm backends)."""
    from vllm_slora.kernels import _backend

    return (ENABLED and like.is_cuda and _backend(like) == "triton"
            and os.environ.get("TRITON_INTERPRET") != "1")


def _align(t: torch.Tensor) -> bool:
    return t.data_ptr() % ALIGN == 0


@dataclass
class Launch:
    kernel: object  # triton CompiledKernel
    grid: tuple[int, int, int]
    values: list  # every bound argument, in signature order
    swap: list[tuple[str, int]]  # (role "x" / "pool" / "y", index in values)


@dataclass
class Replay:
    launches: list[Launch] = field(default_factory=list)
    # Of the tensors swapped in: (dtype, strides, aligned) as recorded.
    shapes: dict[str, tuple] = field(default_factory=dict)
    keep: list = field(default_factory=list)  # workspaces the launches write

    def matches(self, **tensors: torch.Tensor) -> bool:
        return all(self.shapes.get(role) == (t.dtype, t.stride(), _align(t))
                   for role, t in tensors.items())

    def __call__(self, **tensors: torch.Tensor) -> None:
        from triton import knobs
        from triton.runtime.driver import driver

        device = driver.active.get_current_device()
        stream = driver.active.get_current_stream(device)
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        for launch in self.launches:
            values = launch.values
            if launch.swap:
                values = list(values)
                for role, i in launch.swap:
                    values[i] = tensors[role]
            k = launch.kernel
            meta = k.launch_metadata(launch.grid, stream, *values) if enter is not None else None
            k.run(*launch.grid, stream, k.function, k.packed_metadata, meta, enter, leave, *values)


class Recorder:
    """Pass as ``record`` to ``grouped.lora``: its launches go through
    ``launch`` (Triton runs them as usual) and are kept for ``replay``."""

    def __init__(self, **tensors: torch.Tensor):
        self.tensors = tensors
        self.replay = Replay(shapes={r: (t.dtype, t.stride(), _align(t)) for r, t in tensors.items()})
        self.ok = True

    def launch(self, fn, grid: tuple, args: tuple, kwargs: dict) -> None:
        from triton.runtime.driver import driver

        kernel = fn.run(*args, grid=grid, warmup=False, **kwargs)
        if not self.ok or not hasattr(kernel, "run") or not hasattr(kernel, "packed_metadata"):
            self.ok = False  # the interpreter, or a Triton without compiled launches
            return
        binder = fn.device_caches[driver.active.get_current_device()][4]
        bound, _, _ = binder(*args, **kwargs)
        values = list(bound.values())
        swap = [(role, i) for role, t in self.tensors.items()
                for i, v in enumerate(values) if v is t]
        self.replay.launches.append(Launch(kernel, tuple(grid) + (1,) * (3 - len(grid)), values, swap))

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """A workspace the recorded launches use: kept alive with the replay."""
        self.replay.keep.append(t)
        return t

    def result(self) -> Replay | None:
        return self.replay if self.ok and self.replay.launches else None


def launch(fn, grid: tuple, args: tuple, kwargs: dict, record: Recorder | None = None) -> None:
    """``fn[grid](*args, **kwargs)``, or through ``record``, which also keeps
    the launch for replays."""
    if record is None:
        fn[grid](*args, **kwargs)
    else:
        record.launch(fn, grid, args, kwargs)
