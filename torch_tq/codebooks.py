"""Lloyd–Max codebooks for the standard normal distribution, computed in float64 (DESIGN §5).

A rotated, normalised coordinate ``u = y * sqrt(R) / ||y||`` is close to N(0, 1), so the optimal
scalar quantizer with 2^b levels is the Lloyd–Max quantizer of N(0, 1). We compute it instead of
copying tables: Lloyd's iteration (exact Gaussian cell moments) from the companding start, then a
Newton polish on the fixed-point equations, which converges in a few steps even for 8 bits where
plain Lloyd needs hundreds of thousands of iterations.

This module is the only source of centroids in the project.
"""

from __future__ import annotations

import functools
import math

import torch

from .layout import SUPPORTED_BITS, num_levels

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _pdf(t: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * t * t) * _INV_SQRT_2PI


def _cell_mass(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """P(lo < X < hi) for X ~ N(0,1), accurate in both tails (difference of upper-tail masses)."""
    q = lambda t: 0.5 * torch.special.erfc(t / _SQRT2)  # noqa: E731  (upper tail P(X > t))
    upper = q(lo) - q(hi)
    lower = q(-hi) - q(-lo)
    return torch.where(lo >= 0, upper, torch.where(hi <= 0, lower, 1.0 - q(hi) - q(-lo)))


def _boundaries(centroids: torch.Tensor) -> torch.Tensor:
    """Cell edges [-inf, midpoints..., +inf] for sorted centroids."""
    inf = torch.tensor([math.inf], dtype=centroids.dtype)
    return torch.cat([-inf, 0.5 * (centroids[1:] + centroids[:-1]), inf])


def lloyd_update(centroids: torch.Tensor) -> torch.Tensor:
    """One Lloyd step: the conditional mean of N(0,1) over each nearest-neighbour cell."""
    t = _boundaries(centroids)
    lo, hi = t[:-1], t[1:]
    mass = _cell_mass(lo, hi)
    first_moment = _pdf(lo) - _pdf(hi)
    return first_moment / mass


def _newton_step(c: torch.Tensor) -> torch.Tensor:
    """Newton step on F(c) = c - lloyd_update(c) = 0 (tridiagonal Jacobian, solved densely)."""
    t = _boundaries(c)
    lo, hi = t[:-1], t[1:]
    mass = _cell_mass(lo, hi)
    g = (_pdf(lo) - _pdf(hi)) / mass
    # d g_i / d lo_i and d g_i / d hi_i; the infinite outer edges contribute nothing.
    d_lo = torch.where(torch.isfinite(lo), _pdf(lo) * (g - lo) / mass, torch.zeros_like(lo))
    d_hi = torch.where(torch.isfinite(hi), _pdf(hi) * (hi - g) / mass, torch.zeros_like(hi))
    n = c.numel()
    jac = torch.eye(n, dtype=c.dtype)
    idx = torch.arange(n)
    # lo_i = (c_{i-1} + c_i) / 2 and hi_i = (c_i + c_{i+1}) / 2.
    jac[idx, idx] -= 0.5 * (d_lo + d_hi)
    jac[idx[1:], idx[:-1]] -= 0.5 * d_lo[1:]
    jac[idx[:-1], idx[1:]] -= 0.5 * d_hi[:-1]
    return c - torch.linalg.solve(jac, c - g)


@functools.lru_cache(maxsize=None)
def _lloyd_max_float64(bits: int) -> torch.Tensor:
    levels = num_levels(bits)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    c = normal.icdf((torch.arange(levels, dtype=torch.float64) + 0.5) / levels) * math.sqrt(3.0)
    # Lloyd iterations bring the companding start into Newton's basin; Newton then converges quadratically.
    for _ in range(200):
        c = lloyd_update(c)
    for _ in range(50):
        c_next = _newton_step(c)
        step = (c_next - c).abs().max().item()
        c = c_next
        if step < 1e-15:
            break
    residual = (c - lloyd_update(c)).abs().max().item()
    if not residual < 1e-12:
        raise RuntimeError(f"tq.codebook: Lloyd–Max solver did not converge for bits={bits} (residual {residual:.3e})")
    # Exact symmetry: average the two halves so that c[L-1-i] == -c[i] bit for bit.
    c = 0.5 * (c - c.flip(0))
    c.requires_grad_(False)
    return c


def lloyd_max_codebook(bits: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The 2^bits sorted centroids of the Lloyd–Max quantizer of N(0, 1).

    Args:
        bits (int): one of 2, 3, 4, 5, 6, 8.
        dtype (torch.dtype): dtype of the returned tensor. Default: ``torch.float32``.
    Returns:
        ``[2^bits]`` tensor, ascending, symmetric about 0.
    """
    if bits not in SUPPORTED_BITS and bits != 1:
        raise ValueError(f"tq.lloyd_max_codebook: bits must be one of {SUPPORTED_BITS}, got {bits}")
    return _lloyd_max_float64(bits).to(dtype=dtype, device=device)


def decision_boundaries(bits: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The 2^bits - 1 midpoints between consecutive centroids (nearest-centroid thresholds)."""
    c = _lloyd_max_float64(bits)
    return (0.5 * (c[1:] + c[:-1])).to(dtype=dtype, device=device)


def expected_mse(bits: int) -> float:
    """E[(X - Q(X))^2] for X ~ N(0,1): the per-coordinate distortion of the codebook, exact integral."""
    c = _lloyd_max_float64(bits)
    t = _boundaries(c)
    lo, hi = t[:-1], t[1:]
    mass = _cell_mass(lo, hi)
    # E[X^2 ; cell] = mass + lo*pdf(lo) - hi*pdf(hi) (with t*pdf(t) = 0 at ±inf).
    lo_term = torch.where(torch.isfinite(lo), lo * _pdf(lo), torch.zeros_like(lo))
    hi_term = torch.where(torch.isfinite(hi), hi * _pdf(hi), torch.zeros_like(hi))
    second = mass + lo_term - hi_term
    first = _pdf(lo) - _pdf(hi)
    return float((second - 2 * c * first + c * c * mass).sum())
