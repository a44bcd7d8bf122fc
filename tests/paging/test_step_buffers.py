"""Static per-step metadata (memory/step.py): what CUDA graphs need of the
paged LoRA layers, checked on CPU.

- Steps replayed through the same buffers compute what freshly built
  tensors give, and the buffers never move (a captured graph keeps their
  addresses).
- What a layer launches depends on the forward's token count only, never
  on the step's adapters or ranks (the launch grids and the kernels'
  compile-time constants, recorded without running the kernels).
- Padding: tokens past the step's count get no LoRA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.paging.test_pager import adapters, cpu_attn_kv, make_pager, plan  # noqa: F401


def load_three(pager, adapters):  # noqa: F811
    from vllm_slora.memory.messages import Load

    pager.apply(plan(pager, Load(1, adapters[0], [1, 2, 3, 4]),
                     Load(2, adapters[1], list(range(5, 13))),
                     Load(3, adapters[2], list(range(13, 29)))))


def fresh_reference(pager, x, ids, group, kinds_rows):
    """The LoRA output from tensors built for this step alone (no buffers)."""
    from vllm_slora.kernels import paged_lora
    from vllm_slora.memory.layout import GROUPS

    lora_ids = sorted({int(i) for i in ids if i > 0})
    res = [pager.resident[i] for i in lora_ids]
    index = {lid: n for n, lid in enumerate(lora_ids)}
    token_lora = torch.tensor([index.get(int(i), -1) for i in ids], dtype=torch.int32)
    rank = torch.tensor([r.rank if GROUPS[group][0] in r.kinds else 0 for r in res],
                        dtype=torch.int32)
    y = torch.zeros(len(ids), kinds_rows)
    a_rows, b_rows = pager.vectors.group_tables[group]
    paged_lora(x, y, pager.pools[1], a_rows, b_rows,
               torch.tensor([r.start for r in res], dtype=torch.int32), rank,
               torch.tensor([r.scale for r in res], dtype=torch.float32), token_lora)
    return y


@pytest.mark.parametrize("group,width,out", [("qkv_proj", 128, 256), ("down_proj", 256, 128)])
def test_steps_through_the_same_buffers_equal_fresh_tensors(tiny_model, adapters, group, width,
                                                            out):  # noqa: F811
    from vllm_slora.layers import PagedLoRALinear, register_op

    register_op()
    pager = make_pager(tiny_model, cpu_attn_kv(2))
    load_three(pager, adapters)
    base = torch.nn.Linear(width, out, bias=False)
    layer = PagedLoRALinear(base, f"model.layers.1.x.{group}", group, pager)
    pointers = pager.step.buffer.data_ptr(), pager.step.meta.data_ptr()
    steps = [np.array([0, 2, 2, 3, 0, 3, 2, 1, 1], dtype=np.int64),
             np.array([1, 1, 0, 3], dtype=np.int64),
             np.array([3, 2, 1, 0, 0, 2, 3, 3, 1, 2, 2], dtype=np.int64)]
    torch.manual_seed(0)
    for ids in steps:
        pager.set_batch(ids, dummy_ids=set())
        x = torch.randn(len(ids), width)
        with torch.no_grad():
            got = layer(x) - base(x)
        torch.testing.assert_close(got, fresh_reference(pager, x, ids, group, out),
                                   rtol=1e-5, atol=1e-5)
        assert (pager.step.buffer.data_ptr(), pager.step.meta.data_ptr()) == pointers


def test_padded_tokens_get_no_lora(tiny_model, adapters):  # noqa: F811
    from vllm_slora.layers import PagedLoRALinear, register_op

    register_op()
    pager = make_pager(tiny_model, cpu_attn_kv(2))
    load_three(pager, adapters)
    base = torch.nn.Linear(128, 256, bias=False)
    layer = PagedLoRALinear(base, "model.layers.1.x.qkv_proj", "qkv_proj", pager)
    pager.set_batch(np.array([2, 2, 3, 1, 1, 1, 3, 2, 3, 3], dtype=np.int64), dummy_ids=set())
    pager.set_batch(np.array([2, 3, 1], dtype=np.int64), dummy_ids=set())  # a shorter step after
    x = torch.randn(8, 128)  # the runner padded 3 tokens to 8
    with torch.no_grad():
        got = layer(x)
        assert torch.equal(got[3:], base(x)[3:])
        assert not torch.allclose(got[:3], base(x)[:3])


def test_dummy_ids_make_a_lora_step_with_no_lora_tokens(tiny_model, adapters):  # noqa: F811
    pager = make_pager(tiny_model, cpu_attn_kv(2))
    load_three(pager, adapters)
    pager.set_batch(np.array([7, 7, 8], dtype=np.int64), dummy_ids={7, 8})
    assert pager.batch is not None and pager.batch.lora_ids == []
    assert set(pager.batch.max_rank.values()) == {pager.step.limits.max_rank}
    assert (pager.step.token_lora == -1).all()
    pager.set_batch(np.array([0, 0], dtype=np.int64), dummy_ids={7})
    assert pager.batch is None


class Recorder:
    """Stands in for a Triton kernel: records grid and arguments, runs nothing."""

    def __init__(self, log, name):
        self.log, self.name = log, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            # Tensors by shape (their values are per step), ints by value.
            sig = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
            self.log.append((self.name, tuple(grid), sig, tuple(sorted(kwargs.items()))))
        return launch


def record_launches(monkeypatch, log: list) -> None:
    """The grouped kernels' launches logged instead of run."""
    from vllm_slora.kernels import expand, shrink

    for module, name in ((shrink, "_shrink_kernel"), (expand, "_expand_kernel"),
                         (shrink, "_reduce_kernel")):
        monkeypatch.setattr(module, name, Recorder(log, name))


@pytest.mark.parametrize("t", [8, 40])
def test_launches_depend_on_the_token_count_only(tiny_model, adapters, monkeypatch, t):  # noqa: F811
    import vllm_slora.kernels as kernels
    from vllm_slora.layers import PagedLoRALinear, register_op

    register_op()
    monkeypatch.setattr(kernels, "BACKEND_OVERRIDE", "triton")
    log = []
    record_launches(monkeypatch, log)
    pager = make_pager(tiny_model, cpu_attn_kv(2))
    load_three(pager, adapters)
    layers = [PagedLoRALinear(torch.nn.Linear(128, 256, bias=False), "model.layers.0.a.qkv_proj",
                              "qkv_proj", pager),
              PagedLoRALinear(torch.nn.Linear(256, 128, bias=False), "model.layers.0.b.down_proj",
                              "down_proj", pager)]
    layers[0].builds_meta = True
    rng = np.random.default_rng(0)
    records = []
    for choices in ([2], [1, 3], [1, 2, 3]):  # ranks 8 / 4+8 / 4+8+16: other R and L
        ids = rng.choice(choices, size=t - 3)  # the runner pads t - 3 tokens to t
        pager.set_batch(ids.astype(np.int64), dummy_ids=set())
        log.clear()
        x = torch.randn(t, 128)
        with torch.no_grad():
            layers[1](layers[0](x)[:, :256] @ torch.zeros(256, 256))
        records.append(list(log))
    assert records[0] and records[0] == records[1] == records[2]


def test_start_up_sizes_cover_every_variant_of_larger_steps(monkeypatch):
    """Running the representative sizes launches every kernel variant (the
    compile-time constants) that any step size of the range launches."""
    import vllm_slora.kernels as kernels
    from vllm_slora.kernels import plan as kernel_plan
    from vllm_slora.kernels import variants
    from vllm_slora.memory.step import StepLimits

    monkeypatch.setattr(kernels, "BACKEND_OVERRIDE", "triton")
    monkeypatch.setattr(kernel_plan, "num_sms", lambda index: 132)  # an H100/H200's plans
    kernel_plan._plan.cache_clear()
    log = []
    record_launches(monkeypatch, log)
    limits = StepLimits(max_tokens=2048, max_loras=64, max_rank=64)
    d, k, widths = 64, 512, [1408, 1408]  # a gate_up-like module
    pool = torch.zeros(4096, d)
    tables = [torch.zeros(16, k // d, dtype=torch.int32)], [torch.zeros(16, w // d, dtype=torch.int32)
                                                             for w in widths]
    lora = [torch.zeros(limits.max_loras, dtype=torch.int32)] * 2 + [torch.ones(limits.max_loras)]

    def constants(t):
        log.clear()
        token_lora = torch.full((t,), -1, dtype=torch.int32)
        meta = kernels.batch_meta(token_lora, limits.max_loras)
        kernels.paged_lora(torch.zeros(t, k), torch.zeros(t, sum(widths)), pool, tables[0] * 2,
                           tables[1], *lora, token_lora, max_rank=limits.max_rank, meta=meta,
                           dispatch=False)
        return {(name, kw) for name, _, _, kw in log}

    sizes = variants.representative_sizes(1, limits, k, max(widths), 2, d, torch.float32,
                                          torch.device("cpu"))
    assert 1 < len(sizes) < 40
    covered = set().union(*(constants(t) for t in sizes))
    rng = np.random.default_rng(1)
    for t in sorted(set(rng.integers(1, limits.max_tokens + 1, 60).tolist()) | {33, 2048}):
        assert constants(t) <= covered, t
    kernel_plan._plan.cache_clear()
