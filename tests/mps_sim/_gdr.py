"""Shared inputs and checks of the gated-delta-rule simulator tests (tests/mps_sim/test_mps_gated_delta_*.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Three sequences: a partial second chunk (70 = 64 + 6), an empty one, a partial one of 60.
CU = [0, 70, 70, 130]


def cu_tensor(offsets):
    return None if offsets is None else torch.tensor(offsets)


def entry_inputs(B, T, H, HV, K, V, dtype, l2, seed, initial_state=True, cu_seqlens=None) -> dict:
    """Arguments of the entry ops (chunk_/fused_recurrent_gated_delta_rule) from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    if not l2:
        # Unit-size keys keep the delta rule contractive (|beta k k^T| <= 1) without the l2 norm.
        k = k * K**-0.5
    return dict(
        q=q.to(dtype), k=k.to(dtype), v=torch.randn(B, T, HV, V, generator=gen).to(dtype),
        g=F.logsigmoid(torch.randn(B, T, HV, generator=gen) + 2.0),
        beta=torch.rand(B, T, HV, generator=gen),
        initial_state=torch.randn(N, HV, K, V, generator=gen) if initial_state else None,
        cu_seqlens=None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32),
        use_qk_l2norm_in_kernel=l2,
    )


def assert_allclose_written(name, ref, out, rtol, atol):
    """``out`` has ref's shape and dtype, no unwritten (NaN-poisoned) element, and is allclose to ``ref``."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, name
    assert not out.isnan().any(), f"{name}: unwritten (NaN) elements"
    err = (out - ref).abs().max().item()
    assert torch.allclose(out, ref, rtol=rtol, atol=atol), f"{name}: max abs error {err:.3e}"


def assert_plan_rejects_like_the_cpu_op(op: str, kwargs: dict) -> None:
    """The MPS plan of ``op`` fails with exactly the CPU op's ValueError text and carries nothing else."""
    import pytest

    import _plans

    with pytest.raises(ValueError) as exc:
        getattr(torch.ops.tq, op)(**kwargs)
    p = _plans.plan(op, **kwargs)
    assert p["error"] == str(exc.value)
    assert p["launches"] == [] and p["outputs"] == [] and p["scratch_bytes"] == []
