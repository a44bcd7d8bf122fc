"""Worker side of unified paging without an engine: pools are views of the KV
buffers, the pager writes adapters into the blocks it is told, and the paged
LoRA layers compute what the dense LoRA formula gives."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

NUM_BLOCKS, BLOCK = 32, 16


def tiny_config(model_dir):
    return SimpleNamespace(**json.loads((model_dir / "config.json").read_text()))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model):
    from vllm_slora.testing.adapters import make_adapters

    paths = make_adapters(tmp_path_factory.mktemp("pager"), tiny_model, [4, 8, 16], seed=5)
    extra = tmp_path_factory.mktemp("pager-qv") / "qv"
    from vllm_slora.testing.adapters import make_peft_adapter

    make_peft_adapter(extra, tiny_model, 8, target_modules=("q_proj", "v_proj", "down_proj"),
                      seed=9, alpha=16)
    return [str(p) for p in paths] + [str(extra)]


def cpu_attn_kv(layers: int, allocation: str = "per-layer"):
    """CPU_ATTN layout: (num_blocks, kv_heads, block_size, 2 * head_size) per
    layer, in a buffer of its own (vLLM up to 0.28), or every layer a view
    into one allocation (since 0.29): layer-outermost, each layer at its own
    offset, or block-outermost, the layers' blocks interleaved."""
    if allocation == "per-layer":
        return {i: torch.zeros(NUM_BLOCKS, 2, BLOCK, 64) for i in range(layers)}
    if allocation == "layer-outermost":
        whole = torch.zeros(layers, NUM_BLOCKS, 2, BLOCK, 64)
        return {i: whole[i] for i in range(layers)}
    whole = torch.zeros(NUM_BLOCKS, layers, 2, BLOCK, 64)
    return {i: whole[:, i] for i in range(layers)}


def make_pager(tiny_model, kv, max_tokens=64, max_loras=8, max_rank=32):
    from vllm_slora.memory.pager import Pager
    from vllm_slora.memory.step import StepLimits

    pager = Pager(tiny_config(tiny_model), torch.float32, torch.device("cpu"))
    pager.bind(kv, NUM_BLOCKS, StepLimits(max_tokens, max_loras, max_rank))
    return pager


def plan(pager, *events):
    from vllm_slora.memory.messages import PagingPlan

    stats = {"page_width": pager.geo.page_width, "rows_per_block": pager.geo.rows_per_block}
    return PagingPlan(events=list(events), stats=stats)


def test_block_chunks_of_two_layouts():
    from vllm_slora.memory.kv_pools import block_chunks

    kv = torch.zeros(NUM_BLOCKS, 2, BLOCK, 64)  # one dense range per block
    assert block_chunks(kv, NUM_BLOCKS) == ((0,), 8192, 8192)
    kv = torch.zeros(2, NUM_BLOCKS, BLOCK, 2, 32)  # K then V of all blocks: two ranges
    assert block_chunks(kv, NUM_BLOCKS) == ((0, NUM_BLOCKS * 4096), 4096, 4096)
    kv = torch.zeros(4 * NUM_BLOCKS, 2, BLOCK // 4, 64)  # kernel blocks of a quarter block
    assert block_chunks(kv, NUM_BLOCKS) == ((0,), 8192, 8192)
    # Blocks of 3 layers interleaved in one allocation (block-outermost), as
    # vLLM >= 0.29 may lay them out: layer 1's view, 3 blocks' worth apart.
    whole = torch.zeros(NUM_BLOCKS, 3, 2, BLOCK, 64)
    assert block_chunks(whole[:, 1], NUM_BLOCKS) == ((0,), 3 * 8192, 8192)
    with pytest.raises(ValueError, match="does not keep a block's bytes dense"):
        block_chunks(whole[:, :, 0], NUM_BLOCKS)  # only K of each layer: not one dense chunk


@pytest.mark.parametrize("allocation", ["per-layer", "layer-outermost", "block-outermost"])
def test_pools_are_views_and_loads_land_in_the_blocks(tiny_model, adapters, allocation):
    from safetensors.torch import load_file

    from vllm_slora.memory.adapter_files import read_adapter_meta
    from vllm_slora.memory.messages import Evict, Load
    from vllm_slora.memory.packing import pack_adapter

    kv = cpu_attn_kv(2, allocation)
    pager = make_pager(tiny_model, kv)
    for i, pool in enumerate(pager.pools):
        assert pool.untyped_storage().data_ptr() == kv[i].untyped_storage().data_ptr()
    blocks = [5, 9, 2, 7]  # rank 4: 4 * 32 pages = 4 blocks of 32 pages
    pager.apply(plan(pager, Load(1, adapters[0], blocks)))
    pager.resident[1].copied.wait(pager.device)  # what set_batch does before a forward
    meta = read_adapter_meta(adapters[0])
    packed = pack_adapter(meta, pager.geo, load_file(f"{adapters[0]}/adapter_model.safetensors"))
    for layer in range(2):
        pages = torch.cat([kv[layer][b].reshape(-1, 64) for b in blocks])
        assert torch.equal(pages, packed[layer])
        others = [b for b in range(NUM_BLOCKS) if b not in blocks]
        assert kv[layer][others].abs().sum() == 0  # nothing outside its blocks
    pager.apply(plan(pager, Evict(1)))
    assert pager.resident == {} and pager.vectors.free == [(0, pager.vectors.capacity)]


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                     reason="needs CUDA"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("file_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("tp_size", [1, 2])
@pytest.mark.parametrize("readers", [0, 3])
def test_upload_puts_every_vector_in_its_pages(tiny_model, tmp_path, monkeypatch, device,
                                               file_dtype, tp_size, readers):
    """An adapter uploaded from its file (chunks through a ring of small
    staging slots: two read by the lane itself, or five by reader threads,
    sent in runs of two, two and one up to the ring's end, packed on the
    device) against the layout written out by
    hand: A's rank-vectors are rows, B's are columns (TP: this rank's
    shard), slices the adapter lacks are zero pages even in reused (dirty)
    memory, the file's dtype becomes the adapter dtype, and each layer's
    pages land in the given rows of that layer's pool, nowhere else."""
    from safetensors.torch import load_file

    from vllm_slora.memory.adapter_files import read_adapter_meta
    from vllm_slora.memory.layout import PageGeometry
    from vllm_slora.memory.uploads import Uploader
    from vllm_slora.testing.adapters import make_peft_adapter

    path = make_peft_adapter(tmp_path / "qv-down", tiny_model, 8, dtype=file_dtype,
                             target_modules=("q_proj", "v_proj", "down_proj"), seed=3)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    cfg = tiny_config(tiny_model)
    meta = read_adapter_meta(str(path))
    assert meta.kinds == ("q_proj", "k_proj", "v_proj", "down_proj")
    empty = torch.empty

    def dirty(*a, **k):  # memory as an allocator hands it back
        t = empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(7)

    for p in range(tp_size):
        geo = PageGeometry.create(cfg, torch.float32, 2 * BLOCK * 64 * 4 // tp_size,
                                  tp_size=tp_size, tp_rank=p)
        d, n = geo.page_width, meta.rows(geo)
        num_rows = 2 * n + 5
        pools = [torch.zeros(num_rows, d, device=device) for _ in range(cfg.num_hidden_layers)]
        rows = torch.randperm(num_rows, generator=torch.Generator().manual_seed(p))[:n]
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", dirty)
            slots = 5 if readers else 2
            uploader = Uploader(geo, pools, slots=slots, slot_bytes=4096, readers=readers)
            uploader.submit(meta, rows.to(device)).wait(torch.device(device))
        assert uploader.counters["upload_chunks"] > slots  # the ring wrapped
        for layer in range(cfg.num_hidden_layers):
            parts = []
            for kind in meta.kinds:
                part = "mlp" if kind == "down_proj" else "self_attn"
                key = f"base_model.model.model.layers.{layer}.{part}.{kind}"
                k, nw = geo.width(kind)
                a = tensors.get(f"{key}.lora_A.weight")
                b = tensors.get(f"{key}.lora_B.weight")
                if a is None:  # k_proj: zero pages of the fused qkv group
                    a = torch.zeros(geo.a_vectors(kind, 8), k)
                    b = torch.zeros(nw, 8)
                elif kind == "down_proj":  # row-parallel: A's columns of this rank
                    a = a.float().tensor_split(tp_size, dim=1)[p]
                    b = b.float().tensor_split(tp_size, dim=0)[p]
                else:  # column-parallel: A's rows p, p + P, ...
                    a = a.float()[p::tp_size]
                    b = b.float().tensor_split(tp_size, dim=0)[p]
                parts += [a.reshape(-1, d), b.t().reshape(-1, d)]
            want = torch.cat(parts)
            pool = pools[layer].cpu()
            assert torch.equal(pool[rows], want)
            others = torch.ones(num_rows, dtype=torch.bool)
            others[rows] = False
            assert pool[others].abs().sum() == 0


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_uploads_at_once_land_as_one_at_a_time(tiny_model, tmp_path, device):
    """Four adapters queued together on three lanes (threads, rings, copy
    streams), waited for in reverse order, fill their rows as a one-lane
    uploader does, and nothing else."""
    from vllm_slora.memory.adapter_files import read_adapter_meta
    from vllm_slora.memory.layout import PageGeometry
    from vllm_slora.memory.uploads import Uploader
    from vllm_slora.testing.adapters import make_peft_adapter

    cfg = tiny_config(tiny_model)
    geo = PageGeometry.create(cfg, torch.float32, 2 * BLOCK * 64 * 4)
    metas = [read_adapter_meta(str(make_peft_adapter(tmp_path / f"a{i}", tiny_model, r, seed=i)))
             for i, r in enumerate([8, 16, 4, 8])]
    sizes = [m.rows(geo) for m in metas]
    num_rows = sum(sizes) + 7
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(1))
    rows = order[:sum(sizes)].to(device).split(sizes)
    dev = torch.device(device)
    pools = {}
    for lanes in (1, 3):
        pools[lanes] = [torch.zeros(num_rows, geo.page_width, device=device)
                        for _ in range(cfg.num_hidden_layers)]
        uploader = Uploader(geo, pools[lanes], slots=2, slot_bytes=4096, lanes=lanes)
        for upload in reversed([uploader.submit(m, r) for m, r in zip(metas, rows)]):
            upload.wait(dev)
        assert uploader.counters["uploads"] == 4
    if device == "cuda":
        torch.cuda.synchronize()
    for one, three in zip(pools[1], pools[3]):
        assert one.abs().sum() > 0 and torch.equal(one, three)
        assert one[order[sum(sizes):].to(device)].abs().sum() == 0


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_uploads_into_one_allocation_land_as_into_one_per_layer(tiny_model, tmp_path, device):
    """Pools that are rows of one storage (vLLM 0.32+ keeps every layer's KV
    in one allocation; each layer's view runs from its offset to the end)
    take one scatter for every layer, and get the pages a pool per layer
    gets: an adapter on q,k,v,o (one gather) and one on q,v and down
    (a gather per part), nothing written outside the adapters' rows."""
    from vllm_slora.memory.adapter_files import read_adapter_meta
    from vllm_slora.memory.layout import PageGeometry
    from vllm_slora.memory.uploads import Uploader
    from vllm_slora.testing.adapters import make_peft_adapter

    cfg = tiny_config(tiny_model)
    layers = cfg.num_hidden_layers
    geo = PageGeometry.create(cfg, torch.float32, 2 * BLOCK * 64 * 4)
    metas = [read_adapter_meta(str(make_peft_adapter(tmp_path / name, tiny_model, 8, seed=i,
                                                     target_modules=targets)))
             for i, (name, targets) in enumerate((("qkvo", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                                  ("qv-down", ("q_proj", "v_proj", "down_proj"))))]
    sizes = [m.rows(geo) for m in metas]
    num_rows = sum(sizes) + 5
    rows = torch.randperm(num_rows, generator=torch.Generator().manual_seed(2))[:sum(sizes)]
    rows = rows.to(device).split(sizes)
    apart = [torch.zeros(num_rows, geo.page_width, device=device) for _ in range(layers)]
    whole = torch.zeros(3 + layers * num_rows, geo.page_width, device=device)
    shared = [whole[3 + layer * num_rows:] for layer in range(layers)]
    for pools, one in ((apart, False), (shared, True)):
        uploader = Uploader(geo, pools, slots=2, slot_bytes=4096)
        assert (uploader._flat is not None) == one
        for upload in [uploader.submit(m, r) for m, r in zip(metas, rows)]:
            upload.wait(torch.device(device))
    assert whole[:3].abs().sum() == 0
    for layer in range(layers):
        assert apart[layer].abs().sum() > 0
        assert torch.equal(shared[layer][:num_rows], apart[layer])


@pytest.mark.parametrize("readers", [0, 3])
def test_upload_of_a_cut_file_fails_alone(tiny_model, tmp_path, readers):
    """A file cut short after the scheduler read its header fails its own
    upload with the cause (no reader left writing into a slot), and the
    lane's next upload, from a ring whose slots that read had taken, lands
    whole."""
    from vllm_slora.memory.adapter_files import ADAPTER_FILE, read_adapter_meta
    from vllm_slora.memory.layout import PageGeometry
    from vllm_slora.memory.uploads import Uploader
    from vllm_slora.testing.adapters import make_peft_adapter

    cfg = tiny_config(tiny_model)
    geo = PageGeometry.create(cfg, torch.float32, 2 * BLOCK * 64 * 4)
    cut, whole = (read_adapter_meta(str(make_peft_adapter(tmp_path / name, tiny_model, 8, seed=i)))
                  for i, name in enumerate(("cut", "whole")))
    file = tmp_path / "cut" / ADAPTER_FILE
    file.write_bytes(file.read_bytes()[:-5000])
    n = whole.rows(geo)
    pools = [torch.zeros(n, geo.page_width) for _ in range(cfg.num_hidden_layers)]
    uploader = Uploader(geo, pools, slots=4, slot_bytes=4096, lanes=1, readers=readers)
    rows = torch.arange(n)
    failed, landed = uploader.submit(cut, rows[:cut.rows(geo)]), uploader.submit(whole, rows)
    with pytest.raises(ValueError, match=r"cut/adapter_model.safetensors. ended \d+ bytes early"):
        failed.wait(torch.device("cpu"))
    landed.wait(torch.device("cpu"))
    want = torch.zeros_like(pools[0])
    other = Uploader(geo, [want] + [torch.zeros_like(want) for _ in pools[1:]], readers=0)
    other.submit(whole, rows).wait(torch.device("cpu"))
    assert want.abs().sum() > 0 and torch.equal(pools[0], want)
    assert uploader.counters["uploads"] == 1


def test_uploads_after_the_readers_stopped_land_whole(tiny_model, tmp_path):
    """At interpreter exit ``concurrent.futures`` stops every thread pool
    before the uploader's ``close`` lets the lanes finish the uploads queued
    so far: those read their files in the lane and land whole, as with no
    readers."""
    from vllm_slora.memory.adapter_files import read_adapter_meta
    from vllm_slora.memory.layout import PageGeometry
    from vllm_slora.memory.uploads import Uploader
    from vllm_slora.testing.adapters import make_peft_adapter

    cfg = tiny_config(tiny_model)
    geo = PageGeometry.create(cfg, torch.float32, 2 * BLOCK * 64 * 4)
    meta = read_adapter_meta(str(make_peft_adapter(tmp_path / "a", tiny_model, 8, seed=3)))
    n = meta.rows(geo)
    rows = torch.arange(n)
    got, want = ([torch.zeros(n, geo.page_width) for _ in range(cfg.num_hidden_layers)]
                 for _ in range(2))
    uploader = Uploader(geo, got, slots=4, slot_bytes=4096, lanes=1, readers=2)
    uploader._readers.shutdown(wait=True)  # as at exit: submit raises "after shutdown"
    uploader.submit(meta, rows).wait(torch.device("cpu"))
    Uploader(geo, want, readers=0).submit(meta, rows).wait(torch.device("cpu"))
    assert all(torch.equal(g, w) for g, w in zip(got, want)) and want[0].abs().sum() > 0


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_pack_by_kind_equals_pack_by_tensor(tiny_model, tmp_path, monkeypatch, device):
    """The uploads' packer (one gather per kind and A/B over the file's bytes,
    or, where every kind has every layer in one dtype, one gather over the
    whole adapter, in groups of layers or not) gives pack_adapter's pages
    bit for bit: fp16, bf16 and fp32 files, TP 1 and 2, slices and layers
    the adapter lacks (zero pages in dirty memory); a file with a kind in
    two dtypes takes pack_adapter's own path."""
    from safetensors.torch import load_file, save_file

    from vllm_slora.memory import packing
    from vllm_slora.memory.adapter_files import ADAPTER_FILE, read_adapter_meta
    from vllm_slora.memory.layout import PageGeometry
    from vllm_slora.memory.packing import pack_adapter, pack_file_bytes, read_header
    from vllm_slora.testing.adapters import make_peft_adapter

    whole, spy = [], packing._whole_pattern
    monkeypatch.setattr(packing, "_whole_pattern", lambda *a: whole.append(a[0].path) or spy(*a))

    cfg = tiny_config(tiny_model)
    empty = torch.empty

    def dirty(*a, **k):
        t = empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(7)

    cases = []
    for i, dtype in enumerate(["float16", "bfloat16", "float32"]):
        path = make_peft_adapter(tmp_path / dtype, tiny_model, 8, dtype=dtype, seed=i,
                                 target_modules=("q_proj", "v_proj", "o_proj", "down_proj"))
        cases.append(path)
    # q,k,v,o in every layer (the headline's adapters): the whole-adapter gather.
    for dtype in ("float16", "float32"):
        cases.append(make_peft_adapter(tmp_path / f"qkvo-{dtype}", tiny_model, 8, dtype=dtype,
                                       seed=5, target_modules=("q_proj", "k_proj", "v_proj",
                                                               "o_proj")))
    # Layer 0 without its q_proj tensors; v_proj of layer 1 in another dtype.
    for name, edit in (("no-layer", "drop"), ("mixed", "cast")):
        path = make_peft_adapter(tmp_path / name, tiny_model, 8, dtype="float16", seed=7,
                                 target_modules=("q_proj", "v_proj"))
        file = path / ADAPTER_FILE
        t = load_file(str(file))
        for key in [k for k in t if ("layers.0." in k and "q_proj" in k)]:
            if edit == "drop":
                del t[key]
        for key in [k for k in t if ("layers.1." in k and "v_proj" in k)]:
            if edit == "cast":
                t[key] = t[key].float()
        save_file(t, str(file))
        cases.append(path)
    for path in cases:
        meta = read_adapter_meta(str(path))
        with open(path / ADAPTER_FILE, "rb") as f:
            header, start = read_header(f)
            raw = f.read()
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)
        for tp_size in (1, 2):
            for p in range(tp_size):
                geo = PageGeometry.create(cfg, torch.float16, 2 * BLOCK * 64 * 2 // tp_size,
                                          tp_size=tp_size, tp_rank=p)
                want = pack_adapter(meta, geo, load_file(str(path / ADAPTER_FILE)))
                for gather in (packing.GATHER_ELEMENTS, 1):  # all layers at once, one by one
                    with monkeypatch.context() as m:  # memory as an allocator hands it back
                        m.setattr(torch, "empty", dirty)
                        m.setattr(packing, "GATHER_ELEMENTS", gather)
                        got = pack_file_bytes(meta, geo, data, header, device=device)
                    assert got.device.type == device
                    assert torch.equal(got.cpu(), want), (path.name, tp_size, p, gather)
    assert set(whole) == {str(tmp_path / f"qkvo-{dtype}") for dtype in ("float16", "float32")}


def dense_lora(x, path, layer, kinds, scale, widths):
    from safetensors.torch import load_file

    t = load_file(f"{path}/adapter_model.safetensors")
    outs = []
    for kind in kinds:
        part = "self_attn" if kind in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        key = f"base_model.model.model.layers.{layer}.{part}.{kind}"
        a, b = t.get(f"{key}.lora_A.weight"), t.get(f"{key}.lora_B.weight")
        if a is None:  # a slice the adapter lacks adds nothing
            outs.append(torch.zeros(x.shape[0], widths[kind][1]))
        else:
            outs.append(scale * (x @ a.t()) @ b.t())
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("group,kinds,width", [
    ("qkv_proj", ("q_proj", "k_proj", "v_proj"), 128),
    ("down_proj", ("down_proj",), 256),
    ("gate_up_proj", ("gate_proj", "up_proj"), 128),
])
def test_paged_layer_equals_dense_lora(tiny_model, adapters, group, kinds, width):
    from vllm_slora.layers import PagedLoRALinear, register_op
    from vllm_slora.memory.adapter_files import read_adapter_meta
    from vllm_slora.memory.layout import module_widths
    from vllm_slora.memory.messages import Evict, Load

    register_op()
    pager = make_pager(tiny_model, cpu_attn_kv(2))
    # adapter 1 is evicted and adapter 3 reuses some of its blocks: 2 must not notice.
    pager.apply(plan(pager, Load(1, adapters[0], [1, 2, 3, 4]),
                     Load(2, adapters[1], list(range(5, 13)))))
    pager.apply(plan(pager, Evict(1), Load(3, adapters[3], [4, 2, 1] + list(range(13, 28)))))
    ids = np.array([0, 2, 2, 3, 0, 3, 2, 2, 2], dtype=np.int64)
    pager.set_batch(ids, dummy_ids=set())
    widths = module_widths(tiny_config(tiny_model))
    out_width = sum(widths[k][1] for k in kinds)
    base = torch.nn.Linear(width, out_width, bias=False)
    layer = PagedLoRALinear(base, f"model.layers.1.x.{group}", group, pager)
    x = torch.randn(len(ids), width)
    got = layer(x)
    want = base(x).detach().clone()
    for i, lora_id in enumerate(ids):
        if lora_id:
            path = adapters[1] if lora_id == 2 else adapters[3]
            meta = read_adapter_meta(path)
            want[i] += dense_lora(x[i:i + 1], path, 1, kinds, meta.scale, widths)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], base(x)[0]) and torch.equal(got[4], base(x)[4])


def test_adapter_replaced_in_place_is_paged_in_as_it_is_now(tiny_model, tmp_path):
    """A folder rewritten with another rank between two page-ins: the
    metadata (what the scheduler budgets) and the upload (what lands in the
    pages) both follow the files on disk, never the first read."""
    from safetensors.torch import load_file

    from vllm_slora.memory.adapter_files import read_adapter_meta
    from vllm_slora.memory.messages import Evict, Load
    from vllm_slora.memory.packing import pack_adapter
    from vllm_slora.testing.adapters import make_peft_adapter

    path = str(make_peft_adapter(tmp_path / "a", tiny_model, 4, seed=1))
    kv = cpu_attn_kv(2)
    pager = make_pager(tiny_model, kv)
    pager.read_ahead.prefetch([path])
    for lora_id, rank, blocks in ((1, 4, [0, 1, 2, 3]), (2, 8, list(range(4, 12)))):
        if rank == 8:
            pager.apply(plan(pager, Evict(1)))
            make_peft_adapter(path, tiny_model, 8, seed=2)  # replaced under the same path
        pager.apply(plan(pager, Load(lora_id, path, blocks)))
        pager.resident[lora_id].copied.wait(pager.device)
        meta = read_adapter_meta(path)
        assert meta.rank == rank and pager.resident[lora_id].rank == rank
        packed = pack_adapter(meta, pager.geo, load_file(f"{path}/adapter_model.safetensors"))
        for layer in range(2):
            assert torch.equal(pager.pools[layer][pager.resident[lora_id].rows], packed[layer])
    stats = pager.read_ahead.stats()
    assert stats["hits"] == 2 and stats["misses"] == 0


def test_layers_compile_to_one_graph(tiny_model):
    """The op names its layer by a buffer (a graph input), never by a per-layer
    constant: two layers' forwards trace to the same graph code, so vLLM's
    piecewise pieces stay identical and inductor compiles one (a layer-name
    string made 33 distinct pieces of a 7B model: 60 s of start-up)."""
    from vllm_slora.layers import PagedLoRALinear, layer_of, register_op

    register_op()
    pager = make_pager(tiny_model, cpu_attn_kv(2))
    layers = [PagedLoRALinear(torch.nn.Linear(128, 128, bias=False), f"model.layers.{i}.o_proj",
                              "o_proj", pager) for i in range(2)]
    assert [layer_of(layer.lora_key) for layer in layers] == layers
    codes = []

    def backend(gm, example_inputs):
        codes.append(gm.code)
        return gm.forward

    x = torch.randn(4, 128)
    for layer in layers:
        torch._dynamo.reset()
        torch.compile(layer, backend=backend, fullgraph=True)(x)
    assert len(codes) == 2 and "slora_paged_lora" in codes[0]
    assert codes[0] == codes[1]


def test_one_plan_of_many_events_equals_dense_lora(tiny_model, adapters):
    """A plan's loads reach the device together (``Pager._page_in``: one copy
    of rows and table entries, one table write). Here one plan evicts,
    loads an adapter and evicts it again, and needs the vector tables
    compacted between two of its loads: every adapter left resident must
    still compute the dense LoRA formula, from its own pages."""
    from vllm_slora.layers import PagedLoRALinear, register_op
    from vllm_slora.memory.adapter_files import read_adapter_meta
    from vllm_slora.memory.layout import module_widths
    from vllm_slora.memory.messages import Evict, Load
    from vllm_slora.memory.pager import Pager
    from vllm_slora.memory.step import StepLimits
    from vllm_slora.memory.vectors import VectorSpace

    register_op()
    num_blocks = 96
    kv = {i: torch.zeros(num_blocks, 2, BLOCK, 64) for i in range(2)}
    pager = Pager(tiny_config(tiny_model), torch.float32, torch.device("cpu"))
    pager.bind(kv, num_blocks, StepLimits(64, 8, 32))
    pager.vectors = VectorSpace(pager.geo, pager.device, capacity=44)
    free = iter(range(num_blocks))

    def load(lora_id, path):
        meta = read_adapter_meta(path)
        return Load(lora_id, path, [next(free) for _ in range(pager.geo.blocks_for(meta.rank,
                                                                                   meta.kinds))])

    r4, r8, r16, qv8 = adapters
    pager.apply(plan(pager, load(1, r4), load(2, r8), load(3, r16)))  # vectors 0-3, 4-11, 12-27
    assert {i: r.start for i, r in pager.resident.items()} == {1: 0, 2: 4, 3: 12}
    # Free after Evict(1): 0-3, 28-43; 4 takes 28-35; after Evict(2): 0-11, 36-43,
    # so 5 (rank 16) fits only once the tables are compacted; 6 comes and goes.
    pager.apply(plan(pager, Evict(1), load(4, qv8), Evict(2), load(5, r16), load(6, r4),
                     Evict(6)))
    assert sorted(pager.resident) == [3, 4, 5]
    assert sorted(r.start for r in pager.resident.values()) == [0, 16, 24]  # compacted
    assert pager.counters["loads"] == 6 and pager.counters["evictions"] == 3

    ids = np.array([3, 4, 0, 5, 5, 3, 4], dtype=np.int64)
    pager.set_batch(ids, dummy_ids=set())
    widths = module_widths(tiny_config(tiny_model))
    kinds = ("q_proj", "k_proj", "v_proj")
    base = torch.nn.Linear(128, sum(widths[k][1] for k in kinds), bias=False)
    layer = PagedLoRALinear(base, "model.layers.1.x.qkv_proj", "qkv_proj", pager)
    x = torch.randn(len(ids), 128)
    got = layer(x)
    want = base(x).detach().clone()
    paths = {3: r16, 4: qv8, 5: r16}
    for i, lora_id in enumerate(ids):
        if lora_id:
            meta = read_adapter_meta(paths[lora_id])
            want[i] += dense_lora(x[i:i + 1], paths[lora_id], 1, kinds, meta.scale, widths)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_upload_lanes_end_with_their_uploader(tiny_model, adapters):
    """The lanes' threads hold their uploader weakly: a pager that goes away
    takes its lanes (and their staging buffers) with it, after the uploads
    it asked for."""
    import gc

    from vllm_slora.memory.messages import Load

    pager = make_pager(tiny_model, cpu_attn_kv(2))
    pager.apply(plan(pager, Load(1, adapters[0], [5, 9, 2, 7])))
    _, _, (_, threads, readers), _ = pager.uploader.close.peek()  # (uploader, _stop, args, kwargs)
    assert len(threads) == 3 and all(t.is_alive() for t in threads)
    upload = pager.resident[1].copied
    del pager
    gc.collect()
    upload.wait(torch.device("cpu"))  # it was done, not dropped
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    with pytest.raises(RuntimeError, match="shutdown"):  # the readers went with them
        readers.submit(int)


def test_an_uploader_let_go_still_does_the_uploads_it_queued(tiny_model, tmp_path, monkeypatch):
    """Uploads still queued when the last other holder lets the uploader go
    are done, not dropped (their waiters would block for ever), and then the
    lanes end. One lane, held inside the first upload while the uploader is
    let go, so the second is still queued: deterministic, where the pager
    test above caught it only when its lanes were slow to start."""
    import gc
    import threading

    from vllm_slora.memory.adapter_files import read_adapter_meta
    from vllm_slora.memory.layout import PageGeometry
    from vllm_slora.memory.uploads import Uploader
    from vllm_slora.testing.adapters import make_peft_adapter

    geo = PageGeometry.create(tiny_config(tiny_model), torch.float32, 2 * BLOCK * 64 * 4)
    metas = [read_adapter_meta(str(make_peft_adapter(tmp_path / f"a{i}", tiny_model, 4, seed=i)))
             for i in range(2)]
    n = metas[0].rows(geo)
    pools = [torch.zeros(2 * n, geo.page_width) for _ in range(tiny_config(tiny_model).num_hidden_layers)]
    entered, gate, write = threading.Event(), threading.Event(), Uploader._write

    def held_write(self, *args):
        entered.set()
        assert gate.wait(timeout=30)
        return write(self, *args)

    monkeypatch.setattr(Uploader, "_write", held_write)
    uploader = Uploader(geo, pools, slots=2, slot_bytes=4096, lanes=1)
    _, _, (_, threads, _), _ = uploader.close.peek()
    uploads = [uploader.submit(m, torch.arange(i * n, (i + 1) * n)) for i, m in enumerate(metas)]
    assert entered.wait(timeout=30)  # the lane is inside the first upload, the second queued
    del uploader
    gc.collect()
    gate.set()
    assert all(u._done.wait(timeout=30) for u in uploads), "a queued upload was dropped"
    for u in uploads:
        u.wait(torch.device("cpu"))  # done, without an error
    assert pools[0][:n].abs().sum() > 0 and pools[0][n:].abs().sum() > 0  # both written
    threads[0].join(timeout=10)
    assert not threads[0].is_alive()


def test_failed_upload_gives_its_tokens_no_lora_and_is_reported_once(tiny_model, adapters, tmp_path):
    """A file that breaks after the scheduler's check: the step that first
    uses the adapter gives its tokens no LoRA (not rows it never wrote), the
    cause is reported once for the scheduler, and the other adapter is served."""
    import shutil

    from vllm_slora.memory.adapter_files import read_adapter_meta
    from vllm_slora.memory.messages import Evict, Load

    broken = tmp_path / "broken"
    shutil.copytree(adapters[1], broken)
    meta = read_adapter_meta(str(broken))  # what the scheduler checked
    (broken / "adapter_model.safetensors").write_bytes(b"\0" * 64)  # then the file broke
    pager = make_pager(tiny_model, cpu_attn_kv(2))
    pager.apply(plan(pager, Load(1, adapters[0], [5, 9, 2, 7]), Load(2, str(broken), list(range(10, 18)), meta)))
    pager.set_batch(np.array([1, 1, 2, 2, 0]), set())
    assert pager.batch.lora_ids == [1]
    token_lora = pager.step.token_lora[:5].tolist()
    assert token_lora[:2] == [0, 0] and token_lora[2:] == [-1, -1, -1]
    faults = pager.take_faults()
    assert list(faults) == [2] and f"adapter '{broken}' could not be paged in" in faults[2]
    assert pager.take_faults() == {} and pager.counters["upload_faults"] == 1
    pager.set_batch(np.array([2, 1]), set())  # still no LoRA for it, not reported again
    assert pager.batch.lora_ids == [1] and pager.take_faults() == {}
    pager.apply(plan(pager, Evict(2)))  # the scheduler dropped it
    assert pager.faulted == {} and 2 not in pager.resident



def test_the_pager_binds_only_to_the_engines_kv_cache(tiny_model):
    """Since vLLM 0.29 the CUDA runner first captures CUDA graphs with dummy
    adapters on a small KV cache of its own (to measure their memory) and
    frees it. The pager must not bind to that one: only once the worker says
    the engine's KV cache exists (``kv_ready``, after
    ``Worker.initialize_from_config``)."""
    from vllm_slora.memory.worker_manager import PagedLoRAWorkerManager

    kv = cpu_attn_kv(2)
    context = {f"model.layers.{i}.self_attn.attn": SimpleNamespace(kv_cache=t) for i, t in kv.items()}
    config = SimpleNamespace(
        lora_config=SimpleNamespace(lora_dtype=torch.float32, max_lora_rank=32),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=1),
        model_config=SimpleNamespace(hf_text_config=tiny_config(tiny_model)),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=64, max_num_seqs=8),
        compilation_config=SimpleNamespace(cudagraph_capture_sizes=[], cudagraph_mode=0,
                                           static_forward_context=context),
        cache_config=SimpleNamespace(num_gpu_blocks=NUM_BLOCKS))
    manager = PagedLoRAWorkerManager(config, "cpu")
    manager.add_dummy_lora(SimpleNamespace(lora_int_id=1), 8)
    mapping = SimpleNamespace(type=SimpleNamespace(name="LANGUAGE"), index_mapping=[1, 1, 0])
    manager.set_active_adapters(set(), mapping)  # a profiling capture
    assert not manager.pager.bound and manager.pager.batch is None
    manager.kv_ready()
    manager.set_active_adapters(set(), mapping)
    assert manager.pager.bound
    assert [p.untyped_storage().data_ptr() for p in manager.pager.pools] == \
        [kv[i].untyped_storage().data_ptr() for i in range(2)]
