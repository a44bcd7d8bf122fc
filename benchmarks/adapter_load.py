"""How fast the worker's host cache makes adapters ready to page in.

    python -m benchmarks.adapter_load [--adapters 64] [--threads 1,8] [--out FILE]

At n = 1000 and more nearly every request brings an adapter no step has
seen, so the engine needs adapters read and packed as fast as requests
finish (about 16 per second for the 7B headline workload at base speed),
off the step's critical path. This times ``layout.read_packed`` (the
safetensors file mapped and copied once into pages, pinned memory on CUDA)
on Llama-2-7B-shaped adapters of ranks 8/16/32/64 on q,k,v,o, alone and on
the host cache's thread pool, against the path used until 2026-12-02
(``safetensors.torch.load_file``, then packing into a zeroed tensor, then
``pin_memory``). Files come from ``benchmarks.adapter_pool``, so they sit in
the page cache: this is the copy cost, not the disk's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RANKS = [8, 16, 32, 64]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def legacy_pack(meta, geo, pin: bool):
    """The earlier path: safetensors' own copy, a zeroed packed tensor, then a pinned copy."""
    import torch
    from safetensors.torch import load_file

    from vllm_slora.memory.layout import ADAPTER_FILE, pack_adapter

    packed = torch.zeros(geo.num_layers, meta.rows(geo), geo.page_width, dtype=geo.dtype)
    packed.copy_(pack_adapter(meta, geo, load_file(str(Path(meta.path) / ADAPTER_FILE))))
    return packed.pin_memory() if pin else packed


def run(paths: list[Path], geo, threads: int, pin: bool, legacy: bool) -> dict:
    from vllm_slora.memory.layout import read_adapter_meta, read_packed

    metas = [read_adapter_meta(str(p)) for p in paths]
    read = (lambda m: legacy_pack(m, geo, pin)) if legacy else (lambda m: read_packed(m, geo, pin))
    read(metas[0])  # first-touch costs (allocator, page cache) out of the timing
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        nbytes = sum(t.nbytes for t in pool.map(read, metas))
    s = time.perf_counter() - started
    return dict(path="legacy" if legacy else "read_packed", threads=threads, adapters=len(metas),
                seconds=round(s, 3), adapters_per_s=round(len(metas) / s, 1),
                gb_per_s=round(nbytes / s / 1e9, 2), ms_per_adapter=round(1e3 * s / len(metas), 1))


def main(argv=None) -> int:
    import torch
    from transformers import LlamaConfig

    from benchmarks.adapter_pool import make_folders
    from vllm_slora.testing.models import make_llama_config
    from vllm_slora.memory.layout import PageGeometry

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--threads", default="1,8")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/slora-adapter-load"))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    model = make_llama_config(args.workdir / "model", "llama-2-7b")
    names = {f"a{i}": RANKS[i % len(RANKS)] for i in range(args.adapters)}
    folders = make_folders(args.workdir / "adapters", model, names, TARGETS, pool=8)
    # 7B KV block of 16 tokens in fp16: 2 * 16 * 32 heads * 128 * 2 bytes
    geo = PageGeometry.create(LlamaConfig.from_pretrained(model), torch.float16, 2 * 16 * 4096 * 2)
    pin = torch.cuda.is_available()
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        for legacy in (True, False):
            rows.append(run(list(folders.values()), geo, threads, pin, legacy))
            print(json.dumps(rows[-1]), flush=True)
    print("| path | threads | adapters/s | GB/s | ms per adapter |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['threads']} | {r['adapters_per_s']} | {r['gb_per_s']} | "
              f"{r['ms_per_adapter']} |")
    if args.out:
        args.out.write_text(json.dumps(dict(pinned=pin, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
