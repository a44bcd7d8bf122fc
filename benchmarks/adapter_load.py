"""How fast the worker's host cache makes adapters ready to page in, and what it costs the engine's thread.

    python -m benchmarks.adapter_load [--adapters 64] [--threads 1,8] [--out FILE]

At n = 1000 and more nearly every request brings an adapter no step has
seen, so the engine needs adapters read and packed as fast as requests
finish (about 16 per second for the 7B headline workload at base speed),
off the step's critical path. This times, on Llama-2-7B-shaped adapters of
ranks 8/16/32/64 on q,k,v,o, alone and on a thread pool like the host
cache's: ``layout.read_packed`` into pinned memory (the plugin's path
since 2026-12-02) and into pageable memory, and the earlier path
(``safetensors.torch.load_file``, packing into a zeroed tensor, then
``pin_memory``). On CUDA, while the pool reads, the main thread launches a
small kernel and waits for it in a loop, as the engine's thread launches
its steps: the loop's latency (p50/p99/max) shows whether the readers hold
it up (pinned allocations go through the driver). Then each variant's
adapters are copied to the device as the pager copies them. Files come
from ``benchmarks.adapter_pool``, so they sit in the page cache: this is
the copy cost, not the disk's.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
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


def engine_loop(stop) -> list[float]:
    """Latencies (ms) of launch + wait of a tiny kernel until ``stop`` is set."""
    import torch

    x, lat = torch.zeros(1024, device="cuda"), []
    while not stop.is_set() or len(lat) < 20:
        t = time.perf_counter()
        x.add_(1)
        torch.cuda.synchronize()
        lat.append(1e3 * (time.perf_counter() - t))
    return lat


def pct(values: list[float]) -> dict:
    v = sorted(values)
    return dict(p50=round(v[len(v) // 2], 3), p99=round(v[int(len(v) * 0.99)], 3),
                max=round(v[-1], 3))


def run(paths: list[Path], geo, threads: int, variant: str) -> dict:
    import torch

    from vllm_slora.memory.layout import read_adapter_meta, read_packed

    cuda = torch.cuda.is_available()
    pin = cuda and variant != "pageable"
    metas = [read_adapter_meta(str(p)) for p in paths]
    read = ((lambda m: legacy_pack(m, geo, pin)) if variant == "legacy"
            else (lambda m: read_packed(m, geo, pin)))
    read(metas[0])  # first-touch costs (allocator, page cache) out of the timing
    stop, loop = threading.Event(), []
    watcher = threading.Thread(target=lambda: loop.extend(engine_loop(stop))) if cuda else None
    if watcher:
        watcher.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        packed = list(pool.map(read, metas))
    s = time.perf_counter() - started
    stop.set()
    nbytes = sum(t.nbytes for t in packed)
    row = dict(variant=variant, threads=threads, adapters=len(metas), seconds=round(s, 3),
               adapters_per_s=round(len(metas) / s, 1), gb_per_s=round(nbytes / s / 1e9, 2),
               ms_per_adapter=round(1e3 * s / len(metas), 1))
    if watcher:
        watcher.join()
        row["engine_loop_ms"] = pct(loop)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for x in packed:  # as the pager: one adapter at a time
            x.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        row["upload_gb_per_s"] = round(nbytes / (time.perf_counter() - t) / 1e9, 2)
    return row


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
    rows = []
    if torch.cuda.is_available():
        stop = threading.Event()
        threading.Timer(2.0, stop.set).start()
        idle = engine_loop(stop)
        rows.append(dict(variant="idle", engine_loop_ms=pct(idle)))
        print(json.dumps(rows[-1]), flush=True)
    for threads in [int(t) for t in args.threads.split(",")]:
        for variant in ("legacy", "pinned", "pageable"):
            rows.append(run(list(folders.values()), geo, threads, variant))
            print(json.dumps(rows[-1]), flush=True)
    print("| variant | threads | adapters/s | GB/s | ms per adapter | engine loop p50/p99/max ms "
          "| upload GB/s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        loop = r.get("engine_loop_ms")
        loop = f"{loop['p50']}/{loop['p99']}/{loop['max']}" if loop else "-"
        print(f"| {r['variant']} | {r.get('threads', '-')} | {r.get('adapters_per_s', '-')} | "
              f"{r.get('gb_per_s', '-')} | {r.get('ms_per_adapter', '-')} | {loop} | "
              f"{r.get('upload_gb_per_s', '-')} |")
    if args.out:
        args.out.write_text(json.dumps(dict(rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
