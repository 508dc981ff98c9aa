"""Shared assertions: FLA-style relative RMS error with an absolute floor, tolerances per dtype."""

from __future__ import annotations

import torch

# Relative RMS error allowed for an output computed in (or rounded to) each dtype.
RMS_RATIO = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float, atol: float = 1e-6) -> None:
    """Assert ``rms(out - ref) <= ratio * rms(ref) + atol`` and that ``out`` has no NaN/Inf where ``ref`` is finite."""
    ref64, out64 = ref.double(), out.double()
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out64).all(), f"{name}: output has non-finite values (unwritten elements?)"
    err = (out64 - ref64).pow(2).mean().sqrt().item()
    base = ref64.pow(2).mean().sqrt().item()
    assert err <= ratio * base + atol, f"{name}: rms error {err:.3e} > {ratio:.1e} * rms(ref) {base:.3e} + {atol:.0e}"
