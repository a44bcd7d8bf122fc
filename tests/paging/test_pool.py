"""Scheduler side of unified paging, on vLLM's real BlockPool and KV-cache
manager (no engine): adapter pages come out of the KV block pool and go back
to it, admission needs KV blocks and adapter pages, and cached adapters are
evicted (LRU) before the manager would report "no room" (which makes the
scheduler preempt)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from vllm_slora.versions import at_least

BLOCK = 16  # tokens per block; fp32 block = 16 * 2 * 2 * 32 * 4 B = 8 KiB = 32 pages of D=64


def hf_config(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    return SimpleNamespace(**cfg)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model):
    from vllm_slora.testing.adapters import make_adapters

    return [str(p) for p in make_adapters(tmp_path_factory.mktemp("pool"), tiny_model,
                                          [4, 8, 4, 2], seed=3)]


def make_manager(num_blocks: int, model_dir, max_lora_rank: int | None = None):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    from vllm_slora.memory.manager import PagedKVCacheManager

    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.float32)
    config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                           kv_cache_groups=[KVCacheGroupSpec(["model.layers.0.self_attn.attn"], spec)])
    manager = PagedKVCacheManager(config, max_model_len=1024, scheduler_block_size=BLOCK,
                                  hash_block_size=BLOCK, enable_caching=False)
    manager.enable_adapters(hf_config(model_dir), torch.float32, max_lora_rank=max_lora_rank)
    return manager


def make_request(rid: str, adapter: str | None, lora_id: int, tokens: int = 20):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.v1.request import Request

    lora = LoRARequest(f"a{lora_id}", lora_id, adapter) if adapter else None
    return Request(rid, list(range(3, 3 + tokens)), SamplingParams(max_tokens=8), None,
                   lora_request=lora)


def test_geometry_of_tiny_model(tiny_model):
    manager = make_manager(64, tiny_model)
    geo = manager.adapters.geo
    assert (geo.page_width, geo.rows_per_block) == (64, 32)
    all_seven = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # sum of (K + N) over the seven projections = 2048 = 32 pages of 64 per rank
    assert [geo.blocks_for(r, all_seven) for r in (4, 8, 16, 32)] == [4, 8, 16, 32]


def test_pages_come_from_the_kv_pool_and_go_back(tiny_model, adapters):
    manager = make_manager(64, tiny_model)
    pool, blocks = manager.adapters, manager.block_pool
    free0 = blocks.get_num_free_blocks()
    req = make_request("r0", adapters[1], 1)  # rank 8 -> 8 blocks
    assert manager.allocate_slots(req, 20) is not None  # 20 tokens -> 2 KV blocks
    assert blocks.get_num_free_blocks() == free0 - 2 - 8
    assert pool.stats()["resident_blocks"] == 8
    manager.free(req)  # KV blocks back; the adapter stays cached
    assert blocks.get_num_free_blocks() == free0 - 8
    assert pool.stats()["cached_unreferenced"] == 1
    # A second request of the same adapter takes no new pages.
    req2 = make_request("r1", adapters[1], 1)
    assert manager.allocate_slots(req2, 20) is not None
    assert blocks.get_num_free_blocks() == free0 - 2 - 8
    assert pool.counters["loads"] == 1
    manager.free(req2)
    assert pool.evict_one()
    assert blocks.get_num_free_blocks() == free0
    plan = pool.take_plan([], 1)
    assert [type(e).__name__ for e in plan.events] == ["Load", "Evict"]
    assert len(plan.events[0].block_ids) == 8


def test_admission_needs_kv_and_pages(tiny_model, adapters):
    manager = make_manager(12, tiny_model)  # 11 usable blocks
    running = make_request("big", None, 0, tokens=16 * 5)  # 5 KV blocks
    assert manager.allocate_slots(running, 80) is not None
    # 20 tokens (2 KV blocks) + rank-8 adapter (8 blocks) > 6 free: must wait.
    waiting = make_request("w", adapters[1], 1)
    assert manager.allocate_slots(waiting, 20) is None
    assert manager.block_pool.get_num_free_blocks() == 6
    assert manager.adapters.resident == {}
    # A rank-4 adapter fits beside its KV blocks.
    assert manager.allocate_slots(make_request("w2", adapters[0], 2), 20) is not None
    assert manager.block_pool.get_num_free_blocks() == 0


def test_cached_adapters_are_evicted_lru_before_no_room(tiny_model, adapters):
    manager = make_manager(12, tiny_model)
    pool = manager.adapters
    for i, lora_id in ((0, 1), (3, 2)):  # rank 4 (4 blocks), rank 2 (2 blocks)
        req = make_request(f"r{lora_id}", adapters[i], lora_id)
        assert manager.allocate_slots(req, 10) is not None
        manager.free(req)
    assert manager.block_pool.get_num_free_blocks() == 11 - 6
    # A running request grows by 8 blocks: stock would say no room (preempt);
    # the manager evicts cached adapters, least recently used first.
    running = make_request("run", None, 0, tokens=16)
    assert manager.allocate_slots(running, 16) is not None  # 1 block
    running.num_computed_tokens = 16
    assert manager.allocate_slots(running, 16 * 5) is not None  # 5 more blocks: 6 > 4 free
    assert pool.counters["evictions"] == 1 and 1 not in pool.resident and 2 in pool.resident
    # Reloading an evicted adapter counts as a reload.
    manager.free(running)
    again = make_request("again", adapters[0], 1)
    assert manager.allocate_slots(again, 10) is not None
    assert pool.counters["reloads"] == 1


def test_no_eviction_for_a_request_that_cannot_fit_anyway(tiny_model, adapters):
    # Two cached adapters (4 + 2 blocks), 5 blocks free. A request needing 12
    # blocks cannot fit even with the cache emptied: the cache is kept (no
    # thrash, step after step). One needing 8 evicts just the LRU adapter.
    manager = make_manager(12, tiny_model)
    pool = manager.adapters
    for i, lora_id in ((0, 1), (3, 2)):
        req = make_request(f"r{lora_id}", adapters[i], lora_id)
        assert manager.allocate_slots(req, 10) is not None
        manager.free(req)
    assert manager.block_pool.get_num_free_blocks() == 5 and pool.evictable_blocks() == 6
    too_big = make_request("big", None, 0, tokens=16 * 12)
    for _ in range(3):  # the scheduler retries every step
        assert manager.blocks_required(too_big, 16 * 12) == 12
        assert manager.allocate_slots(too_big, 16 * 12) is None
    assert pool.counters["evictions"] == 0 and set(pool.resident) == {1, 2}
    assert pool.counters["evictions_spared"] == 3
    fits = make_request("fits", None, 0, tokens=16 * 8)
    assert manager.blocks_required(fits, 16 * 8) == 8
    blocks = manager.allocate_slots(fits, 16 * 8)
    assert blocks is not None and len(blocks.get_block_ids()[0]) == 8
    assert pool.counters["evictions"] == 1 and set(pool.resident) == {2}


def test_blocks_required_is_what_stock_allocates(tiny_model):
    manager = make_manager(64, tiny_model)
    req = make_request("r", None, 0, tokens=40)
    for new_tokens, computed in ((40, 0), (1, 40), (16, 41), (100, 57)):
        req.num_computed_tokens = computed
        want = manager.blocks_required(req, new_tokens)
        blocks = manager.allocate_slots(req, new_tokens)
        assert blocks is not None and len(blocks.get_block_ids()[0]) == want, (new_tokens, computed)


def test_referenced_adapters_are_never_evicted(tiny_model, adapters):
    manager = make_manager(12, tiny_model)
    user = make_request("user", adapters[0], 1)  # 1 KV block + 4 adapter blocks
    assert manager.allocate_slots(user, 10) is not None
    hog = make_request("hog", None, 0, tokens=16 * 7)
    assert manager.allocate_slots(hog, 16 * 7) is None  # 7 > 6 free, nothing evictable
    assert 1 in manager.adapters.resident


def test_load_ahead_pages_in_early_and_keeps_blocks_free(tiny_model, adapters):
    manager = make_manager(24, tiny_model)  # 23 usable blocks
    pool, blocks = manager.adapters, manager.block_pool
    upcoming = [(1, adapters[0]), (2, adapters[1]), (3, adapters[2])]  # 4, 8, 4 blocks
    pool.load_ahead(upcoming, keep_free=10)
    # 23 - 4 = 19 >= 10, 19 - 8 = 11 >= 10, 11 - 4 = 7 < 10: stops before the third.
    assert set(pool.resident) == {1, 2} and blocks.get_num_free_blocks() == 11
    assert pool.counters["loaded_ahead"] == 2 and len(pool.unreferenced) == 2
    req = make_request("r", adapters[1], 2)
    assert manager.allocate_slots(req, 20) is not None  # only its 2 KV blocks now
    assert blocks.get_num_free_blocks() == 9 and pool.counters["loads"] == 2
    manager.free(req)


def test_load_ahead_without_room_reads_no_adapter(tiny_model, adapters, monkeypatch):
    """The scheduler asks for early loads every step; with the KV cache full
    (no block free or evictable beyond ``keep_free``) or every upcoming
    adapter resident, nothing can load: no adapter is read or checked (each
    check stats its files) and nothing stays pinned."""
    from vllm_slora.memory import adapter_pool

    manager = make_manager(24, tiny_model)  # 23 usable blocks
    pool = manager.adapters
    checked, read = [], adapter_pool.adapter_meta
    monkeypatch.setattr(adapter_pool, "adapter_meta",
                        lambda path, check=None: checked.append(path) or read(path, check))
    upcoming = [(1, adapters[0]), (2, adapters[1])]  # 4 and 8 blocks
    pool.load_ahead(upcoming, keep_free=23)  # 23 free: neither fits
    assert checked == [] and not pool.resident and not pool.pinned
    pool.load_ahead(upcoming, keep_free=19)  # 23 - 4 >= 19: the first only
    assert set(pool.resident) == {1} and checked and not pool.pinned
    checked.clear()
    pool.take_plan([], 0)  # the step ends: its reads are forgotten
    pool.load_ahead(upcoming[:1], keep_free=0)  # resident already: nothing to do
    assert checked == [] and not pool.pinned and set(pool.resident) == {1}


def test_early_loads_never_evict_what_nearer_waiting_requests_need(tiny_model, adapters):
    # The scheduler's look-ahead (patches/vllm_v1_core_sched_scheduler.py) as
    # it runs every step: the adapters of the next waiting requests up to the
    # LOAD_AHEAD-th not resident (here 2), the resident ones included, to
    # load_ahead. Adapters 1 and 2 (4 blocks each) fit the pool beside each
    # other, not beside 3 (8 blocks), which waits behind them.
    from vllm_slora.patches.vllm_v1_core_sched_scheduler import _through_missing, _upcoming

    manager = make_manager(12, tiny_model)  # 11 usable blocks
    pool = manager.adapters
    waiting = [make_request("w1", adapters[0], 1), make_request("w2", adapters[2], 2),
               make_request("w0", None, 0), make_request("w1b", adapters[0], 1),
               make_request("w3", adapters[1], 3)]
    scheduler = SimpleNamespace(waiting=waiting)
    assert _upcoming(scheduler, pool, 2) == [(1, adapters[0]), (2, adapters[2])]
    for _ in range(3):  # steps in which nobody is admitted yet
        pool.load_ahead(_through_missing(_upcoming(scheduler, pool, 32), pool, 2), keep_free=0)
    # Once 1 and 2 are resident, the look-ahead reaches 3, but may not evict
    # them for it (without them in the list, each step would page 3 in by
    # evicting 1 and 2, and the next 1 and 2 again).
    assert _upcoming(scheduler, pool, 2) == [(1, adapters[0]), (2, adapters[2]), (3, adapters[1])]
    assert set(pool.resident) == {1, 2} and pool.counters["loaded_ahead"] == 2
    assert pool.counters["evictions"] == 0 and pool.counters["ahead_wasted"] == 0
    assert _through_missing([(1, "a"), (5, "b"), (6, "c")], pool, 1) == [(1, "a"), (5, "b")]


def test_next_admissions_adapters_load_early_with_only_the_watermark_free(tiny_model, adapters):
    # The scheduler's early loads with the KV cache nearly full (2,000
    # adapters on a GPU): the next admissions' adapters (HEAD_AHEAD = 2 of
    # them) need only vLLM's admission watermark left, the rest a quarter of
    # the blocks, and only after a step that did not evict.
    from vllm_slora.patches import vllm_v1_core_sched_scheduler as sched

    assert sched.HEAD_AHEAD == 2
    upcoming = [(1, adapters[0]), (2, adapters[3]), (3, adapters[2])]  # 4, 2, 4 blocks
    manager = make_manager(24, tiny_model)  # 23 usable blocks; a quarter: 6
    manager.watermark_blocks = 2
    pool, blocks = manager.adapters, manager.block_pool
    hog = make_request("hog", None, 0, tokens=BLOCK * 15)
    assert manager.allocate_slots(hog, BLOCK * 15) is not None  # 8 blocks left
    sched.load_early(manager, upcoming, evicted=False)
    # 8 - 4 = 4 >= 2, 4 - 2 = 2 >= 2: both heads; 3 would leave 2 - 4 < 6.
    assert set(pool.resident) == {1, 2} and blocks.get_num_free_blocks() == 2
    assert pool.counters["loaded_ahead"] == 2 and pool.counters["evictions"] == 0
    sched.load_early(manager, upcoming, evicted=False)  # resident: nothing more
    assert pool.counters["loaded_ahead"] == 2

    # With room, the rest follow, but not after a step that evicted.
    for evicted, resident in ((True, {1, 2}), (False, {1, 2, 3})):
        manager = make_manager(24, tiny_model)
        manager.watermark_blocks = 2
        sched.load_early(manager, upcoming, evicted=evicted)
        assert set(manager.adapters.resident) == resident, evicted
    # Without vLLM's watermark attribute (another vLLM): a quarter for all,
    # as before: the next admission's adapter (1) waits, only 2 fits (8 - 2 >= 6).
    manager = make_manager(24, tiny_model)
    manager.allocate_slots(make_request("hog", None, 0, tokens=BLOCK * 15), BLOCK * 15)
    del manager.watermark_blocks
    sched.load_early(manager, upcoming, evicted=False)
    assert set(manager.adapters.resident) == {2}


def test_an_adapter_evicted_unused_after_an_early_load_is_not_loaded_early_again(tiny_model,
                                                                                 adapters):
    # The thrash seen at 2,000 adapters: the next admission's adapter is
    # loaded early, the running requests' growth evicts it before its
    # request is admitted, and the next step loads it again. Now it waits for
    # its request; once that request was admitted it may load early again.
    from vllm_slora.patches import vllm_v1_core_sched_scheduler as sched

    manager = make_manager(12, tiny_model)  # 11 usable blocks
    manager.watermark_blocks = 0
    pool = manager.adapters
    upcoming = [(1, adapters[0])]  # 4 blocks
    sched.load_early(manager, upcoming, evicted=True)
    assert 1 in pool.resident and pool.counters["loaded_ahead"] == 1
    grow = make_request("grow", None, 0, tokens=BLOCK * 10)
    assert manager.allocate_slots(grow, BLOCK * 10) is not None  # evicts it
    assert 1 not in pool.resident and pool.counters["ahead_wasted"] == 1
    manager.free(grow)
    for _ in range(3):  # steps later, its request still waiting
        sched.load_early(manager, upcoming, evicted=False)
    assert 1 not in pool.resident and pool.counters["loaded_ahead"] == 1
    req = make_request("r1", adapters[0], 1)
    assert manager.allocate_slots(req, 10) is not None  # admitted: paged in on demand
    manager.free(req)
    pool.evict_unreferenced()
    sched.load_early(manager, upcoming, evicted=True)  # a later request of it
    assert 1 in pool.resident and pool.counters["loaded_ahead"] == 2


def test_next_admissions_early_loads_keep_what_later_requests_need(tiny_model, adapters):
    # The next admissions' adapters (1 and 4, missing) are paged in by
    # evicting cached ones, but not adapter 3, which a request behind them
    # waits for: adapter 5, which nobody waits for, goes although more recent.
    from vllm_slora.patches import vllm_v1_core_sched_scheduler as sched

    manager = make_manager(12, tiny_model)  # 11 usable blocks
    manager.watermark_blocks = 0
    pool = manager.adapters
    for lora_id, idx in ((3, 3), (5, 2)):  # 2 and 4 blocks, then cached (3 least recent)
        req = make_request(f"r{lora_id}", adapters[idx], lora_id)
        assert manager.allocate_slots(req, 10) is not None
        manager.free(req)
    hog = make_request("hog", None, 0, tokens=BLOCK * 4)
    assert manager.allocate_slots(hog, BLOCK * 4) is not None  # 1 block free, 6 evictable
    upcoming = [(1, adapters[0]), (4, adapters[1]), (3, adapters[3])]  # 4, 8, 2 blocks
    sched.load_early(manager, upcoming, evicted=True)
    assert set(pool.resident) == {1, 3} and pool.counters["evictions"] == 1
    assert manager.block_pool.get_num_free_blocks() == 1


def test_load_ahead_evicts_cached_adapters_nobody_waits_for(tiny_model, adapters):
    manager = make_manager(12, tiny_model)  # 11 usable blocks
    pool, blocks = manager.adapters, manager.block_pool
    for lora_id, idx in ((1, 0), (2, 2), (3, 3)):  # 4 + 4 + 2 blocks, then cached
        req = make_request(f"r{lora_id}", adapters[idx], lora_id)
        assert manager.allocate_slots(req, 10) is not None
        manager.free(req)
    assert blocks.get_num_free_blocks() == 1
    # Adapter 4 (4 blocks) is next in line, adapter 1 (cached, least recently
    # used) is not: 1 makes room; 2 waits too, so it is kept although older than 3.
    pool.load_ahead([(2, adapters[2]), (4, adapters[0])], keep_free=1)
    assert set(pool.resident) == {2, 3, 4} and pool.counters["loaded_ahead"] == 1
    assert pool.counters["evictions"] == 1 and blocks.get_num_free_blocks() == 1
    assert list(pool.unreferenced) == [3, 2, 4]  # 2 became most recently used
    # Not when fewer than keep_free blocks would stay free or evictable:
    # 1 free + 10 evictable (3, 2, 4) - 2 needed = 9 < 10.
    pool.load_ahead([(5, adapters[3])], keep_free=10)
    assert 5 not in pool.resident
    # An adapter loaded ahead and evicted before a request used it is an
    # upload for nothing (ahead_wasted); one used first is not.
    assert pool.counters["ahead_wasted"] == 0
    req = make_request("r4", adapters[0], 4)
    assert manager.allocate_slots(req, 10) is not None  # 4 used: 1 free block is enough
    manager.free(req)
    pool.load_ahead([(6, adapters[3])], keep_free=0)  # 2 blocks: evicts 3, used by r3 before
    assert 6 in pool.resident and pool.counters["ahead_wasted"] == 0
    # 2 (paged in by a request), 4 (ahead, then used), 6 (ahead, never used)
    pool.evict_unreferenced()
    assert pool.counters["ahead_wasted"] == 1


def test_pages_per_adapter_for_llama_7b():
    """The figures of docs/unified-paging.md: fp16, 16-token blocks."""
    from vllm_slora.memory.layout import KINDS, PageGeometry

    cfg = SimpleNamespace(hidden_size=4096, num_attention_heads=32, head_dim=128,
                          num_key_value_heads=32, intermediate_size=11008, num_hidden_layers=32)
    geo = PageGeometry.create(cfg, torch.float16, 16 * 2 * 32 * 128 * 2)
    assert (geo.page_width, geo.rows_per_block) == (256, 512)
    assert geo.adapter_rows(1, KINDS) == 305 and geo.adapter_rows(1, KINDS[:4]) == 128
    assert [geo.blocks_for(r, KINDS) for r in (8, 16, 32, 64)] == [5, 10, 20, 39]
    assert [geo.blocks_for(r, KINDS[:4]) for r in (8, 16, 32, 64)] == [2, 4, 8, 16]



@pytest.mark.parametrize("arch,second,words", [
    ("Gemma2ForCausalLM", "sliding",
     "(SlidingWindowSpec, FullAttentionSpec): attention layers of several kinds, kept apart by "
     "vLLM's hybrid KV cache manager. Start without --no-disable-hybrid-kv-cache-manager"),
    ("JambaForCausalLM", "mamba",
     "(SlidingWindowSpec, MambaSpec): layers that are not all attention (e.g. Mamba beside "
     "attention). Supported: models whose layers are all attention"),
])
def test_several_kv_cache_groups_are_refused_by_name(tiny_model, arch, second, words):
    """Adapters are paged in one attention KV-cache group. Several attention
    groups (the hybrid KV cache manager kept on by the user: S-LoRA mode turns
    it off, patches/vllm_engine_arg_utils.py) and groups of Mamba state stop
    start-up, naming the architecture and the fix."""
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheGroupSpec, MambaSpec,
                                            SlidingWindowSpec)

    from vllm_slora.memory.manager import PagedKVCacheManager

    attn = dict(block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.float32)
    other = (FullAttentionSpec(**attn) if second == "sliding"
             else MambaSpec(block_size=BLOCK, shapes=((4, 32),), dtypes=(torch.float32,)))
    groups = [KVCacheGroupSpec(["model.layers.0.self_attn.attn"],
                               SlidingWindowSpec(**attn, sliding_window=16)),
              KVCacheGroupSpec(["model.layers.1.mixer"], other)]
    manager = SimpleNamespace(kv_cache_config=SimpleNamespace(kv_cache_groups=groups))
    hf = hf_config(tiny_model)
    hf.architectures = [arch]
    with pytest.raises(ValueError) as refused:
        PagedKVCacheManager.enable_adapters(manager, hf, torch.float32)
    assert f"single attention KV-cache group; {arch} has 2 {words}" in str(refused.value)


def test_sliding_window_layers_join_the_full_attention_group():
    """With the hybrid KV cache manager off (S-LoRA mode), vLLM 0.26 cannot
    unify a sliding-window layer of its own block size (16 on CPU) with
    full-attention layers of 128; given the full layers' block size first
    (patches/vllm_v1_core_kv_cache_utils.py, registered for 0.26 only), they
    make one group. Since 0.27 vLLM does this itself."""
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    from vllm_slora.patches import needed
    from vllm_slora.patches.vllm_v1_core_kv_cache_utils import align_sliding_window_blocks

    attn = dict(num_kv_heads=2, head_size=32, dtype=torch.float32)

    def specs():
        return {"layers.0": SlidingWindowSpec(block_size=16, sliding_window=16, **attn),
                "layers.1": FullAttentionSpec(block_size=128, **attn)}

    patched = needed("vllm_v1_core_kv_cache_utils:apply_sliding_window_blocks")
    assert patched == (not at_least("0.27"))
    unified = specs()
    if patched:
        with pytest.raises(ValueError, match="failed to convert the KV cache specs to one unified type"):
            kv_cache_utils.unify_hybrid_kv_cache_specs(specs())
        align_sliding_window_blocks(unified)
    kv_cache_utils.unify_hybrid_kv_cache_specs(unified)
    assert unified["layers.0"] == FullAttentionSpec(block_size=128, sliding_window=16, **attn)
    assert kv_cache_utils.is_kv_cache_spec_uniform(unified)

def test_separate_region_when_unify_mem_is_off(tiny_model, adapters, monkeypatch):
    from vllm_slora import config

    monkeypatch.setenv("VLLM_SLORA_UNIFY_MEM", "0")
    monkeypatch.setenv("VLLM_SLORA_SEPARATE_FRACTION", "0.5")
    config.slora_config.cache_clear()
    try:
        manager = make_manager(32, tiny_model)  # 16 blocks set aside for adapters
    finally:
        config.slora_config.cache_clear()
    pool, blocks = manager.adapters, manager.block_pool
    assert not pool.unified and blocks.get_num_free_blocks() == 31 - 16
    # Adapters take region blocks only; the KV blocks left are untouched.
    for i, (idx, lora_id) in enumerate([(1, 1), (0, 2), (2, 3)]):  # 8 + 4 + 4 blocks
        req = make_request(f"r{i}", adapters[idx], lora_id)
        assert manager.allocate_slots(req, 10) is not None
        manager.free(req)
    assert blocks.get_num_free_blocks() == 15 and pool.block_pool.get_num_free_blocks() == 0
    # The region is full: the next adapter evicts within it (LRU), never KV.
    assert manager.allocate_slots(make_request("r9", adapters[3], 4), 10) is not None
    assert 1 not in pool.resident and pool.counters["evictions"] == 1


def test_pins_are_counted(tiny_model, adapters):
    """An adapter pinned twice (admission inside a load-ahead) stays safe from
    eviction until both pins are gone."""
    manager = make_manager(64, tiny_model)
    pool = manager.adapters
    req = make_request("r0", adapters[0], 1)
    assert manager.allocate_slots(req, 20) is not None
    manager.free(req)  # cached, unreferenced: evictable
    pool.pin(1)
    pool.pin(1)
    pool.unpin(1)
    assert not pool.evict_one() and 1 in pool.resident
    pool.unpin(1)
    assert pool.evict_one() and 1 not in pool.resident


def test_separate_region_loads_ahead(tiny_model, adapters, monkeypatch):
    """Early loads (prefetch) keep no KV reserve in a region that holds no KV.
    With the default region (a quarter of the blocks) a reserve of a quarter
    of the whole pool would leave no early load possible."""
    from vllm_slora import config

    monkeypatch.setenv("VLLM_SLORA_UNIFY_MEM", "0")
    config.slora_config.cache_clear()
    try:
        manager = make_manager(32, tiny_model)  # default fraction: 8 blocks for adapters
    finally:
        config.slora_config.cache_clear()
    pool = manager.adapters
    assert pool.kv_reserve(0.25) == 0
    pool.load_ahead([(5, adapters[0])], pool.kv_reserve(0.25))  # rank 4: 4 of the 8 blocks
    assert 5 in pool.resident and pool.counters["loaded_ahead"] == 1


@pytest.mark.parametrize("fault", ["weights removed", "config removed", "rank above the limit",
                                   "truncated weights", "too big for the pool"])
def test_an_adapter_that_cannot_be_paged_in_fails_only_its_request(tmp_path, tiny_model,
                                                                  adapters, fault):
    """Files changed after the request was accepted: allocate_slots takes
    nothing for it and records why (the scheduler patch then finishes it
    with vLLM's FINISHED_ERROR); other requests go on; freeing it clears
    the fault. Early loads skip the adapter without raising."""
    import shutil

    from vllm_slora.testing.adapters import make_peft_adapter

    manager = make_manager(64, tiny_model, max_lora_rank=8)
    blocks = manager.block_pool
    bad = tmp_path / "bad"
    shutil.copytree(adapters[1], bad)  # rank 8: fits
    weights, config = bad / "adapter_model.safetensors", bad / "adapter_config.json"
    if fault == "weights removed":
        weights.unlink()
    elif fault == "config removed":
        config.unlink()
    elif fault == "rank above the limit":  # replaced in place by a rank-16 adapter
        shutil.rmtree(bad)
        make_peft_adapter(bad, tiny_model, 16, seed=9)
    elif fault == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        manager = make_manager(8, tiny_model, max_lora_rank=8)  # 7 usable blocks, rank 8 takes 8
        blocks = manager.block_pool
    free0 = blocks.get_num_free_blocks()
    req = make_request("r-bad", str(bad), 7)
    assert manager.allocate_slots(req, 20) is None
    assert str(bad) in manager.faults["r-bad"]
    assert blocks.get_num_free_blocks() == free0 and 7 not in manager.adapters.resident
    assert manager.allocate_slots(req, 20) is None  # again: no second read, same answer
    manager.adapters.load_ahead([(7, str(bad))], keep_free=0)  # skipped, no raise
    assert 7 not in manager.adapters.resident
    if fault != "too big for the pool":
        good = make_request("r-good", adapters[0], 1)
        assert manager.allocate_slots(good, 20) is not None
        manager.free(good)
    manager.free(req)
    assert "r-bad" not in manager.faults


def test_adapter_checked_once_per_scheduling_step(tiny_model, adapters):
    """Admission, early loads and page-in of one step read (and validate)
    an adapter once; the next step reads its files again (an adapter
    replaced on disk in between is budgeted as it is now)."""
    manager = make_manager(64, tiny_model, max_lora_rank=8)
    pool = manager.adapters
    calls = []
    check = pool.check
    pool.check = lambda path: (calls.append(path), check(path))[1]
    path = adapters[1]
    blocks = pool.blocks_for(path)
    assert pool.blocks_missing(7, path) == blocks
    pool.load_ahead([(7, path)], keep_free=0)  # pages it in: meta and blocks again
    assert 7 in pool.resident and calls == [path]
    pool.take_plan([], 1)
    pool.blocks_for(path)
    assert calls == [path, path]


def test_adapter_checked_on_arrival_so_the_scheduler_finds_it_cached(tmp_path, tiny_model,
                                                                       adapters):
    """``precheck`` (the engine core's input thread, when a request arrives)
    validates the request's adapter: the scheduler's check of it is then a
    cache hit, off the engine thread's work. A broken adapter raises
    nothing there; the scheduler's check still fails it with the cause."""
    import shutil

    from vllm_slora import adapters as checks
    from vllm_slora.memory.adapter_pool import AdapterFault
    from vllm_slora.patches.vllm_v1_engine_core import precheck

    manager = make_manager(64, tiny_model, max_lora_rank=8)
    engine = SimpleNamespace(scheduler=SimpleNamespace(kv_cache_manager=manager))
    checks._check_headers.cache_clear()
    precheck(engine, make_request("r0", adapters[1], 2))
    assert checks._check_headers.cache_info().misses == 1
    assert manager.adapters.meta(adapters[1]).rank == 8  # the scheduler's check
    info = checks._check_headers.cache_info()
    assert (info.misses, info.hits) == (1, 1)

    bad = tmp_path / "bad"
    shutil.copytree(adapters[0], bad)
    (bad / "adapter_config.json").write_text("{")
    precheck(engine, make_request("r1", str(bad), 3))  # dropped here
    with pytest.raises(AdapterFault, match="invalid adapter_config.json"):
        manager.adapters.meta(str(bad))
    # No adapter, or no pool (S-LoRA mode off): nothing is read.
    precheck(engine, make_request("r2", None, 0))
    precheck(SimpleNamespace(scheduler=None), make_request("r3", adapters[2], 4))
    # r0's, then the bad one's twice (errors are not cached): none for r2, r3.
    assert checks._check_headers.cache_info().misses == 3


@pytest.mark.parametrize("variant", ["all", "q-v", "alpha", "rslora"])
def test_loads_carry_what_the_worker_would_read(tmp_path, tiny_model, variant):
    """The scheduler's checked metadata rides on the adapter's Load (the
    worker then reads no file): it must equal what the worker would read,
    field for field (rank, the kinds of fused groups completed, the scale
    with alpha and rslora, the file version)."""
    from vllm_slora.memory.adapter_files import read_adapter_meta
    from vllm_slora.testing.adapters import make_peft_adapter

    kwargs = {"q-v": dict(target_modules=("q_proj", "v_proj")), "alpha": dict(alpha=16),
              "rslora": dict(alpha=12)}.get(variant, {})
    path = make_peft_adapter(tmp_path / variant, tiny_model, 4, seed=2, **kwargs)
    if variant == "rslora":
        cfg_file = path / "adapter_config.json"
        cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {"use_rslora": True}))
    manager = make_manager(64, tiny_model, max_lora_rank=8)
    req = make_request("r", str(path), 3)
    assert manager.allocate_slots(req, 20) is not None
    (load,) = manager.adapters.take_plan([], 1).events
    want = read_adapter_meta(str(path))
    assert load.meta == want
    assert want.scale == {"alpha": 4.0, "rslora": 6.0}.get(variant, 1.0)
    if variant == "q-v":
        assert want.kinds == ("q_proj", "k_proj", "v_proj")


def test_worker_fault_frees_the_adapter_and_fails_only_its_requests(tiny_model, adapters):
    """A worker could not upload adapter 1 (``ModelRunnerOutput.slora_faults``):
    its blocks go back with an Evict for the workers, its two running
    requests get the cause, adapter 2's request is untouched, and a later
    request of adapter 1 pages it in afresh."""
    from vllm_slora.memory.messages import Evict

    manager = make_manager(64, tiny_model)
    pool, blocks = manager.adapters, manager.block_pool
    free0 = blocks.get_num_free_blocks()
    reqs = [make_request("r1", adapters[1], 1), make_request("r2", adapters[1], 1),
            make_request("r3", adapters[0], 2)]
    for r in reqs:
        assert manager.allocate_slots(r, 20) is not None
    pool.take_plan([], 2)
    failed = manager.worker_faults({1: "adapter 'x' could not be paged in: OSError: EIO"})
    assert failed == {"r1", "r2"} and manager.faults == dict.fromkeys(failed, "adapter 'x' could not "
                                                                           "be paged in: OSError: EIO")
    assert 1 not in pool.resident and 2 in pool.resident
    assert pool.take_plan([], 0).events == [Evict(1)]
    for r in reqs:  # the scheduler finishes them (error or not): nothing is leaked
        manager.free(r)
    assert manager.faults == {} and pool.evict_unreferenced() == 1
    assert blocks.get_num_free_blocks() == free0
    again = make_request("r4", adapters[1], 1)
    assert manager.allocate_slots(again, 20) is not None and 1 in pool.resident
    assert pool.counters["faults"] == 1 and pool.counters["reloads"] == 1


def test_pins_page_in_survive_pressure_and_are_bounded(tiny_model, adapters):
    manager = make_manager(64, tiny_model)  # 63 usable blocks; pins may hold int(0.5 * 63) = 31
    pool = manager.adapters
    assert pool.pin_limit == 31
    with pytest.raises(ValueError, match="not registered"):
        pool.pin_user(1)
    for lora_id, path in enumerate(adapters, start=1):  # ranks 4, 8, 4, 2 -> 4, 8, 4, 2 blocks
        pool.known[lora_id] = path
    pool.pin_user(2)
    assert 2 in pool.resident and pool.user_pins == {2: 8}
    assert pool.evict_unreferenced() == 0  # pinned: never evicted, also when unreferenced
    pool.pin_user(2)  # pinning twice is one pin
    assert pool.user_pins == {2: 8}
    # Pressure: a request that needs every free block evicts what it can, not the pin.
    big = make_request("big", None, 0, tokens=16 * (manager.block_pool.get_num_free_blocks() - 1))
    assert manager.allocate_slots(big, big.num_tokens) is not None
    assert 2 in pool.resident
    manager.free(big)
    pool.known[5] = adapters[1]
    pool.known[6] = adapters[1]
    pool.pin_user(5)
    pool.pin_user(6)
    with pytest.raises(ValueError, match=r"pins may hold at most 31 of the 63 blocks"):
        pool.pin_user(1)  # 24 + 4 <= 31 fits ...
        pool.pin_user(3)  # ... 28 + 4 does not
    assert sorted(pool.user_pins) == [1, 2, 5, 6]
    pool.unpin_user(2)
    assert pool.evict_unreferenced() == 1 and 2 not in pool.resident  # evictable again


def test_evictable_blocks_kept_equal_the_sum_through_any_sequence(tiny_model, adapters):
    """``evictable_blocks`` is kept as a running count (summing it scanned
    every cached adapter every step). Through random admissions, frees,
    early loads, user pins, evictions under KV pressure and worker faults,
    it must equal the sum over cached, unpinned adapters after every
    operation; and nothing is leaked at the end."""
    import random

    rng = random.Random(7)
    manager = make_manager(40, tiny_model)
    pool, blocks = manager.adapters, manager.block_pool
    free0 = blocks.get_num_free_blocks()
    paths = {lora_id: adapters[(lora_id - 1) % len(adapters)] for lora_id in range(1, 9)}
    pool.known.update(paths)

    def brute() -> int:
        return sum(len(pool.resident[i].blocks) for i in pool.unreferenced if i not in pool.pinned)

    running: dict[str, object] = {}
    seen_ops = set()
    for step in range(600):
        op = rng.choice(["admit", "admit", "free", "ahead", "pin", "unpin", "kv", "fault"])
        if op == "admit":
            lora_id = rng.randint(1, 8)
            req = make_request(f"q{step}", paths[lora_id], lora_id, tokens=rng.randint(4, 40))
            if manager.allocate_slots(req, req.num_tokens) is not None:
                running[req.request_id] = req
                seen_ops.add(op)
        elif op == "free" and running:
            manager.free(running.pop(rng.choice(sorted(running))))
            seen_ops.add(op)
        elif op == "ahead":
            ids = rng.sample(range(1, 9), 3)
            pool.load_ahead([(i, paths[i]) for i in ids], keep_free=rng.randint(0, 8))
            seen_ops.add(op)
        elif op == "pin":
            try:
                pool.pin_user(rng.randint(1, 8))
                seen_ops.add(op)
            except ValueError:
                pass
        elif op == "unpin" and pool.user_pins:
            pool.unpin_user(rng.choice(sorted(pool.user_pins)))
            seen_ops.add(op)
        elif op == "kv":  # a request without LoRA takes many blocks: evictions under pressure
            req = make_request(f"kv{step}", None, 0, tokens=16 * rng.randint(2, 12))
            if manager.allocate_slots(req, req.num_tokens) is not None:
                running[req.request_id] = req
                seen_ops.add(op)
        elif op == "fault" and pool.resident:
            lora_id = rng.choice(sorted(pool.resident))
            for rid in pool.fault(lora_id):
                manager.free(running.pop(rid))
            seen_ops.add(op)
        assert pool.evictable_blocks() == brute(), (step, op)
    assert seen_ops == {"admit", "free", "ahead", "pin", "unpin", "kv", "fault"}
    assert pool.counters["evictions"] > 0 and pool.counters["loaded_ahead"] > 0
    for req in running.values():
        manager.free(req)
    for lora_id in list(pool.user_pins):
        pool.unpin_user(lora_id)
    pool.evict_unreferenced()
    assert pool.evictable_blocks() == brute() == 0 and not pool.resident
    assert blocks.get_num_free_blocks() == free0
