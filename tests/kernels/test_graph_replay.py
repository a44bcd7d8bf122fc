"""The paged LoRA op as vLLM's CUDA graphs run it: captured once, replayed for new steps.

The engine captures ``group_by_adapter`` + ``paged_lora`` per batch size on
static buffers (``memory/step.py``) and replays the graph every step with
other adapters, ranks and tokens, steps queued back to back without a host
sync. Here: a sequence of random steps (up to 64 adapter slots of mixed
ranks, a fifth of the tokens without LoRA, the previous step's values left
in the buffers) goes through one ``StepBuffers`` and one captured graph;
every step's output must equal the PyTorch reference of that step.

On CPU the same sequence runs eagerly under the Triton interpreter (small
shapes): the harness and the buffers' reuse are checked there; the graph
itself, and the programmatic dependent launch between the shrink and the
expand (on by default on Hopper, ``knobs.PDL``), only on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vllm_slora.kernels as kernels
from vllm_slora.kernels import grouped, knobs, reference
from vllm_slora.testing.synthetic import make_paged_adapters
from vllm_slora.memory.layout import GROUPS
from vllm_slora.memory.step import StepBuffers, StepLimits

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4}
SLOTS = 64
MIXED = [8, 16, 32, 64, 4, 128]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12)).item()


def random_step(rng: np.random.Generator, t: int, n_adapters: int):
    """token_lora over the step's slots (-1 = none) and each slot's adapter."""
    n = int(rng.integers(1, min(SLOTS, n_adapters, t) + 1))
    chosen = rng.choice(n_adapters, size=n, replace=False)
    token_lora = rng.integers(0, n, size=t).astype(np.int32)
    token_lora[rng.random(t) < 0.2] = -1
    return token_lora, chosen


def run_sequence(k, ns, d, dtype, t, steps, device, graph: bool, seed=0):
    """Max relative error over ``steps`` replays of one step's op."""
    ranks = [MIXED[i % len(MIXED)] for i in range(2 * SLOTS // 3)]
    ad = make_paged_adapters(ranks, k, ns, d, dtype, device=device, seed=seed)
    r_max = max(ranks)
    group = "qkv_proj"  # the buffers' rank lane for this module
    buf = StepBuffers(StepLimits(max_tokens=t, max_loras=SLOTS, max_rank=r_max),
                      torch.device(device))
    x = torch.zeros(t, k, dtype=dtype, device=device)
    y = torch.zeros(t, sum(ns), dtype=dtype, device=device)
    a_rows, b_rows = (ad.a_rows, ad.b_rows) if len(ns) > 1 else (ad.a_rows[0], ad.b_rows[0])

    def op():
        token_lora = buf.token_lora[:t]
        meta = kernels.batch_meta(token_lora, SLOTS, out=buf.meta_for(t))
        kernels.paged_lora(x, y, ad.pool, a_rows, b_rows, buf.lora_start, buf.rank[group],
                           buf.lora_scale, token_lora, max_rank=r_max, meta=meta,
                           dispatch=False)

    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)

    def write(token_lora, chosen):
        starts = ad.lora_start.cpu()[chosen].tolist()
        rk = ad.lora_rank.cpu()[chosen].tolist()
        ranks_by_group = {g: rk if g == group else [0] * len(rk) for g in GROUPS}
        buf.write(token_lora, starts, ranks_by_group, ranks_by_group,
                  ad.lora_scale.cpu()[chosen].tolist())

    replay = op
    if graph:
        write(*random_step(rng, t, len(ranks)))
        op()  # compile outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            op()
        replay = g.replay
    inputs = [(torch.randn(t, k, generator=gen).to(dtype).to(device),
               torch.randn(t, sum(ns), generator=gen).to(dtype).to(device))
              for _ in range(steps)]
    if device == "cuda":
        torch.cuda.synchronize()
    cases = []
    for xs, y0 in inputs:  # queued back to back: no host sync between steps
        token_lora, chosen = random_step(rng, t, len(ranks))
        write(token_lora, chosen)
        x.copy_(xs)
        y.copy_(y0)
        replay()
        cases.append((token_lora, chosen, xs, y0, y.clone()))
    worst = 0.0
    for token_lora, chosen, xs, y0, got in cases:
        idx = torch.as_tensor(chosen, device=device, dtype=torch.long)
        want = y0.clone()
        tl_ = torch.as_tensor(token_lora, device=device)
        reference.paged_lora(xs, want, ad.pool, a_rows, b_rows, ad.lora_start[idx],
                             ad.lora_rank[idx], ad.lora_scale[idx], tl_)
        none = tl_ < 0
        assert torch.equal(got[none], y0[none]), "rows without LoRA changed"
        assert got.isfinite().all(), "non-finite output"
        worst = max(worst, rel_err(got, want))
    return worst


@pytest.mark.parametrize("t", [6, 40], ids=lambda t: f"t{t}")
def test_steps_through_static_buffers(monkeypatch, t):
    # Per-token tiles (t <= 32) and per-adapter groups (t > 32), eagerly.
    monkeypatch.setattr(kernels, "BACKEND_OVERRIDE", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    err = run_sequence(64, [64, 32, 32], 32, dtype, t, steps=3, device=device, graph=False)
    assert err <= TOL[dtype]


LLAMA_MODULES = {"qkv-7b": (4096, [4096, 4096, 4096]), "down-7b": (11008, [4096])}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("pdl", [None, False], ids=["pdl-default", "pdl-off"])
@pytest.mark.parametrize("shape", LLAMA_MODULES.values(), ids=LLAMA_MODULES.keys())
@pytest.mark.parametrize("t", [8, 64, 256], ids=lambda t: f"t{t}")
def test_gpu_graph_replays_new_steps(monkeypatch, pdl, shape, t):
    monkeypatch.setattr(kernels, "BACKEND_OVERRIDE", "triton")
    monkeypatch.setattr(knobs, "PDL", pdl)
    k, ns = shape
    err = run_sequence(k, ns, 256, torch.float16, t, steps=24, device="cuda", graph=True)
    assert err <= TOL[torch.float16]


@pytest.mark.parametrize("launch", ["direct", "triton"])
@pytest.mark.parametrize("shape", LLAMA_MODULES.values(), ids=LLAMA_MODULES.keys())
@pytest.mark.parametrize("t", [40, 300, 1000], ids=lambda t: f"t{t}")
def test_recorded_launches_replay_another_layer(monkeypatch, shape, t, launch):
    """Eager steps record one layer's launches and replay them for the next
    layers with their x, pool and y (kernels/replay.py): each replay must
    give exactly what the kernels give called through Triton for that layer,
    launched straight through the C launchers or through Triton's, and a
    tensor Triton would compile differently for (misaligned) must not match.
    Under the interpreter nothing is recorded (the layers then take the
    ordinary path)."""
    from vllm_slora.kernels import replay as replay_mod
    from vllm_slora.kernels.replay import Recorder

    monkeypatch.setattr(kernels, "BACKEND_OVERRIDE", "triton")
    monkeypatch.setattr(replay_mod, "LAUNCH", launch)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    k, ns = shape if cuda else (64, [64, 32, 32][:len(shape[1])])
    if not cuda:
        t = min(t, 40)
    d = 256 if cuda else 32
    ranks = [MIXED[i % len(MIXED)] for i in range(12)]
    ad = make_paged_adapters(ranks, k, ns, d, dtype, device=device, seed=1)
    other = ad.pool.clone()
    other[~other.isnan()] *= -0.7  # another layer: same tables, other weights
    buf = StepBuffers(StepLimits(max_tokens=t, max_loras=SLOTS, max_rank=max(ranks)),
                      torch.device(device))
    rng = np.random.default_rng(t)
    token_lora, chosen = random_step(rng, t, len(ranks))
    rk = ad.lora_rank.cpu()[chosen].tolist()
    by_group = {g: rk if g == "qkv_proj" else [0] * len(rk) for g in GROUPS}
    buf.write(token_lora, ad.lora_start.cpu()[chosen].tolist(), by_group, by_group,
              ad.lora_scale.cpu()[chosen].tolist())
    tl_ = buf.token_lora[:t]
    meta = kernels.batch_meta(tl_, SLOTS, out=buf.meta_for(t))
    gen = torch.Generator().manual_seed(t)

    def layer_inputs():
        return (torch.randn(t, k, generator=gen).to(dtype).to(device),
                torch.randn(t, sum(ns), generator=gen).to(dtype).to(device))

    def through_triton(x, pool, y, record=None):
        grouped.lora(x, y, pool, ad.a_rows, ad.b_rows, buf.lora_start, buf.rank["qkv_proj"],
                     buf.lora_scale, tl_, max(ranks), None, meta, record)

    x0, y0 = layer_inputs()
    want0 = y0.clone()
    through_triton(x0, ad.pool, want0)
    rec = Recorder(x=x0, pool=ad.pool, y=y0)
    through_triton(x0, ad.pool, y0, rec)
    assert torch.equal(y0, want0)  # recording launches as usual
    replay = rec.result()
    if not cuda:
        assert replay is None
        return
    assert replay is not None and 2 <= len(replay.launches) <= 3
    # Our kernels need no Triton scratch memory: every launch can go direct.
    assert all(launch.direct is not None for launch in replay.launches)
    for pool in (other, ad.pool, other):
        x, y = layer_inputs()
        want = y.clone()
        through_triton(x, pool, want)
        assert replay.matches(x=x, pool=pool, y=y)
        replay(x=x, pool=pool, y=y)
        assert torch.equal(y, want)
    shifted = torch.empty(t * k + 1, dtype=dtype, device=device)[1:].view(t, k)
    assert not replay.matches(x=shifted, pool=ad.pool, y=y)


class CudaLauncher:
    """A compiled kernel's launcher as Triton 3.6 has it (its name included)."""

    def __init__(self, calls, scratch=0):
        self.calls = calls
        self.global_scratch_size, self.profile_scratch_size = scratch, 0
        self.launch_cooperative_grid, self.launch_pdl = False, True

    def launch(self, *args):
        self.calls.append(("direct", args))

    def __call__(self, *args):  # CompiledKernel.run(...), Triton's own launch
        self.calls.append(("triton", args))


class _FakeKernel:
    def __init__(self, calls, scratch=0):
        self.run = CudaLauncher(calls, scratch)
        self.function, self.packed_metadata = 1234, (4, 1, 0)

    def launch_metadata(self, grid, stream, *args):
        return None


def test_direct_launch_passes_addresses_in_the_launchers_order(monkeypatch):
    """The direct replay calls the C launcher with Triton's base arguments in
    its order (grid, stream, function, cooperative, PDL, two scratch
    pointers, packed metadata, launch metadata, two hooks) and every tensor
    as its address, the swapped ones (x, pool, y) being this call's; a
    kernel that needs scratch memory goes through Triton's launch."""
    from vllm_slora.kernels import replay

    monkeypatch.setattr(replay, "launcher_format", lambda: replay.DIRECT_FORMAT)
    calls = []
    static = torch.arange(4, dtype=torch.int32)
    x0, y0, x1, y1 = (torch.zeros(8) for _ in range(4))
    values = [x0, static, 7, None, y0, 3.5]
    launch = replay.Launch(_FakeKernel(calls), (5, 2, 1), values, [("x", 0), ("y", 4)],
                           replay._direct(_FakeKernel(calls), values))
    rep = replay.Replay(launches=[launch])
    monkeypatch.setattr(replay, "current_stream", lambda: 99)
    monkeypatch.setattr(replay, "LAUNCH", "direct")
    rep(x=x1, y=y1)
    kind, args = calls.pop()
    assert kind == "direct"
    assert args == (5, 2, 1, 99, 1234, False, True, None, None, (4, 1, 0), None, None, None,
                    x1.data_ptr(), static.data_ptr(), 7, None, y1.data_ptr(), 3.5)
    assert launch.direct[2][0] == x0.data_ptr()  # the recording itself is left as it was

    # Scratch memory, another launcher layout, or LAUNCH = "triton": Triton's
    # launch with the tensors themselves.
    assert replay._direct(_FakeKernel(calls, scratch=128), values) is None
    monkeypatch.setattr(replay, "launcher_format", lambda: "iiiKKOOOO")
    assert replay._direct(_FakeKernel(calls), values) is None
    monkeypatch.setattr(replay, "LAUNCH", "triton")
    import triton  # noqa: F401  (Triton's launch path reads its knobs)

    rep(x=x1, y=y1)
    kind, args = calls.pop()
    assert kind == "triton" and args[-6] is x1 and args[-2] is y1 and args[-5] is static
