"""Registers, spills, shared memory and programs per SM of the LoRA kernels, on CPU.

    python -m benchmarks.regs [--batch 216] [--slots 256] [--variants default,reg96]

Compiles the shrink and expand exactly as ``grouped.lora`` would launch them
for a decode step of ``benchmarks.lora_step`` (Llama-2-7B modules, ADAPTERS
grouping, fp16, D = 256) on an H100/H200 (sm_90, 132 SMs), without a GPU:
the launches are caught, their arguments specialised as Triton's JIT does
on the device (alignment, constexprs), compiled for sm_90 and passed through
ptxas. A kernel whose pace is its loads in flight wants many warps per SM;
the table says what bounds them (registers, shared memory for the
pipeline's buffers, warps). Without the JIT's alignment attributes the
same kernels compile to other code (200+ registers, no pipelining): the
specialisation matters.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager

SMS = 132  # H100 SXM / H200
REGS_PER_SM, SMEM_PER_SM, MAX_WARPS, MAX_PROGRAMS = 65536, 233472, 64, 32


def programs_per_sm(regs: int, smem: int, warps: int) -> int:
    """Programs one SM holds at once (register file, shared memory, warps)."""
    per_warp = -(-regs * 32 // 256) * 256  # allocated in units of 256 registers a warp
    by_regs = REGS_PER_SM // (per_warp * warps)
    by_smem = SMEM_PER_SM // (smem + 1024)  # 1 KB a program reserved by the driver
    return min(by_regs, by_smem, MAX_WARPS // warps, MAX_PROGRAMS)


def ptxas_report(ptx: str, arch: str = "sm_90a") -> tuple[int, int]:
    """(registers a thread, spill bytes stored) of a kernel's PTX."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        err = subprocess.run([ptxas, f"-arch={arch}", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", err)
    spill = re.search(r"(\d+) bytes spill stores", err)
    return int(regs.group(1)), int(spill.group(1)) if spill else 0


def compile_sm90(fn, args: tuple, kwargs: dict):
    """Compile a caught launch for sm_90 as the device's JIT would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


@contextmanager
def caught_launches(sms: int):
    """Launches of the shrink and expand recorded instead of run, planned for
    ``sms`` SMs and compiled as on Hopper (fp16 tensor-core dots, PDL)."""
    from vllm_slora.kernels import expand, plan, shrink

    caught = []

    def catch(fn, grid, args, kwargs, record=None):
        kw = dict(kwargs, DOT_F32=False, PDL=True)
        if "launch_pdl" in kw:
            kw["launch_pdl"] = True
        caught.append((fn, grid, args, kw))

    saved = (shrink.launch, expand.launch, plan.num_sms)
    shrink.launch = expand.launch = catch
    plan.num_sms = lambda index: sms
    plan._plan.cache_clear()
    try:
        yield caught
    finally:
        shrink.launch, expand.launch, plan.num_sms = saved
        plan._plan.cache_clear()


def module_launches(batch: int, n: int, slots: int, k: int, ns: list[int], sms: int) -> list:
    """The launches of one module's ``grouped.lora`` call (shapes as in lora_step)."""
    import torch

    from vllm_slora.kernels import grouped, group_by_adapter

    d, r_max, dtype = 256, 64, torch.float16
    token_lora = (torch.arange(batch, dtype=torch.int32) % n)
    meta = group_by_adapter(token_lora, slots)
    start = torch.zeros(slots, dtype=torch.int32)
    rank = torch.full((slots,), 16, dtype=torch.int32)
    scale = torch.ones(slots, dtype=torch.float32)
    pool = torch.zeros(64, d, dtype=dtype)
    a_tables = [torch.zeros(r_max, k // d, dtype=torch.int32) for _ in ns]
    b_tables = [torch.zeros(r_max, w // d, dtype=torch.int32) for w in ns]
    x = torch.zeros(batch, k, dtype=dtype)
    y = torch.zeros(batch, sum(ns), dtype=dtype)
    with caught_launches(sms) as caught:
        grouped.lora(x, y, pool, a_tables, b_tables, start, rank, scale, token_lora, r_max,
                     meta=meta)
    return caught


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=216)
    p.add_argument("--adapters", type=int, default=216)
    p.add_argument("--slots", type=int, default=256)
    p.add_argument("--sms", type=int, default=SMS)
    p.add_argument("--variants", default="default")
    p.add_argument("--modules", default="qkv,o")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
    from benchmarks.lora_step import MODULES, VARIANTS, apply_variant

    print("| variant | module | kernel | warps | registers | spill B | smem KB | programs/SM "
          "| warps/SM |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.variants.split(","):
        old = apply_variant(VARIANTS[name])
        try:
            for module in args.modules.split(","):
                k, ns = MODULES[module]
                for fn, _grid, fargs, kw in module_launches(args.batch, args.adapters, args.slots,
                                                            k, ns, args.sms):
                    compiled = compile_sm90(fn, fargs, kw)
                    regs, spill = ptxas_report(compiled.asm["ptx"])
                    smem, warps = compiled.metadata.shared, kw["num_warps"]
                    occ = programs_per_sm(regs, smem, warps)
                    print(f"| {name} | {module} | {fn.fn.__name__.strip('_')} | {warps} | {regs} | "
                          f"{spill} | {smem / 1024:.0f} | {occ} | {occ * warps} |", flush=True)
        finally:
            apply_variant(old)
    return 0


if __name__ == "__main__":
    sys.exit(main())
