"""TQ_SIM_FP_CONTRACT (mps_ops/sim/README.md, "Floating point"): off by default, each product rounds;
`fast` fuses a * b + c into one fma, as Apple's Metal compiler does."""

from pathlib import Path

import pytest
import torch

import msl_sim

KERNEL = Path(__file__).resolve().parent / "kernels" / "contract.metal"
INCLUDES = [Path(__file__).resolve().parents[2] / "mps_ops" / "kernels"]


@pytest.mark.parametrize("mode, expected", [("off", 0.0), ("fast", 2.0**-24)])
def test_contraction_mode_decides_whether_a_product_rounds_before_the_add(monkeypatch, mode, expected):
    monkeypatch.setenv("TQ_SIM_FP_CONTRACT", mode)
    lib = msl_sim.compile_library([KERNEL], include_dirs=INCLUDES)
    a = 1.0 + 2.0**-12
    # a * a = 1 + 2^-11 + 2^-24 exactly; rounded to float32 it is 1 + 2^-11 (a tie, to even).
    x = torch.tensor([a, a, -(1.0 + 2.0**-11)], dtype=torch.float32)
    out = torch.full((1,), float("nan"))
    lib.launch("mul_add", grid=1, threadgroup=1, buffers={0: x, 1: out})
    assert out.item() == expected


def test_unknown_contraction_mode_is_refused(monkeypatch):
    monkeypatch.setenv("TQ_SIM_FP_CONTRACT", "on")
    with pytest.raises(msl_sim.CompileError, match="TQ_SIM_FP_CONTRACT must be 'off' or 'fast'"):
        msl_sim.compile_library([KERNEL], include_dirs=INCLUDES)
