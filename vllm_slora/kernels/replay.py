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

How a replay launches (``LAUNCH``): ``direct`` (the default) calls the
compiled kernel's C launcher itself, with every pointer as an integer (the
recorded tensors' addresses, taken once; the swapped ones' at the call) and
no launch hooks. Through ``CompiledKernel.run`` (``LAUNCH = "triton"``, or
``VLLM_SLORA_REPLAY=triton``) each launch also builds Triton's launch
metadata in Python, calls its enter and exit hook chains (never empty
objects, so always called) and, for each of the ~20 tensor arguments,
calls ``data_ptr()`` and asks the driver whether the address is device
memory. On the H100 an eager 656-token step of a 7B model spent ~100 us
of host time per LoRA layer call, mostly there, and its host, not the GPU,
set the step's pace (``benchmarks/results/gpu-vllm-0.34-2026-12-06.md``).
A kernel that needs Triton's global or profile scratch memory (allocated
per launch), another backend's launcher (ROCm) or a Triton whose NVIDIA
launcher takes other leading arguments (``DIRECT_FORMAT``) always goes
through ``CompiledKernel.run``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch

_MODE = os.environ.get("VLLM_SLORA_REPLAY", "1").strip().lower()
# VLLM_SLORA_REPLAY=0: every eager call through Triton (for comparison).
ENABLED = _MODE != "0"
# How replays launch: "direct" (the C launcher, integer pointers, no hooks)
# or "triton" (CompiledKernel.run, as Triton launches); VLLM_SLORA_REPLAY=triton.
LAUNCH = "triton" if _MODE == "triton" else "direct"

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
    # The direct launch: the C launcher, its arguments before the kernel's
    # and the kernel's with tensors as addresses (None: not possible).
    direct: tuple | None = None


def current_stream() -> int:
    """The current CUDA stream's handle (as Triton's driver gets it)."""
    return torch._C._cuda_getCurrentRawStream(torch._C._cuda_getDevice())


# The arguments Triton's NVIDIA C launcher takes before the kernel's
# (triton/backends/nvidia/driver.py, ``_BASE_ARGS_FORMAT``, Triton 3.5-3.6):
# grid x, y, z, stream, function, cooperative grid, PDL, global scratch,
# profile scratch, packed metadata, launch metadata, enter hook, exit hook.
# Another layout (another Triton) replays through CompiledKernel.run.
DIRECT_FORMAT = "iiiKKppOOOOOO"


@functools.cache
def launcher_format() -> str | None:
    """The installed Triton's NVIDIA launcher layout (None: not found)."""
    try:
        from triton.backends.nvidia import driver as nvidia
    except Exception:  # no NVIDIA backend
        return None
    return getattr(nvidia, "_BASE_ARGS_FORMAT", None)


def _direct(kernel, values: list) -> tuple | None:
    """(launch, head, ints) for calling ``kernel``'s C launcher as
    ``launch(*grid, stream, *head, *ints)``, or None where Triton's own
    launch must run (another launcher or layout, scratch memory to allocate)."""
    runner = kernel.run
    needed = ("launch", "global_scratch_size", "profile_scratch_size",
              "launch_cooperative_grid", "launch_pdl")
    if type(runner).__name__ != "CudaLauncher" or launcher_format() != DIRECT_FORMAT:
        return None
    if not all(hasattr(runner, a) for a in needed):
        return None
    if runner.global_scratch_size > 0 or runner.profile_scratch_size > 0:
        return None
    head = (kernel.function, runner.launch_cooperative_grid, runner.launch_pdl, None, None,
            kernel.packed_metadata, None, None, None)
    ints = [v.data_ptr() if isinstance(v, torch.Tensor) else v for v in values]
    return runner.launch, head, ints


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
        if LAUNCH == "direct" and all(launch.direct is not None for launch in self.launches):
            stream = current_stream()
            ptrs = {role: t.data_ptr() for role, t in tensors.items()}
            for launch in self.launches:
                fn, head, ints = launch.direct
                if launch.swap:
                    ints = list(ints)
                    for role, i in launch.swap:
                        ints[i] = ptrs[role]
                fn(*launch.grid, stream, *head, *ints)
            return
        self._through_triton(tensors)

    def _through_triton(self, tensors: dict) -> None:
        from triton import knobs

        stream = current_stream()
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
        grid3 = tuple(grid) + (1,) * (3 - len(grid))
        self.replay.launches.append(Launch(kernel, grid3, values, swap, _direct(kernel, values)))

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
