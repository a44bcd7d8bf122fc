"""Helpers for ``vllm serve`` processes started by tests and benchmarks."""

from __future__ import annotations

import subprocess
import time
import urllib.request


def wait_healthy(proc: subprocess.Popen, base_url: str, timeout: float) -> float:
    """Poll ``base_url/health`` until it answers 200; return the seconds waited.

    Raises RuntimeError if ``proc`` exits first, TimeoutError after ``timeout``.
    """
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {proc.returncode} during start-up")
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=2) as r:
                if r.status == 200:
                    return time.time() - start
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"vllm serve was not healthy within {timeout:.0f} s")
