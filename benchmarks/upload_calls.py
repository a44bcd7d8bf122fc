"""How many torch calls an upload's lane makes, per adapter rank (CPU is enough).

    python -m benchmarks.upload_calls [--ranks 8,16,32,64]

Inside the engine the lane that uploads an adapter takes the GIL for each
torch call, and the engine's thread holds the GIL for most of a step: on
an H100 at n = 2,000 an upload that takes 7 ms alone took 21 ms of its
lane inside the engine (`benchmarks/results/gpu-vllm-0.34-2026-12-06.md`,
tenth session). This counts those calls (``TorchFunctionMode``, in the
lane's thread; the readers' ``os.preadv`` takes none) for Llama-2-7B-shaped
adapters on q,k,v,o, pools in one allocation as vLLM 0.32+ keeps the KV.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def count_calls(ranks: list[int], workdir: Path) -> dict[int, int]:
    import torch
    from torch.overrides import TorchFunctionMode
    from transformers import LlamaConfig

    from benchmarks.adapter_pool import make_folders
    from vllm_slora.memory import uploads
    from vllm_slora.memory.adapter_files import read_adapter_meta
    from vllm_slora.memory.layout import PageGeometry
    from vllm_slora.testing.models import make_llama_config

    class Count(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    model = make_llama_config(workdir / "model", "llama-2-7b")
    folders = make_folders(workdir / "adapters", model, {f"r{r}": r for r in ranks},
                           ["q_proj", "k_proj", "v_proj", "o_proj"], pool=1)
    geo = PageGeometry.create(LlamaConfig.from_pretrained(model), torch.float16, 2 * 16 * 4096 * 2)
    out, write = {}, uploads.Uploader._write
    for rank, folder in zip(ranks, folders.values()):
        meta = read_adapter_meta(str(folder))
        n = meta.rows(geo)
        whole = torch.zeros(geo.num_layers * n, geo.page_width, dtype=geo.dtype)
        uploader = uploads.Uploader(geo, [whole[i * n:] for i in range(geo.num_layers)], lanes=1)
        rows = torch.arange(n)
        uploader.submit(meta, rows).wait(torch.device("cpu"))  # caches warm
        counted = []

        def counting(self, *args):
            with Count() as mode:
                write(self, *args)
            counted.append(mode.calls)

        uploads.Uploader._write = counting
        try:
            uploader.submit(meta, rows).wait(torch.device("cpu"))
        finally:
            uploads.Uploader._write = write
        out[rank] = counted[0]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", default="8,16,32,64")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/slora-upload-calls"))
    args = p.parse_args(argv)
    calls = count_calls([int(r) for r in args.ranks.split(",")], args.workdir)
    print("| rank | torch calls in the lane per upload |\n|---|---|")
    for rank, n in calls.items():
        print(f"| {rank} | {n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
