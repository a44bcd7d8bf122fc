"""Patch of ``vllm.config.compilation`` (vLLM 0.26-0.34): paged LoRA between CUDA-graph pieces.

The paged LoRA layers read their per-step metadata from static buffers
(``vllm_slora/memory/step.py``), so vLLM captures them in its own CUDA
graphs, full and piecewise, as it captures stock LoRA: that is the default
(``VLLM_SLORA_CUDAGRAPH=captured``), and this patch then changes nothing.
``between-pieces`` is kept as a setting, for comparison: the op runs
between graph pieces, as attention does.

Why: vLLM runs attention, whose metadata also changes every step, outside
its piecewise CUDA graphs by naming the op in
``CompilationConfig.splitting_ops``; the paged LoRA op does the same when
it is not captured.

What (``between-pieces``): ``CompilationConfig.set_splitting_ops_for_v1`` (called
at the end of ``VllmConfig.__post_init__``) runs as stock, then appends the
paged LoRA op (``vllm::slora_paged_lora``) to the splitting ops and
downgrades full CUDA graphs (which would capture it) to piecewise ones. If
the compilation splits nothing (``splitting_ops=[]``), graphs are turned
off, with a warning.

Guard: vLLM 0.26-0.34; ``CompilationConfig.set_splitting_ops_for_v1``,
``CompilationMode.VLLM_COMPILE``, ``CUDAGraphMode.PIECEWISE``. Goes away
with the comparison setting.
"""

from __future__ import annotations

import functools
import logging

from vllm_slora.patches import guard_touches

TARGET = "vllm.config.compilation"
TOUCHES = {TARGET: ("CompilationConfig.set_splitting_ops_for_v1", "CompilationMode.VLLM_COMPILE",
                    "CUDAGraphMode.PIECEWISE")}
PAGED_LORA_OP = "vllm::slora_paged_lora"
logger = logging.getLogger("vllm_slora")


def place_paged_lora_between_pieces(cc, CompilationMode, CUDAGraphMode) -> None:
    if cc.mode != CompilationMode.VLLM_COMPILE or not cc.splitting_ops:
        if cc.cudagraph_mode != CUDAGraphMode.NONE:
            logger.warning("vllm_slora: no piecewise compilation, so CUDA graphs "
                           "(%s) are turned off in S-LoRA mode", cc.cudagraph_mode.name)
            cc.cudagraph_mode = CUDAGraphMode.NONE
        return
    if PAGED_LORA_OP not in cc.splitting_ops:
        cc.splitting_ops.append(PAGED_LORA_OP)
    if cc.cudagraph_mode.has_full_cudagraphs():
        logger.info("vllm_slora: cudagraph_mode %s -> PIECEWISE (paged LoRA runs "
                    "between graph pieces)", cc.cudagraph_mode.name)
        cc.cudagraph_mode = CUDAGraphMode.PIECEWISE


def apply() -> None:
    from vllm.config import compilation

    from vllm_slora.config import slora_config

    if slora_config().cudagraph != "between-pieces":
        return

    guard_touches(TOUCHES)
    CompilationConfig = compilation.CompilationConfig
    stock = CompilationConfig.set_splitting_ops_for_v1

    @functools.wraps(stock)
    def set_splitting_ops_for_v1(self, *args, **kwargs):
        stock(self, *args, **kwargs)
        place_paged_lora_between_pieces(self, compilation.CompilationMode,
                                        compilation.CUDAGraphMode)

    CompilationConfig.set_splitting_ops_for_v1 = set_splitting_ops_for_v1
