"""How fast adapters get from their files into their pages, and what it costs the engine's thread.

    python -m benchmarks.adapter_load [--adapters 64] [--threads 1,8] [--lanes 1,3] [--readers 0,6] [--out FILE]

At n = 1000 and more nearly every request brings an adapter no step has
seen, so the engine needs adapters paged in as fast as requests finish
(about 30 per second for the 7B headline workload at base speed), off the
step's critical path. On Llama-2-7B-shaped adapters of ranks 8/16/32/64 on
q,k,v,o this times, from the first read of the file to the pages on the
device:

- ``host-packed``: what the plugin did until 2026-12-02: each adapter
  loaded (``safetensors.torch.load_file``), packed on the host into fresh
  memory, pinned, then sent with one ``.to`` (packing on a pool of
  ``--threads`` threads, as its host cache did);
- ``uploader``: the plugin's path, ``memory/uploads.py``: the file read
  through a ring of pinned staging buffers, packed on the device and
  scattered into 32 layers' pool rows, on ``--lanes`` threads (uploads at
  once, each with its own ring and copy stream; the "threads" column), the
  chunks of each file read by ``--readers`` threads (0: by its lane, one
  after another). On one lane an upload has the lanes to itself: its
  "ms per adapter" is an upload's latency, what a step that admits a
  request with a new adapter may wait for.

On CUDA, meanwhile, the main thread launches a tiny kernel and waits for it
in a loop, as the engine's thread launches its steps: the loop's latency
(p50/p99/max) shows whether the paging holds it up. Files come from
``benchmarks.adapter_pool`` and sit in the page cache (as the plugin's
read-ahead puts them): this is the copy cost, not the disk's.
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


def host_packed(meta, geo, pin: bool):
    """The earlier path: safetensors' own copy, packed on the host, then pinned."""
    from safetensors.torch import load_file

    from vllm_slora.memory.adapter_files import ADAPTER_FILE
    from vllm_slora.memory.packing import pack_adapter

    packed = pack_adapter(meta, geo, load_file(str(Path(meta.path) / ADAPTER_FILE)))
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


def loop_text(loop: dict | None) -> str:
    return f"{loop['p50']}/{loop['p99']}/{loop['max']}" if loop else "-"


def page_in(metas: list, geo, device, threads: int, uploader=None) -> None:
    """Every adapter of ``metas`` onto ``device``: through ``uploader`` (its
    pools hold the largest adapter; each overwrites the last) or, without
    one, by the host-packed path on ``threads`` threads."""
    import torch

    if uploader is None:
        with ThreadPoolExecutor(threads) as pool:
            for packed in pool.map(lambda m: host_packed(m, geo, device.type == "cuda"), metas):
                packed.to(device, non_blocking=True)
        return
    rows = torch.arange(uploader.pools[0].shape[0], device=device)
    for upload in [uploader.submit(m, rows[:m.rows(geo)]) for m in metas]:
        upload.wait(device)


def run(metas: list, geo, variant: str, threads: int, readers: int | None = None) -> dict:
    import torch

    from vllm_slora.memory.uploads import Uploader

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    uploader = None
    if variant == "uploader":  # made once, as the pager makes it at start-up
        most = max(m.rows(geo) for m in metas)
        uploader = Uploader(geo, [torch.empty(most, geo.page_width, dtype=geo.dtype, device=device)
                                  for _ in range(geo.num_layers)], lanes=threads,
                            readers=readers)
    page_in(metas[:1], geo, device, threads, uploader)  # first-touch costs out of the timing
    stop, loop = threading.Event(), []
    watcher = threading.Thread(target=lambda: loop.extend(engine_loop(stop))) if cuda else None
    if watcher:
        watcher.start()
    started = time.perf_counter()
    page_in(metas, geo, device, threads, uploader)
    if cuda:
        torch.cuda.synchronize()
    s = time.perf_counter() - started
    stop.set()
    nbytes = sum(m.rows(geo) for m in metas) * geo.num_layers * geo.page_width * geo.dtype.itemsize
    row = dict(variant=variant, threads=threads, readers=readers, adapters=len(metas),
               seconds=round(s, 3),
               adapters_per_s=round(len(metas) / s, 1), gb_per_s=round(nbytes / s / 1e9, 2),
               ms_per_adapter=round(1e3 * s / len(metas), 1))
    if watcher:
        watcher.join()
        row["engine_loop_ms"] = pct(loop)
    return row


def main(argv=None) -> int:
    import torch
    from transformers import LlamaConfig

    from benchmarks.adapter_pool import make_folders
    from vllm_slora.memory.adapter_files import read_adapter_meta
    from vllm_slora.memory.layout import PageGeometry
    from vllm_slora.testing.models import make_llama_config

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--threads", default="1,8", help="host-packed: packing threads")
    p.add_argument("--lanes", default="1,3", help="uploader: uploads at once")
    p.add_argument("--readers", default="0,6", help="uploader: threads reading file chunks")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/slora-adapter-load"))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    model = make_llama_config(args.workdir / "model", "llama-2-7b")
    names = {f"a{i}": RANKS[i % len(RANKS)] for i in range(args.adapters)}
    folders = make_folders(args.workdir / "adapters", model, names, TARGETS, pool=8)
    metas = [read_adapter_meta(str(f)) for f in folders.values()]
    # 7B KV block of 16 tokens in fp16: 2 * 16 * 32 heads * 128 * 2 bytes
    geo = PageGeometry.create(LlamaConfig.from_pretrained(model), torch.float16, 2 * 16 * 4096 * 2)
    rows = []
    if torch.cuda.is_available():
        stop = threading.Event()
        threading.Timer(2.0, stop.set).start()
        rows.append(dict(variant="idle", engine_loop_ms=pct(engine_loop(stop))))
        print(json.dumps(rows[-1]), flush=True)
    cases = ([("host-packed", int(t), None) for t in args.threads.split(",") if t]
             + [("uploader", int(n), int(k)) for n in args.lanes.split(",") if n
                for k in args.readers.split(",") if k])
    for variant, threads, readers in cases:
        rows.append(run(metas, geo, variant, threads, readers))
        print(json.dumps(rows[-1]), flush=True)
    print("| path | threads | readers | adapters/s | GB/s | ms per adapter | engine loop p50/p99/max ms |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        readers = r.get("readers")
        print(f"| {r['variant']} | {r.get('threads', '-')} | {'-' if readers is None else readers} | "
              f"{r.get('adapters_per_s', '-')} | "
              f"{r.get('gb_per_s', '-')} | {r.get('ms_per_adapter', '-')} | "
              f"{loop_text(r.get('engine_loop_ms'))} |")
    if args.out:
        args.out.write_text(json.dumps(dict(rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
