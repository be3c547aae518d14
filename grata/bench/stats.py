"""Timing statistics: percentiles, summaries and the measuring loop."""

from __future__ import annotations

import math
import time


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between order statistics,
    as numpy's default ('linear') method."""
    v = sorted(float(x) for x in values)
    if not v:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    pos = (len(v) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(times_s) -> dict:
    """Statistics of per-call durations in seconds, reported in milliseconds."""
    t = [float(x) for x in times_s]
    if not t:
        return {"n": 0, "min_ms": None, "mean_ms": None, "median_ms": None, "p90_ms": None,
                "p99_ms": None, "max_ms": None, "std_ms": None, "throughput_per_s": None,
                "total_s": 0.0}
    mean = sum(t) / len(t)
    std = math.sqrt(sum((x - mean) ** 2 for x in t) / len(t))
    return {"n": len(t), "min_ms": 1e3 * min(t), "mean_ms": 1e3 * mean,
            "median_ms": 1e3 * percentile(t, 50), "p90_ms": 1e3 * percentile(t, 90),
            "p99_ms": 1e3 * percentile(t, 99), "max_ms": 1e3 * max(t), "std_ms": 1e3 * std,
            "throughput_per_s": 1.0 / mean if mean > 0 else None, "total_s": sum(t)}


def measure(fn, warmup: int = 3, iterations: int | None = 20, duration: float | None = None,
            clock=time.perf_counter, sync=None) -> list[float]:
    """Call fn `warmup` times untimed, then time it `iterations` times, or for at least
    `duration` seconds (at least once) when given. `sync` (e.g. a device synchronise)
    runs inside the timed region after each call. Returns the durations in seconds."""
    if iterations is None and duration is None:
        raise ValueError("give iterations or a duration")
    for _ in range(max(0, warmup)):
        fn()
        if sync is not None:
            sync()
    times: list[float] = []
    spent = 0.0
    while True:
        if duration is None and len(times) >= iterations:
            break
        if duration is not None and times and spent >= duration:
            break
        t0 = clock()
        fn()
        if sync is not None:
            sync()
        dt = clock() - t0
        times.append(dt)
        spent += dt
    return times

