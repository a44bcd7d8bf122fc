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

import numpy as np
import torch

from vllm.logger import init_logger

from vllm_slora.config import slora_config
from vllm_slora.layers import PagedLoRALinear, register_op
from vllm_slora.memory.layout import GROUPS
from vllm_slora.memory.pager import Pager
from vllm_slora.memory.plan import PagingPlan

# Under "vllm." so that vLLM's log handler prints it in every process.
logger = init_logger("vllm.plugins.vllm_slora")
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
        graphs = vllm_config.compilation_config.cudagraph_mode
        if self.device.type == "cuda" and graphs is not None and graphs.has_full_cudagraphs():
            # The per-step batch metadata are fresh tensors and the layers
            # branch in Python, which a full graph would freeze; the patch of
            # vllm.config.compilation keeps the layers between graph pieces.
            raise NotImplementedError(
                f"vllm_slora's paged LoRA layers cannot run inside full CUDA graphs "
                f"(cudagraph_mode={graphs.name}); use -cc.cudagraph_mode=PIECEWISE "
                f"or --enforce-eager")
        self.pager = Pager(vllm_config.model_config.hf_text_config, self.lora_config.lora_dtype,
                           self.device, slora_config().host_cache_bytes, tp_size, tp_rank)
        self.layers: list[PagedLoRALinear] = []
        self._dummy: set[int] = set()
        self._registered: dict[int, str] = {}

    # -- model ------------------------------------------------------------
    def create_lora_manager(self, model: torch.nn.Module, vllm_config=None) -> torch.nn.Module:
        register_op()
        for name, module in list(model.named_modules()):
            parent_name, _, leaf = name.rpartition(".")
            if leaf in GROUPS and not isinstance(module, PagedLoRALinear):
                layer = PagedLoRALinear(module, name, leaf, self.pager)
                setattr(model.get_submodule(parent_name), leaf, layer)
                self.layers.append(layer)
        expected = len(GROUPS) * self.pager.hf_config.num_hidden_layers
        if len(self.layers) != expected:
            raise ValueError(
                f"vllm_slora wrapped {len(self.layers)} projections of "
                f"{type(model).__name__}, expected {expected} ({', '.join(GROUPS)} per layer); "
                f"only Llama-style models are supported")
        logger.info("vllm_slora: %d projections read adapters from KV-cache pages "
                    "(no LoRA slots, no stacked LoRA weights)", len(self.layers))
        return model

    # -- per step -----------------------------------------------------------
    def apply_plan(self, plan: PagingPlan) -> None:
        if not self.pager.bound:
            self.pager.bind(self._kv_caches(), plan.stats["num_gpu_blocks"])
            self.pager.host.prefetch(list(self._registered.values()))
        self.pager.apply(plan)

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
        if not self.pager.bound:
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
        if self.pager.bound:
            self.pager.host.prefetch([lora_request.lora_path])
        return True

    def remove_adapter(self, adapter_id: int) -> bool:
        path = self._registered.pop(adapter_id, None)
        if path is not None and self.pager.bound:
            self.pager.host.drop(path)
        return path is not None

    def remove_all_adapters(self) -> None:
        self._dummy.clear()

    def list_adapters(self) -> set[int]:
        return set(self._registered) | set(self.pager.resident)

    def pin_adapter(self, adapter_id: int) -> bool:
        logger.warning("vllm_slora: pinning adapter %d has no effect; adapters stay "
                       "resident while used and cached while pages are free", adapter_id)
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
