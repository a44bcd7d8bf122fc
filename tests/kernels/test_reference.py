"""The reference (the spec) and the bmm baseline against a plain dense formula.

The dense formula, ``y + scale * x @ A^T @ B^T`` per token from unpaged A, B
(``synthetic.dense_lora``), is what the paged ops must compute.
"""

import pytest
import torch

from vllm_slora.kernels import bmm, gather_adapter, reference
from vllm_slora.testing.synthetic import dense_lora, make_paged_adapters

# Relative-norm error bounds: fp32 is exact up to summation order; fp16/bf16
# add one rounding of y (the reference and the dense formula both round once).
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12)).item()


def batch(ranks, t, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    token_lora = torch.randint(-1, len(ranks), (t,), generator=gen, dtype=torch.int32)
    return token_lora.to(device)


def test_gather_adapter_unpages_exactly():
    ad = make_paged_adapters([3, 8], k=64, ns=[96], d=32, dtype=torch.float16)
    for l, (start, rank) in enumerate([(0, 3), (3, 8)]):
        a, b = gather_adapter(ad.pool, ad.a_rows[0], ad.b_rows[0], start, rank)
        assert torch.equal(a, ad.dense[l][0][0]) and torch.equal(b, ad.dense[l][0][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ns", [[64], [64, 32, 32]], ids=["one-slice", "qkv"])
@pytest.mark.parametrize("impl", ["reference", "bmm", "bmm-captured"])
@pytest.mark.parametrize("chunk_bytes", [None, 4096], ids=["whole", "chunked"])
def test_matches_dense_formula(impl, ns, dtype, chunk_bytes, monkeypatch):
    """``bmm``: S-LoRA's padding (each adapter once, padded to the batch's
    largest rank, its tokens to the largest group); ``bmm-captured``: its
    form under CUDA-graph capture (each token's adapter padded to R_MAX, in
    chunks)."""
    if impl == "bmm-captured":
        monkeypatch.setattr(bmm, "_capturing", lambda: True)
    if chunk_bytes is not None:
        if impl != "bmm-captured":
            pytest.skip("only the bmm baseline under capture gathers per token in chunks")
        # A few tokens per chunk: the chunk seams must not change the result.
        monkeypatch.setattr(bmm, "CHUNK_BYTES", chunk_bytes)
    impl = reference if impl == "reference" else bmm
    ranks = [1, 8, 16, 32, 64, 128, 8]
    ad = make_paged_adapters(ranks, k=64, ns=ns, d=32, dtype=dtype, seed=1)
    t = 24
    token_lora = batch(ranks, t, seed=2)
    x = torch.randn(t, 64, dtype=dtype)
    y0 = torch.randn(t, sum(ns), dtype=dtype)
    fused = len(ns) > 1
    a_rows = ad.a_rows if fused else ad.a_rows[0]
    b_rows = ad.b_rows if fused else ad.b_rows[0]
    v = torch.full((len(ns), t, ad.max_rank), float("nan"))
    v = v if fused else v[0]
    y = y0.clone()
    impl.paged_lora_shrink(x, ad.pool, a_rows, ad.lora_start, ad.lora_rank, token_lora, v)
    impl.paged_lora_expand(
        v, ad.pool, b_rows, ad.lora_start, ad.lora_rank, ad.lora_scale, token_lora, y
    )
    want = dense_lora(x, y0, ad, token_lora)
    assert rel_err(y, want) <= TOL[dtype]
    none = token_lora < 0
    assert none.any() and torch.equal(y[none], y0[none])


def test_bmm_pads_each_adapter_once_to_the_batchs_largest_rank():
    """S-LoRA's baseline: U adapters of the batch gathered once each, padded
    to the largest rank among them (not R_MAX), their tokens to the largest
    group."""
    ranks = [4, 16, 64]
    ad = make_paged_adapters(ranks, k=64, ns=[32], d=32, dtype=torch.float32)
    token_lora = torch.tensor([1, -1, 0, 1, 1, 0], dtype=torch.int32)  # no rank-64 adapter
    p = bmm.Padding(token_lora, ad.lora_start, ad.lora_rank)
    assert p.rank == 16 and p.rows == 3 and p.weights(ad.pool, ad.a_rows[0]).shape == (2, 16, 64)
    assert sorted(p.tokens.tolist()) == [0, 2, 3, 4, 5]
    x = torch.arange(6.0)[:, None].expand(6, 2)
    padded = p.pad(x)
    assert padded.shape == (2, 3, 2) and torch.equal(p.unpad(padded), x[p.tokens])
    assert padded[0, 2].eq(0).all()  # adapter 0 has two tokens: its third row is padding


def test_reference_writes_only_up_to_rank():
    ranks = [8, 64]
    ad = make_paged_adapters(ranks, k=64, ns=[32], d=32, dtype=torch.float32)
    token_lora = torch.tensor([0, -1, 1, 0], dtype=torch.int32)
    out = torch.full((4, 64), float("nan"))
    reference.paged_lora_shrink(
        torch.randn(4, 64), ad.pool, ad.a_rows[0], ad.lora_start, ad.lora_rank, token_lora, out
    )
    written = ~out.isnan()
    assert written[0, :8].all() and not written[0, 8:].any()
    assert not written[1].any() and written[2].all()
