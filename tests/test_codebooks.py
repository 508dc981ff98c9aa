"""Codebooks: Lloyd fixed points, the published Lloyd–Max values, and the distortion TurboQuant achieves."""

import math

import pytest
import torch

import torch_tq
from torch_tq.codebooks import expected_mse, lloyd_max_codebook

SQRT2 = math.sqrt(2.0)


def _phi(t):
    return 0.0 if math.isinf(t) else math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)


def _upper_tail(t):
    return 0.5 * math.erfc(t / SQRT2)


def _cells(c):
    edges = [-math.inf] + [(a + b) / 2 for a, b in zip(c[:-1], c[1:])] + [math.inf]
    return list(zip(edges[:-1], edges[1:]))


def _centroid_condition(c):
    """max |c_i - E[X | X in cell_i]| for X ~ N(0,1), computed with math.erfc only."""
    worst = 0.0
    for ci, (lo, hi) in zip(c, _cells(c)):
        mass = _upper_tail(lo) - _upper_tail(hi) if lo >= 0 else (_upper_tail(-hi) - _upper_tail(-lo) if hi <= 0 else 1 - _upper_tail(hi) - _upper_tail(-lo))
        mean = (_phi(lo) - _phi(hi)) / mass
        worst = max(worst, abs(ci - mean))
    return worst


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_codebook_is_lloyd_fixed_point(bits):
    c = lloyd_max_codebook(bits, torch.float64).tolist()
    assert len(c) == 2**bits
    assert all(a < b for a, b in zip(c[:-1], c[1:])), "centroids must be strictly ascending"
    assert all(a == -b for a, b in zip(c, reversed(c))), "centroids must be exactly symmetric"
    assert _centroid_condition(c) < 1e-10


# DESIGN §5 (Lloyd–Max quantizer of N(0,1)).
PUBLISHED = {
    2: [0.4527800, 1.5104176],
    4: [0.1283950, 0.3880483, 0.6567591, 0.9423405, 1.2562312, 1.6180464, 2.0690172, 2.7325896],
}
PUBLISHED_OUTERMOST = {5: 3.2607325, 6: 3.7441013}
PUBLISHED_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


@pytest.mark.parametrize("bits", sorted(PUBLISHED))
def test_codebook_matches_published_values(bits):
    positive = lloyd_max_codebook(bits, torch.float64)[2 ** (bits - 1):]
    torch.testing.assert_close(positive, torch.tensor(PUBLISHED[bits], dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", sorted(PUBLISHED_OUTERMOST))
def test_codebook_outermost_centroid(bits):
    assert abs(lloyd_max_codebook(bits, torch.float64)[-1].item() - PUBLISHED_OUTERMOST[bits]) < 1e-6


@pytest.mark.parametrize("bits", sorted(PUBLISHED_MSE))
def test_expected_mse_matches_published(bits):
    assert expected_mse(bits) == pytest.approx(PUBLISHED_MSE[bits], rel=1e-3)


def _monte_carlo_mse(bits, n=400_000):
    x = torch.randn(n, dtype=torch.float64)
    c = lloyd_max_codebook(bits, torch.float64)
    q = c[(x[:, None] - c).abs().argmin(dim=1)]
    return (x - q).pow(2).mean().item()


@pytest.mark.parametrize("bits", [5, 6, 8])
def test_expected_mse_matches_monte_carlo(bits):
    # No published number for these widths: check the exact integral against sampling instead.
    assert expected_mse(bits) == pytest.approx(_monte_carlo_mse(bits), rel=1.5e-2)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_turboquant_mse_on_unit_vectors(bits):
    """Measured ||x - x̂||² of random unit vectors within 2% of the Lloyd–Max Gaussian distortion.

    D = 256 (one full rotation block): coordinates of a rotated unit vector are Beta-distributed,
    with slightly lighter tails than N(0,1), so the measured value sits ~1% below the Gaussian one.
    """
    D, N = 256, 8192
    x = torch.randn(N, 1, 1, D)
    x = x / x.norm(dim=-1, keepdim=True)
    codes, norms = torch_tq.allocate_quantized_kv(N, 1, 1, D, bits)
    signs = torch_tq.hadamard_signs(D)
    torch_tq.hadamard_quantize_kv(x, codes, norms, 0, bits=bits, signs=signs)
    x_hat = torch_tq.dequantize_kv(codes, norms, 0, 1, bits=bits, signs=signs)[:, 0, 0]
    mse = (x_hat.double() - x[:, 0, 0].double()).pow(2).sum(-1).mean().item()
    assert mse == pytest.approx(expected_mse(bits), rel=0.02)
