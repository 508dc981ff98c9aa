"""Shared by the benchmark scripts: the median of ``repeats`` warm runs, and the CPU name for the report header."""

import platform
import statistics
import time


def median_ms(fn, repeats: int, device=None) -> float:
    """Median wall time of ``fn()`` in ms; on a CUDA ``device`` each run ends with a synchronize."""
    import torch

    sync = torch.cuda.synchronize if device is not None and torch.device(device).type == "cuda" else (lambda: None)
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
