"""The figures of one measurement (one system, one trace), the same in both modes.

Times are seconds. ``ttft`` is first-token latency: from the request's arrival
(offline: when the whole trace was handed to the engine; online: its trace
arrival time) to its first generated token. ``latency`` is arrival to last
token. Throughput counts finished requests over the wall time of the
measurement.
"""

from __future__ import annotations

import math


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default), ``q`` in [0, 100]."""
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(*, requests: int, elapsed_s: float, ttft: list[float], latency: list[float],
              output_tokens: int, input_tokens: int, status: str, slo_ttft_s: float,
              note: str | None = None) -> dict:
    """``ttft`` and ``latency``: one entry per finished request."""
    finished = len(latency)
    mean = (lambda xs: sum(xs) / len(xs) if xs else None)
    valid_ttft = [t for t in ttft if t is not None and not math.isnan(t)]
    return {
        "status": status,
        "note": note,
        "requests": requests,
        "finished": finished,
        "elapsed_s": round(elapsed_s, 3),
        "req_per_s": finished / elapsed_s if elapsed_s > 0 else None,
        "output_tok_per_s": output_tokens / elapsed_s if elapsed_s > 0 else None,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "ttft_p50_s": percentile(valid_ttft, 50),
        "ttft_p90_s": percentile(valid_ttft, 90),
        "ttft_p99_s": percentile(valid_ttft, 99),
        "ttft_mean_s": mean(valid_ttft),
        "latency_mean_s": mean(latency),
        # Unfinished requests count as misses.
        "slo_attainment": sum(t <= slo_ttft_s for t in valid_ttft) / requests,
        "ttft_s": [round(t, 4) for t in valid_ttft],
    }


def not_run(status: str, requests: int, note: str | None = None) -> dict:
    """A measurement that did not happen (failed, skipped, too slow)."""
    return {"status": status, "note": note, "requests": requests, "finished": 0}


def steady_state(samples: list[tuple[float, float, float, float]]) -> dict:
    """Batch occupancy from (time, running, waiting, generated tokens) samples.

    The steady window runs from the first sample by which the point has
    generated (since its first sample: vLLM's counter runs over the
    engine's life) as many tokens as its fullest batch ran requests (the
    first wave is prefilled and decoding) to the last one with a non-empty waiting
    queue: the scheduler had more work than it could run, so the batch was
    as full as memory and ``max_num_seqs`` allow. Its throughput is
    generated tokens over that window. The start-up ramp stays out of it for
    every system alike: filling the first batch (base: about a second of
    prefills) and, for adapters, paging in the first wave's adapters all at
    once (n = 2000: about 250 adapters, several seconds), which a server
    under steady load pays once, not per second.
    """
    if len(samples) < 2:
        return {"mean_running": None, "waiting_share": None, "steady_s": None,
                "steady_tok_per_s": None}
    running = [s[1] for s in samples]
    queued = [i for i, s in enumerate(samples) if s[2] > 0]
    out = {"mean_running": sum(running) / len(running),
           "waiting_share": len(queued) / len(samples), "steady_s": None, "steady_tok_per_s": None}
    window = steady_window(samples)
    if window is not None:
        t0, t1 = samples[window[0]], samples[window[1]]
        out["steady_s"] = round(t1[0] - t0[0], 2)
        out["steady_tok_per_s"] = (t1[3] - t0[3]) / (t1[0] - t0[0])
    return out


def steady_window(samples: list[tuple[float, float, float, float]]) -> tuple[int, int] | None:
    """Indices of the first and last sample of ``steady_state``'s window."""
    if len(samples) < 2:
        return None
    queued = [i for i, s in enumerate(samples) if s[2] > 0]
    fullest = max(s[1] for s in samples)
    # vLLM's token counter runs over the engine's life: count from the point's first sample.
    base = samples[0][3]
    first = next((i for i, s in enumerate(samples) if s[3] - base >= max(fullest, 1)), None)
    if queued and first is not None and queued[-1] > first and samples[queued[-1]][0] > samples[first][0]:
        return first, queued[-1]
    return None
