"""Triton MBGMV / MBGMM against the PyTorch reference.

On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py) on small
shapes. The interpreter (Triton 3.6) loads, stores and converts bf16 fine but
its ``tl.dot`` returns garbage for bf16 inputs (numpy has no bf16), so MBGMV
(no tl.dot) is tested in bf16 everywhere and MBGMM in bf16 only on a GPU.
With a GPU, the ``gpu`` group repeats the checks at Llama-2-7B widths.

Tolerances are relative-norm errors against the reference (fp32 math, one
rounding of y): MBGMV accumulates in fp32 throughout; MBGMM rounds v to the
weights' dtype before the tensor-core expand, as punica and vLLM do.
"""

import os

import pytest
import torch

import vllm_slora.kernels as kernels
from vllm_slora.kernels import reference
from vllm_slora.kernels.synthetic import make_paged_adapters, make_segments

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
MIXED = [1, 8, 16, 32, 64, 128]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Small shapes run on the GPU when there is one, else in the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12)).item()


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setattr(kernels, "_FORCED", "triton")


def check(ranks, k, ns, d, dtype, token_lora, segments=None, device=DEVICE, seed=0):
    """Run shrink + expand through the public API (Triton) and the reference."""
    token_lora = token_lora.to(device)
    segments = None if segments is None else tuple(t.to(device) for t in segments)
    ad = make_paged_adapters(ranks, k, ns, d, dtype, device=device, seed=seed)
    t, s, r_max = token_lora.shape[0], len(ns), ad.max_rank
    fused = s > 1
    a_rows = ad.a_rows if fused else ad.a_rows[0]
    b_rows = ad.b_rows if fused else ad.b_rows[0]
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(t, k, generator=gen).to(dtype).to(device)
    y0 = torch.randn(t, sum(ns), generator=gen).to(dtype).to(device)
    meta = (ad.lora_start, ad.lora_rank)

    # NaN poison: entries the shrink must not write stay NaN, and the expand
    # must not read them.
    out = torch.full((s, t, r_max), float("nan"), device=device)
    want_out = out.clone()
    kernels.paged_lora_shrink(
        x, ad.pool, a_rows, *meta, token_lora, out if fused else out[0], segments
    )
    reference.paged_lora_shrink(
        x, ad.pool, a_rows, *meta, token_lora, want_out if fused else want_out[0]
    )
    lora = token_lora.long()
    rank_of = torch.where(lora >= 0, ad.lora_rank[lora.clamp(min=0)], 0)
    written = torch.arange(r_max, device=device)[None, :] < rank_of[:, None]
    written = written.expand(s, t, r_max)
    assert torch.equal(out.isnan(), ~written), "shrink wrote outside [token, :rank]"
    if written.any():
        assert rel_err(out[written], want_out[written]) <= TOL[dtype]

    y = y0.clone()
    want_y = y0.clone()
    args = (ad.pool, b_rows, *meta, ad.lora_scale, token_lora)
    kernels.paged_lora_expand(out if fused else out[0], *args, y, segments)
    reference.paged_lora_expand(want_out if fused else want_out[0], *args, want_y)
    none = lora < 0
    assert torch.equal(y[none], y0[none]), "rows without LoRA changed"
    assert y.isfinite().all()
    assert rel_err(y, want_y) <= TOL[dtype]
    return ad


# ---- CPU (interpreter) and GPU, small shapes ------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SLICES = {"one-slice": [64], "qkv-gqa": [64, 32, 32], "gate-up": [96, 96]}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ns", SLICES.values(), ids=SLICES.keys())
def test_mbgmv_mixed_ranks(triton_backend, ns, dtype):
    gen = torch.Generator().manual_seed(3)
    ranks = MIXED + [8, 16]
    token_lora = torch.randint(-1, len(ranks), (12,), generator=gen, dtype=torch.int32)
    token_lora[:2] = torch.tensor([-1, 5])  # at least one -1 and one rank-128
    check(ranks, 64, ns, 32, dtype, token_lora)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ns", SLICES.values(), ids=SLICES.keys())
def test_mbgmm_segments(triton_backend, ns, dtype):
    if dtype == torch.bfloat16 and INTERPRETED:
        pytest.skip("the Triton interpreter's tl.dot is wrong for bf16; tested on GPU")
    # Segments shorter and longer than BLOCK_M (32/64), empty ones (padding),
    # segments without LoRA, and tokens after the last segment (no LoRA).
    lengths = [5, 40, 0, 1, 70, 0, 17, 33]
    seg_lora = [0, 5, 2, -1, 3, 1, -1, 4]
    token_lora, segments = make_segments(lengths, seg_lora)
    tail = torch.full((7,), -1, dtype=torch.int32)
    check(MIXED, 64, ns, 32, dtype, torch.cat([token_lora, tail]), segments)


def test_mbgmv_many_adapters(triton_backend):
    ranks = [MIXED[i % len(MIXED)] for i in range(40)]
    token_lora = torch.randperm(40, generator=torch.Generator().manual_seed(4))[:24]
    check(ranks, 64, [32, 32], 32, torch.float16, token_lora.to(torch.int32))


def test_mbgmm_many_segments_one_token_each(triton_backend):
    # Decode-like segments (length 1): MBGMM must equal MBGMV here too.
    seg_lora = [i % 6 - 1 for i in range(30)]
    token_lora, segments = make_segments([1] * 30, seg_lora)
    check(MIXED, 64, [64], 32, torch.float16, token_lora, segments)


@pytest.mark.parametrize("segmented", [False, True])
def test_no_lora_tokens_at_all(triton_backend, segmented):
    token_lora, segments = make_segments([9, 4], [-1, -1])
    check([8, 16], 64, [64], 32, torch.float16, token_lora, segments if segmented else None)


def test_paged_lora_convenience(triton_backend):
    ad = make_paged_adapters([16, 64], 64, [32, 32], 32, torch.float16, device=DEVICE)
    token_lora = torch.tensor([1, -1, 0, 1], dtype=torch.int32, device=DEVICE)
    x = torch.randn(4, 64, device=DEVICE).half()
    y = torch.randn(4, 64, device=DEVICE).half()
    want = y.clone()
    meta = (ad.lora_start, ad.lora_rank, ad.lora_scale, token_lora)
    kernels.paged_lora(x, y, ad.pool, ad.a_rows, ad.b_rows, *meta, max_rank=64)
    reference.paged_lora(x, want, ad.pool, ad.a_rows, ad.b_rows, *meta)
    assert rel_err(y, want) <= TOL[torch.float16]


def test_rejects_too_many_slices(triton_backend):
    ad = make_paged_adapters([8], 64, [32] * 4, 32, torch.float16, device=DEVICE)
    out = torch.empty(4, 1, 8, device=DEVICE)
    x = torch.randn(1, 64, device=DEVICE).half()
    token_lora = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="fused slices"):
        kernels.paged_lora_shrink(
            x, ad.pool, ad.a_rows, ad.lora_start, ad.lora_rank, token_lora, out
        )


# ---- GPU, Llama-2-7B widths -----------------------------------------------

LLAMA = {
    "qkv-7b": (4096, [4096, 4096, 4096]),
    "qkv-gqa": (4096, [4096, 1024, 1024]),
    "gate-up-7b": (4096, [11008, 11008]),
    "down-7b": (11008, [4096]),
}


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", LLAMA.values(), ids=LLAMA.keys())
@pytest.mark.parametrize("d", [128, 256])
def test_gpu_mbgmv_llama(triton_backend, shape, d, dtype):
    k, ns = shape
    ranks = [MIXED[i % len(MIXED)] for i in range(32)]
    gen = torch.Generator().manual_seed(5)
    token_lora = torch.randint(-1, len(ranks), (256,), generator=gen, dtype=torch.int32)
    check(ranks, k, ns, d, dtype, token_lora, device="cuda")


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", LLAMA.values(), ids=LLAMA.keys())
def test_gpu_mbgmm_llama(triton_backend, shape, dtype):
    k, ns = shape
    gen = torch.Generator().manual_seed(6)
    lengths = torch.randint(1, 300, (24,), generator=gen).tolist() + [0, 0]
    seg_lora = torch.randint(-1, len(MIXED), (26,), generator=gen).tolist()
    token_lora, segments = make_segments(lengths, seg_lora)
    check(MIXED, k, ns, 256, dtype, token_lora, segments, device="cuda")
