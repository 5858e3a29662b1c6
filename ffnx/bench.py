"""Latency measurement shared by `ffnx bench` and benchmarks/: warmup, then timed calls.

Latency is wall-clock per call (time.perf_counter); peak RSS is the process's high-water mark
(ru_maxrss) after the run. Torch comparisons run in the same process and invocation, same
inputs and thread count, so ratios are side by side.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable

import numpy as np


def peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def measure(
    fn: Callable[[], object],
    iters: int | None = None,
    seconds: float | None = None,
    warmup: int = 10,
    tick: Callable[[float], None] | None = None,
) -> dict:
    """Call `fn` `warmup` times, then `iters` times (or for `seconds`); latency stats in ms.

    `tick(fraction_done)` is called after each timed call (progress bars).
    """
    if iters is None and seconds is None:
        iters = 100
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        done = len(times) / iters if iters else elapsed / seconds
        if tick:
            tick(min(done, 1.0))
        if done >= 1.0:
            break
    return stats_ms(times)


def stats_ms(times_s: list[float]) -> dict:
    ms = np.asarray(times_s) * 1e3
    return {
        "iters": int(ms.size),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
    }


def throughput(stats: dict, items_per_call: int) -> float:
    """Items (samples or tokens) per second at the median latency."""
    return items_per_call / (stats["p50_ms"] / 1e3) if stats["p50_ms"] > 0 else float("inf")
