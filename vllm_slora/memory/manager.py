"""``PagedKVCacheManager``: vLLM's KV-cache manager that also pages adapters.

Admission: a request whose adapter it does not hold yet is given KV blocks
only if its adapter's missing blocks fit beside them (stock ``allocate_slots``
with ``reserved_blocks`` raised by that many), and then takes the adapter's
blocks. Pressure: whenever stock ``allocate_slots`` says no (admission or a
running request's growth) the least recently used unreferenced adapter is
evicted and the call retried, but only if evicting every cached adapter
would make the request fit (``blocks_required``: the blocks stock asks for,
computed as stock does); otherwise ``None`` reaches the scheduler at once,
which then preempts or waits exactly as stock, and the cache keeps its
adapters (no thrash: a request that cannot fit does not empty the cache
step after step).

Faults: an adapter that cannot be paged in (``pool.AdapterFault``: files
removed, unreadable or replaced by an invalid adapter after registration,
more blocks than the KV cache has) fails only its request; one whose upload
fails in a worker after these checks (``worker_faults``: a file changed or
unreadable between the check and the read) fails the requests using it. ``allocate_slots``
returns ``None`` for it (nothing is taken) and records the cause in
``faults``; the scheduler patch finishes such requests with vLLM's
``FINISHED_ERROR`` at the end of the step, which frees whatever they hold.
"""

from __future__ import annotations

import functools
import inspect

from vllm.logger import init_logger
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.kv_cache_interface import AttentionSpec
from vllm.v1.request import RequestStatus

from vllm_slora.config import slora_config
from vllm_slora.memory.layout import PageGeometry, deployment_kinds
from vllm_slora.memory.adapter_pool import AdapterFault, AdapterPool, SeparateRegion

logger = init_logger("vllm.plugins.vllm_slora")
# vLLM internals this module relies on (the drift check's list,
# ``python -m vllm_slora.compat``): the manager it extends, the block count
# it computes as stock does, and the block pool the adapter pool takes from.
TOUCHES = {
    "vllm.v1.core.kv_cache_manager": ("KVCacheManager.allocate_slots", "KVCacheManager.free",
                                      "KVCacheManager.pop_blocks_for_free",
                                      "KVCacheManager.reset_prefix_cache"),
    "vllm.v1.core.kv_cache_coordinator": ("KVCacheCoordinator.get_num_blocks_to_allocate",),
    "vllm.v1.core.block_pool": ("BlockPool.get_new_blocks", "BlockPool.free_blocks",
                                "BlockPool.get_num_free_blocks"),
}
_ALLOCATE = inspect.signature(KVCacheManager.allocate_slots)
if "reserved_blocks" not in _ALLOCATE.parameters:
    raise ImportError("vllm_slora needs KVCacheManager.allocate_slots(..., reserved_blocks=...) "
                      "of vLLM 0.26")


class PagedKVCacheManager(KVCacheManager):
    adapters: AdapterPool | None = None
    # request id -> why its adapter cannot be paged in (until it is freed)
    faults: dict[str, str]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.faults = {}

    def enable_adapters(self, hf_config, lora_dtype, tp_size: int = 1,
                        max_lora_rank: int | None = None,
                        target_modules: list[str] | None = None) -> AdapterPool:
        """Page adapters in this manager's blocks. With ``max_lora_rank``, an
        adapter is checked again (``vllm_slora.adapters.check_adapter``, cached
        per file version) each time it is paged in: one changed on disk after
        its request was accepted fails that request, not the engine.
        ``target_modules`` (vLLM's ``--lora-target-modules``): only those
        groups' weights are paged in."""
        groups = self.kv_cache_config.kv_cache_groups
        if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, AttentionSpec):
            arch = ", ".join(getattr(hf_config, "architectures", None) or ["this model"])
            kinds = ", ".join(type(g.kv_cache_spec).__name__ for g in groups)
            problem = (f"vllm_slora pages adapters in a single attention KV-cache group; {arch} "
                       f"has {len(groups)} ({kinds})")
            if groups and all(isinstance(g.kv_cache_spec, AttentionSpec) for g in groups):
                raise ValueError(
                    f"{problem}: attention layers of several kinds, kept apart by vLLM's hybrid "
                    f"KV cache manager. Start without --no-disable-hybrid-kv-cache-manager "
                    f"(disable_hybrid_kv_cache_manager=False for vllm.LLM): S-LoRA mode turns "
                    f"the manager off, so that they share one group")
            raise ValueError(
                f"{problem}: layers that are not all attention (e.g. Mamba beside attention). "
                f"Supported: models whose layers are all attention (Llama 2/3, Mistral, "
                f"Qwen2/2.5, Qwen3, Phi-3, Gemma 2); run {arch} without --plugin vllm_slora")
        geo = PageGeometry.create(hf_config, lora_dtype, groups[0].kv_cache_spec.page_size_bytes,
                                  tp_size=tp_size)
        config = slora_config()
        source = self.block_pool
        if not config.unify_mem:
            source = SeparateRegion(self.block_pool,
                                    int(config.separate_fraction * self.block_pool.num_gpu_blocks))
        check = None
        if max_lora_rank is not None:
            from vllm_slora.adapters import check_adapter

            check = functools.partial(check_adapter, name=None, hf_config=hf_config,
                                      max_rank=max_lora_rank)
        self.adapters = AdapterPool(source, geo, check, deployment_kinds(target_modules))
        return self.adapters

    def allocate_slots(self, request, *args, reserved_blocks: int = 0, **kwargs):
        pool, lora = self.adapters, request.lora_request
        growth = pool is None or lora is None or lora.lora_int_id <= 0 or pool.holds(request.request_id)
        if growth:
            # No adapter to page in (a running request's growth, mostly: every
            # step, every request): stock, and the evicting path only if it says no.
            blocks = super().allocate_slots(request, *args, reserved_blocks=reserved_blocks, **kwargs)
            if blocks is not None or pool is None or not pool.unified:
                return blocks
        stock = functools.partial(super().allocate_slots, request, *args, **kwargs)
        required = functools.partial(self.blocks_required, request, *args, **kwargs)
        if growth:
            return self._allocate_evicting(stock, reserved_blocks, lambda: 0, required,
                                           refused=True)
        lora_id, path = lora.lora_int_id, lora.lora_path
        if request.request_id in self.faults:
            return None  # failed already; finished with its error at the end of the step
        pool.pin(lora_id)  # a resident adapter must survive its own request's admission
        try:
            if pool.unified:
                blocks = self._allocate_evicting(stock, reserved_blocks,
                                                 lambda: pool.blocks_missing(lora_id, path), required)
            elif self._room_in_region(lora_id, path):
                blocks = self._allocate_evicting(stock, reserved_blocks, lambda: 0, required)
            else:
                blocks = None
            if blocks is not None:
                pool.acquire(request.request_id, lora_id, path)
            return blocks
        except AdapterFault as e:
            # Blocks stock may have given the request go back when the
            # scheduler finishes it (free).
            self.faults[request.request_id] = str(e)
            logger.error("vllm_slora: request %s fails: %s", request.request_id, e)
            return None
        finally:
            pool.unpin(lora_id)

    def worker_faults(self, faults: dict[int, str]) -> set[str]:
        """Adapters a worker could not page in (lora id -> cause): each is
        dropped from the pool and the requests using it fail with the cause
        (returned: the scheduler finishes them with ``FINISHED_ERROR``)."""
        failed = set()
        for lora_id, cause in faults.items():
            using = self.adapters.fault(lora_id)
            self.faults.update(dict.fromkeys(using, cause))
            failed |= using
            logger.error("vllm_slora: %s; failing its %d running request(s)", cause, len(using))
        return failed

    def _allocate_evicting(self, stock, reserved: int, adapter_blocks, required,
                           refused: bool = False):
        """Stock ``allocate_slots`` leaving ``adapter_blocks()`` free for the
        adapter; while it says no, evict the LRU cached adapter and retry, if
        evicting them all would make ``required()`` blocks fit. ``refused``:
        the caller's own stock call said no already."""
        pool = self.adapters
        blocks = None if refused else stock(reserved_blocks=reserved + adapter_blocks())
        evictable = pool.evictable_blocks() if blocks is None and pool.unified else 0
        if not evictable:
            return blocks
        need = required()
        if need is not None and (need + reserved + adapter_blocks()
                                 > self.block_pool.get_num_free_blocks() + evictable):
            pool.counters["evictions_spared"] += 1  # it cannot fit: keep the cache
            return None
        while pool.evict_one():
            blocks = stock(reserved_blocks=reserved + adapter_blocks())
            if blocks is not None:
                return blocks
        return None

    def blocks_required(self, request, *args, **kwargs) -> int | None:
        """The free blocks stock ``allocate_slots(request, *args, **kwargs)``
        asks for (new blocks plus the admission watermark), computed as vLLM
        0.26 computes them; None if this vLLM's internals differ."""
        try:
            a = _ALLOCATE.bind(self, request, *args, **kwargs)
            a.apply_defaults()
            a = a.arguments
            computed = a["new_computed_blocks"]
            computed = (self.empty_kv_cache_blocks if computed is None else computed).blocks
            local = request.num_computed_tokens + a["num_new_computed_tokens"]
            total = min(local + a["num_external_computed_tokens"], self.max_model_len)
            main = total + a["num_new_tokens"]
            need = self.coordinator.get_num_blocks_to_allocate(
                request_id=request.request_id,
                num_tokens=min(main + a["num_lookahead_tokens"], self.max_model_len),
                new_computed_blocks=computed, num_encoder_tokens=a["num_encoder_tokens"],
                total_computed_tokens=local + a["num_external_computed_tokens"],
                num_local_computed_tokens=local, num_tokens_main_model=main)
        except (AttributeError, KeyError, TypeError):
            return None
        waiting = request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        return need + (self.watermark_blocks if a["has_scheduled_reqs"] and waiting else 0)

    def _room_in_region(self, lora_id: int, path: str) -> bool:
        pool = self.adapters
        while pool.blocks_missing(lora_id, path) > pool.block_pool.get_num_free_blocks():
            if not pool.evict_one():
                return False
        return True

    def free(self, request) -> None:
        super().free(request)
        self.faults.pop(request.request_id, None)
        if self.adapters is not None:
            self.adapters.release(request.request_id)

    def pop_blocks_for_free(self, request):
        blocks = super().pop_blocks_for_free(request)
        self.faults.pop(request.request_id, None)
        if self.adapters is not None:
            self.adapters.release(request.request_id)
        return blocks

    def reset_prefix_cache(self) -> bool:
        # Stock refuses while any block is in use; cached adapters would block it.
        if self.adapters is not None:
            self.adapters.evict_unreferenced()
        return super().reset_prefix_cache()
