"""Per-step LoRA metadata in static buffers that CUDA graphs can capture.

Every tensor the LoRA layers read lives in one device buffer allocated once
from the engine's limits, so a graph captured at any batch size reads the
current step's values at replay:

    int32 [ token_lora (max_tokens) | lora_start (L) | rank (G x L) |
            rank_a (G x L) | lora_scale (L, fp32 bits) ]

``L`` = ``max_loras``: distinct adapters one step may hold (the scheduler's
``max_num_seqs``); ``G`` = layer groups (``layout.GROUPS``). Tokens past the
step's count keep -1 (no LoRA), so a forward padded to a graph size gives
pad tokens no LoRA. Adapter slots past the step's adapters keep rank 0.

Each step writes a pinned host copy of the buffer and sends it with one
non-blocking copy, as vLLM fills its own input buffers before a replay. Two
host copies alternate, each reused only after its previous copy finished.
``meta`` is the static buffer of ``kernels.group_by_adapter`` (built inside
the forward, by the first LoRA layer, so it is part of the graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_slora.kernels.grouping import meta_size
from vllm_slora.memory.layout import GROUPS


@dataclass(frozen=True)
class StepLimits:
    max_tokens: int  # tokens of one forward, padding included
    max_loras: int  # distinct adapters of one step
    max_rank: int  # --max-lora-rank: the kernels' static R_MAX


class StepBuffers:
    def __init__(self, limits: StepLimits, device: torch.device):
        t, n = limits.max_tokens, limits.max_loras
        g = len(GROUPS)
        self.limits = limits
        self.device = device
        size = t + n + 2 * g * n + n
        self.buffer = torch.full((size,), -1, dtype=torch.int32, device=device)
        self.buffer[t:] = 0
        self.token_lora = self.buffer[:t]
        self.lora_start = self.buffer[t:t + n]
        ranks = self.buffer[t + n:t + n + 2 * g * n].view(2, g, n)
        self.rank = {name: ranks[0, i] for i, name in enumerate(GROUPS)}
        self.rank_a = {name: ranks[1, i] for i, name in enumerate(GROUPS)}
        self.lora_scale = self.buffer[t + n + 2 * g * n:].view(torch.float32)
        self.meta = torch.zeros(meta_size(t, n), dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        self._host = [self.buffer.cpu().pin_memory() if pin else self.buffer.cpu().clone()
                      for _ in range(2 if pin else 1)]
        self._sent: list[torch.cuda.Event | None] = [None] * len(self._host)
        self._tokens = [t] * len(self._host)  # tokens each host copy may hold != -1
        self._next = 0

    def write(self, token_lora: np.ndarray, starts: list[int], ranks: dict[str, list[int]],
              ranks_a: dict[str, list[int]], scales: list[float]) -> None:
        """One step's values: token_lora int32 [T] (-1 = none) indexes the
        per-adapter lists (``len(starts)`` <= max_loras)."""
        lim = self.limits
        t, n = token_lora.shape[0], len(starts)
        if t > lim.max_tokens:
            raise ValueError(f"a step of {t} tokens exceeds the {lim.max_tokens} tokens the "
                             f"LoRA buffers were sized for")
        if n > lim.max_loras:
            raise ValueError(f"a step with {n} adapters exceeds the {lim.max_loras} the LoRA "
                             f"buffers were sized for")
        i = self._next
        self._next = (i + 1) % len(self._host)
        if self._sent[i] is not None:
            self._sent[i].synchronize()  # its previous copy is done (normally long ago)
        host = self._host[i].numpy()
        host[:t] = token_lora
        host[t:self._tokens[i]] = -1
        self._tokens[i] = t
        tmax, g = lim.max_tokens, len(GROUPS)
        lane = host[tmax:].reshape(-1)
        lane[:] = 0
        lane[:n] = starts
        for j, name in enumerate(GROUPS):
            lane[lim.max_loras * (1 + j):][:n] = ranks[name]
            lane[lim.max_loras * (1 + g + j):][:n] = ranks_a[name]
        lane[lim.max_loras * (1 + 2 * g):][:n] = np.asarray(scales, np.float32).view(np.int32)
        self.buffer.copy_(self._host[i], non_blocking=True)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._sent[i] = event

    def meta_for(self, t: int) -> torch.Tensor:
        """The meta buffer's view for a forward of t tokens."""
        return self.meta[:meta_size(t, self.limits.max_loras)]
