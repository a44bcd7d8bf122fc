"""Batch.for_tokens: the per-step metadata for padded and trimmed forward passes."""

import torch

from vllm_slora.kernels.synthetic import make_segments
from vllm_slora.memory.pager import Batch


def make_batch(token_lora, segments):
    ranks = torch.tensor([8, 4], dtype=torch.int32)
    return Batch(token_lora=token_lora, lora_start=torch.tensor([0, 8], dtype=torch.int32),
                 lora_scale=torch.ones(2), rank={"qkvo": ranks}, max_rank={"qkvo": 8},
                 rank_a={"qkvo": ranks}, segments=segments, lora_ids=[3, 7])  # fmt: skip


def test_same_size_is_the_batch_itself():
    token_lora, segments = make_segments([3, 2], [0, 1])
    b = make_batch(token_lora, segments)
    got = b.for_tokens(5)
    assert got[0] is token_lora and got[1] is segments and got[2] is None


def test_padded_batch_built_once_and_pad_tokens_get_no_lora():
    token_lora, segments = make_segments([3, 2], [0, 1])
    b = make_batch(token_lora, segments)
    first = b.for_tokens(8)
    assert b.for_tokens(8) is first  # one build per step, shared by every layer
    padded, segs, meta = first
    assert padded.tolist() == [0, 0, 0, 1, 1, -1, -1, -1]
    # Pad tokens lie after the last segment, which the kernels treat as no
    # LoRA (tests/kernels/test_kernels.py::test_segments covers that tail).
    assert segs is segments and meta is None


def test_trimmed_batch_drops_segments():
    token_lora, segments = make_segments([3, 2], [0, 1])
    padded, segs, _ = make_batch(token_lora, segments).for_tokens(4)
    assert padded.tolist() == [0, 0, 0, 1] and segs is None
