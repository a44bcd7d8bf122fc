"""``PagedLoRAWorkerManager``: the model runner's LoRA manager in S-LoRA mode.

It stands in for vLLM's ``LRUCacheWorkerLoRAManager`` (same methods, which is
all both model runners call) but keeps no LoRA slots: it wraps the model's
projections in ``PagedLoRALinear`` layers, applies the scheduler's paging
plan before each step (``apply_plan``) and turns the runner's per-token LoRA
ids into the pager's batch metadata (``set_active_adapters``).
"""

from __future__ import annotations

import contextlib
import re
import time

import numpy as np
import torch

from vllm.logger import init_logger

from vllm_slora.layers import PagedLoRALinear, register_op
from vllm_slora.memory.layout import GROUPS, deployment_kinds, lora_targets
from vllm_slora.memory.messages import PagingPlan
from vllm_slora.memory.pager import Pager
from vllm_slora.memory.step import StepLimits

# Under "vllm." so that vLLM's log handler prints it in every process.
logger = init_logger("vllm.plugins.vllm_slora")
# vLLM internals this module relies on (the drift check's list): the manager
# it stands in for (its methods are what the runners call) and the runners'
# LoRA entry.
TOUCHES = {
    "vllm.lora.worker_manager": ("LRUCacheWorkerLoRAManager",),
    "vllm.v1.worker.lora_model_runner_mixin": ("LoRAModelRunnerMixin.load_lora_model",),
}
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class PagedLoRAWorkerManager:
    def __init__(self, vllm_config, device: torch.device, embedding_modules=None):
        self.vllm_config = vllm_config
        self.lora_config = vllm_config.lora_config
        self.device = torch.device(device)
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size > 1:
            raise NotImplementedError(
                "vllm_slora pages adapters without pipeline parallelism; use "
                "--tensor-parallel-size, or drop --plugin vllm_slora")
        tp_size, tp_rank = parallel.tensor_parallel_size, 0
        if tp_size > 1:
            from vllm.distributed import get_tensor_model_parallel_rank

            tp_rank = get_tensor_model_parallel_rank()
        # --lora-target-modules: the kinds LoRA applies to (None: all), as the scheduler pages them.
        self.pager = Pager(vllm_config.model_config.hf_text_config, self.lora_config.lora_dtype,
                           self.device, tp_size, tp_rank,
                           kinds=deployment_kinds(getattr(self.lora_config, "target_modules", None)))
        self.layers: list[PagedLoRALinear] = []
        # The engine's KV cache exists (``kv_ready``): only then may the pager
        # bind to the layers' KV tensors (earlier ones are profiling caches).
        self._kv_ready = False
        self._dummy: set[int] = set()
        self._registered: dict[int, str] = {}

    # -- model ------------------------------------------------------------
    def create_lora_manager(self, model: torch.nn.Module, vllm_config=None) -> torch.nn.Module:
        register_op()
        # A mixture-of-experts model has no dense MLP projections to wrap: LoRA
        # on attention only (adapters.check_adapter refuses the others); with
        # --lora-target-modules only the groups it names.
        targets, allowed = lora_targets(self.pager.hf_config), self.pager.kinds
        groups = [g for g, kinds in GROUPS.items()
                  if kinds[0] in targets and (allowed is None or kinds[0] in allowed)]
        if not groups:
            raise ValueError(
                f"--lora-target-modules {', '.join(self.lora_config.target_modules)} names none "
                f"of the projections vllm_slora serves on this model ({', '.join(targets)}, or "
                f"their fused layers qkv_proj, gate_up_proj)")
        for name, module in list(model.named_modules()):
            parent_name, _, leaf = name.rpartition(".")
            if leaf in groups and not isinstance(module, PagedLoRALinear):
                layer = PagedLoRALinear(module, name, leaf, self.pager)
                setattr(model.get_submodule(parent_name), leaf, layer)
                self.layers.append(layer)
        expected = len(groups) * self.pager.hf_config.num_hidden_layers
        if len(self.layers) != expected or {layer.group for layer in self.layers} != set(groups):
            raise ValueError(
                f"vllm_slora wrapped {len(self.layers)} projections of "
                f"{type(model).__name__}, expected {expected} ({', '.join(groups)} per layer); "
                f"supported: Llama-style models (Llama 2/3, Mistral, Qwen2/2.5, Qwen3), and "
                f"attention LoRA on mixture-of-experts models")
        self.layers[0].builds_meta = True  # layers.0.qkv_proj: the forward's first
        logger.info("vllm_slora: %d projections read adapters from KV-cache pages "
                    "(no LoRA slots, no stacked LoRA weights)", len(self.layers))
        return model

    # -- per step -----------------------------------------------------------
    def apply_plan(self, plan: PagingPlan) -> None:
        # The pager's tensors are made where the runner binds it, in inference
        # mode (CUDA-graph capture, the first step): update them there too.
        with torch.inference_mode():
            if not self._bind():
                raise RuntimeError("vllm_slora got a paging plan before the KV cache exists")
            self.pager.apply(plan)

    def kv_ready(self) -> None:
        """The worker allocated the KV cache the engine serves with (the
        worker patch calls this after ``Worker.initialize_from_config``)."""
        self._kv_ready = True

    def _bind(self) -> bool:
        """Bind the pager once the engine's KV cache exists (before CUDA-graph
        capture, which must record the LoRA kernels on the pager's static
        buffers). Since vLLM 0.29 the CUDA runner captures graphs on a small
        KV cache of its own first, to measure their memory, and frees it:
        those captures run without LoRA kernels, as 0.26's profiling runs do."""
        if self.pager.bound:
            return True
        if not self._kv_ready:
            return False
        num_blocks = self.vllm_config.cache_config.num_gpu_blocks
        kv = self._kv_caches()
        if not num_blocks or not kv:
            return False
        self.pager.bind(kv, num_blocks, self._step_limits())
        self._compile_eager_variants()
        return True

    def _compile_eager_variants(self) -> None:
        """Run once every kernel variant a step outside the CUDA graphs can
        launch, so that no Triton compilation happens while serving (graph
        capture compiles those of the captured sizes)."""
        from vllm_slora.kernels import batch_meta, paged_lora, variants

        cc = self.vllm_config.compilation_config
        captured = max(cc.cudagraph_capture_sizes or [0]) if cc.cudagraph_mode else 0
        step, geo, pager = self.pager.step, self.pager.geo, self.pager
        if not variants.compiled_backend(step.token_lora):
            return
        started, runs = time.perf_counter(), 0
        for group, kinds in GROUPS.items():
            k = geo.width(kinds[0])[0]
            widths = [geo.width(kind)[1] for kind in kinds]
            for t in variants.representative_sizes(captured + 1, step.limits, k, max(widths),
                                                   len(kinds), geo.page_width, geo.dtype,
                                                   self.device):
                x = torch.zeros(t, k, dtype=geo.dtype, device=self.device)
                y = torch.zeros(t, sum(widths), dtype=geo.dtype, device=self.device)
                token_lora = step.token_lora[:t]  # all -1 before the first step
                meta = batch_meta(token_lora, step.limits.max_loras, out=step.meta_for(t))
                a_rows, b_rows = pager.vectors.group_tables[group]
                paged_lora(x, y, pager.pools[0], a_rows, b_rows, step.lora_start,
                           step.rank[group], step.lora_scale, token_lora,
                           max_rank=step.limits.max_rank, meta=meta, dispatch=False)
                runs += 1
        torch.cuda.synchronize(self.device)
        logger.info("vllm_slora: compiled the paged LoRA kernels of steps over %d tokens "
                    "(%d variants) in %.1f s", captured, runs, time.perf_counter() - started)

    def _step_limits(self) -> StepLimits:
        sched = self.vllm_config.scheduler_config
        sizes = self.vllm_config.compilation_config.cudagraph_capture_sizes or [0]
        return StepLimits(max_tokens=max(sched.max_num_batched_tokens, max(sizes)),
                          max_loras=sched.max_num_seqs,
                          max_rank=self.lora_config.max_lora_rank)

    def _kv_caches(self) -> dict[int, torch.Tensor]:
        context = self.vllm_config.compilation_config.static_forward_context
        out: dict[int, torch.Tensor] = {}
        for name, module in context.items():
            kv = getattr(module, "kv_cache", None)
            m = _LAYER_INDEX.search(name)
            if isinstance(kv, torch.Tensor) and kv.numel() and m:
                out[int(m.group(1))] = kv
        return out

    def set_active_adapters(self, requests, mapping) -> None:
        if mapping is None or mapping.type.name != "LANGUAGE":
            return
        ids = np.asarray(mapping.index_mapping, dtype=np.int64)
        if not self._bind():
            # Warm-up and profiling runs before the KV cache exists use dummy ids.
            unknown = set(np.unique(ids[ids > 0]).tolist()) - self._dummy
            if unknown:
                raise RuntimeError(f"adapters {sorted(unknown)} used before the KV cache exists")
            self.pager.batch = None
            return
        self.pager.set_batch(ids, self._dummy)

    # -- the LRUCacheWorkerLoRAManager surface the runners use -----------------
    def add_adapter(self, lora_request) -> bool:
        self._registered[lora_request.lora_int_id] = lora_request.lora_path
        self.pager.read_ahead.prefetch([lora_request.lora_path])
        return True

    def remove_adapter(self, adapter_id: int) -> bool:
        path = self._registered.pop(adapter_id, None)
        if path is not None:
            self.pager.read_ahead.drop(path)
        return path is not None

    def remove_all_adapters(self) -> None:
        self._dummy.clear()

    def list_adapters(self) -> set[int]:
        return set(self._registered) | set(self.pager.resident)

    def pin_adapter(self, adapter_id: int) -> bool:
        # The scheduler's AdapterPool holds the pin (patches/vllm_v1_engine_core.py,
        # apply_pins); this worker pages the adapter in as its plans say.
        return True

    @contextlib.contextmanager
    def dummy_lora_cache(self):
        yield

    def add_dummy_lora(self, lora_request, rank: int) -> bool:
        self._dummy.add(lora_request.lora_int_id)
        return True

    def get_dummy_lora_warmup_rank(self, default_rank: int) -> int:
        return default_rank

    def supports_tower_connector_lora(self) -> bool:
        return False

    @property
    def is_enabled(self) -> bool:
        return True

    def stats(self) -> dict:
        return dict(self.pager.stats(), scheduler=self.pager.scheduler_stats)

    def take_faults(self) -> dict[int, str]:
        """Adapters whose upload failed since the last call (lora id -> cause),
        for the scheduler: the worker patch sends them with the step's output."""
        return self.pager.take_faults()
