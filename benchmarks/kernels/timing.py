"""GPU time per call, as the "us" columns report it.

``graph_us`` captures the call REPS times in one CUDA graph, each preceded by
a 128 MB write that evicts L2 (50 MB), times graph replays with CUDA events,
and subtracts the same graph without the calls (median of interleaved
replays). This is how stock's ops run inside vLLM's CUDA graphs (ours run
between the graph pieces: see "eager us"), and it leaves out the host's
launch cost, which an eager call of a 10-50 us op is bound by. "eager us" is
``triton.testing.do_bench`` (median, L2 flushed) of one eager call: what an
op costs when it runs outside a graph, host launch cost included (stock's two
launches against our two or three). Also used by ``benchmarks.lora_step``.
"""

# Graph timing: calls per graph aim at this much GPU time (within REPS_RANGE);
# replays per measurement; bytes written to evict L2 before each call.
GRAPH_TARGET_US = 2000.0
REPS_RANGE = (3, 50)
GRAPH_REPLAYS = 9
FLUSH_BYTES = 128 << 20


def graph_us(fn, flush, reps_range=REPS_RANGE, replays=GRAPH_REPLAYS) -> float:
    """GPU microseconds per call of ``fn`` (see the module docstring).

    ``flush`` evicts L2; it runs before every call in the timed graph and
    alone in the baseline graph, whose time is subtracted.
    """
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, pointer caches) off the graph
        for _ in range(2):
            flush()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    guess = max(start.elapsed_time(end) * 1e3, 1.0)
    reps = int(min(max(GRAPH_TARGET_US / guess, reps_range[0]), reps_range[1]))

    def capture(body):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                body()
        return g

    with_fn = capture(lambda: (flush(), fn()))
    alone = capture(flush)
    with_fn.replay()
    alone.replay()
    times: dict[str, list[float]] = {"with": [], "alone": []}
    for _ in range(replays):
        for key, g in (("with", with_fn), ("alone", alone)):
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize()
            times[key].append(start.elapsed_time(end))
    del with_fn, alone
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return max(0.0, 1e3 * (med["with"] - med["alone"]) / reps)


def make_flush():
    import torch

    buf = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    return buf.zero_


def kernel_us(fn, flush, calls: int = 10) -> dict[str, float]:
    """GPU microseconds per call of each kernel ``fn`` launches (eager calls
    under ``torch.profiler``, L2 evicted before each; the eviction's own
    kernel left out): which of a module's launches takes the time. Launch
    with programmatic dependent launch off, or a kernel's time includes its
    wait for the one before it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        flush()
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            flush()
            fn()
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as alone:
        flush()
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    flush_names = {e.name for e in alone.events() if e.device_type == cuda}
    total: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == cuda and e.name not in flush_names:
            total[e.name] = total.get(e.name, 0.0) + e.time_range.elapsed_us()
    return {name: us / calls for name, us in sorted(total.items(), key=lambda kv: -kv[1])}
