"""The one place the MPS tests touch the simulator's API (mps_ops/sim/msl_sim.py)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "mps_ops" / "kernels"
sys.path.insert(0, str(ROOT / "mps_ops" / "sim"))

import msl_sim  # noqa: E402

@functools.lru_cache(maxsize=None)
def library(source: Path) -> "msl_sim.Library":
    """The simulator library of one shipped .metal file (compiled once per content hash)."""
    return msl_sim.compile_library([source], include_dirs=[KERNELS])


def launch_kernel(source: Path, kernel: str, grid, threads, buffers: list) -> "msl_sim.LaunchStats":
    """Run ``kernel`` with ``buffers[n]`` bound at [[buffer(n)]]; returns the launch's byte counts."""
    return library(Path(source)).launch(kernel, grid=grid, threadgroup=threads,
                                        buffers={n: b for n, b in enumerate(buffers)})

