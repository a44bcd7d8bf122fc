"""S-LoRA's tensor-parallel partition (vllm_slora/testing/tp_reference.py) on 2 CPU processes
(gloo) equals the unsharded computation, for mixed ranks (odd ones too)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vllm_slora.testing import tp_reference as tp

RANKS = [1, 3, 8, 16, 5]
K, N, D, T = 64, 96, 16, 24
WORLD = 2


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    adapters = [(torch.randn(r, K, generator=g) / K**0.5, torch.randn(N, r, generator=g) / r**0.5)
                for r in RANKS]
    token_lora = torch.randint(-1, len(RANKS), (T,), generator=g, dtype=torch.int32)
    scale = torch.rand(len(RANKS), generator=g) + 0.5
    x = torch.randn(T, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    return adapters, token_lora, scale, x, w


def dense(x, w, adapters, token_lora, scale):
    y = x @ w.t()
    for i, l in enumerate(token_lora.tolist()):
        if l >= 0:
            a, b = adapters[l]
            y[i] += scale[l] * (x[i] @ a.t() @ b.t())
    return y


def worker(p: int, port: int, out: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=p, world_size=WORLD)
    adapters, token_lora, scale, x, w = problem()
    r_max = max(RANKS)

    # Column-parallel: W split along N.
    shards = [tp.column_shard(a, b, p, WORLD) for a, b in adapters]
    # page() pages whole adapters; the zero halves fill pages nobody reads.
    paged_a = tp.page([(a, torch.zeros(b.shape[0], a.shape[0])) for a, b in shards], D, seed=p)
    paged_b = tp.page([(torch.zeros(b.shape[1], K), b) for _, b in shards], D, seed=10 + p)
    y_p = x @ w.tensor_split(WORLD, dim=0)[p].t()
    tp.column_parallel_lora(x, y_p, paged_a, paged_b, scale, token_lora, r_max)
    col = [torch.empty_like(y_p) for _ in range(WORLD)]
    dist.all_gather(col, y_p)

    # Row-parallel: W split along K; the base all-reduce carries LoRA too.
    rshards = [tp.row_shard(a, b, p, WORLD) for a, b in adapters]
    k_p, n_p = K // WORLD, N // WORLD
    paged_ra = tp.page([(a, torch.zeros(n_p, a.shape[0])) for a, _ in rshards], D, seed=20 + p)
    paged_rb = tp.page([(torch.zeros(b.shape[1], k_p), b) for _, b in rshards], D, seed=30 + p)
    x_p = x.tensor_split(WORLD, dim=1)[p]
    partial = x_p @ w.tensor_split(WORLD, dim=1)[p].t()
    tp.row_parallel_lora(x_p, partial, p * n_p, paged_ra, paged_rb, scale, token_lora, r_max)
    dist.all_reduce(partial)
    if p == 0:
        out["column"] = torch.cat(col, dim=1)
        out["row"] = partial
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(free_port(), out), nprocs=WORLD, join=True)
        return dict(out)


def test_column_parallel_equals_unsharded(results):
    adapters, token_lora, scale, x, w = problem()
    want = dense(x, w, adapters, token_lora, scale)
    torch.testing.assert_close(results["column"], want, rtol=1e-5, atol=1e-5)


def test_row_parallel_equals_unsharded(results):
    adapters, token_lora, scale, x, w = problem()
    want = dense(x, w, adapters, token_lora, scale)
    torch.testing.assert_close(results["row"], want, rtol=1e-5, atol=1e-5)


def test_lora_changes_the_output():
    adapters, token_lora, scale, x, w = problem()
    assert (token_lora >= 0).any() and (token_lora < 0).any()
    assert not torch.allclose(dense(x, w, adapters, token_lora, scale), x @ w.t())
