"""Timing shared by the benchmark scripts: warm up once, then the median of ``repeats`` runs."""

import statistics
import time


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
