"""The CUDA entry ops of the gated delta rule call FLA with FLA's own argument conventions.

FLA's kernels need a GPU, so these tests run the CUDA kernel functions on CPU tensors against a
stand-in module with FLA 0.6.0's exact signatures (``fla.ops.gated_delta_rule``), computing with
the reference: they check the argument mapping (FLA's fused_recurrent takes ``g, gk, gv, beta``
positionally), the dtype of ``o`` and the schema's empty final state. The real FLA is compared on
a GPU by ``benchmarks/gated_delta.py --device cuda``.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from torch_tq.backends.cpu import gated_delta_rule as reference
from torch_tq.backends.cuda import gated_delta_rule as cuda_gdr
from torch_tq.backends.cuda import gated_delta_torch


def _fake_fla(calls: list) -> types.SimpleNamespace:
    def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
                               state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None, chunk_indices=None,
                               cp_context=None, **kwargs):
        calls.append(("chunk", cu_seqlens))
        o, s = reference.chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                                                use_qk_l2norm_in_kernel, cu_seqlens)
        return o.to(v.dtype), (s if output_final_state else None)

    def fused_recurrent_gated_delta_rule(q, k, v, g=None, gk=None, gv=None, beta=None, scale=None, initial_state=None,
                                         output_final_state=False, use_qk_l2norm_in_kernel=False,
                                         use_gate_in_kernel=False, A_log=None, dt_bias=None,
                                         use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
                                         state_v_first=False, cu_seqlens=None, **kwargs):
        assert gk is None and gv is None and beta is not None, "beta must be passed by keyword"
        calls.append(("recurrent", cu_seqlens))
        o, s = reference.fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                                                          use_qk_l2norm_in_kernel, cu_seqlens)
        return o.to(v.dtype), (s if output_final_state else None)

    return types.SimpleNamespace(chunk_gated_delta_rule=chunk_gated_delta_rule,
                                 fused_recurrent_gated_delta_rule=fused_recurrent_gated_delta_rule)


def _inputs(T=70, H=2, HV=4, K=64, V=64, dtype=torch.float32):
    q, k = torch.randn(1, T, H, K, dtype=dtype), torch.randn(1, T, H, K, dtype=dtype)
    v = torch.randn(1, T, HV, V, dtype=dtype)
    g = F.logsigmoid(torch.randn(1, T, HV)).to(dtype)
    beta = torch.rand(1, T, HV).to(dtype)
    return q, k, v, g, beta


@pytest.mark.parametrize("op", ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"])
@pytest.mark.parametrize("final", [True, False])
def test_fla_is_called_with_its_own_conventions(monkeypatch, op, final):
    calls = []
    monkeypatch.setattr(cuda_gdr, "_use_fla", lambda: True)
    monkeypatch.setattr(cuda_gdr, "_fla_ops", lambda: _fake_fla(calls))
    q, k, v, g, beta = _inputs()
    h0 = torch.randn(2, 4, 64, 64)
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    o, state = getattr(cuda_gdr, op)(q, k, v, g, beta, 0.3, h0, final, True, cu)
    o_ref, state_ref = getattr(reference, op)(q, k, v, g, beta, 0.3, h0, final, True, cu)
    assert len(calls) == 1 and calls[0][1].dtype == torch.long
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    assert o.dtype == q.dtype
    if final:
        torch.testing.assert_close(state, state_ref, rtol=0, atol=0)
    else:
        assert state.shape == (0, 4, 64, 64) and state.dtype == torch.float32


def test_without_fla_the_gpu_shaped_torch_path_runs(monkeypatch):
    # Its correctness against the reference is tests/test_gated_delta_torch.py's.
    monkeypatch.setattr(cuda_gdr, "_use_fla", lambda: False)
    monkeypatch.setattr(cuda_gdr, "_fla_ops", lambda: pytest.fail("FLA must not be called"))
    q, k, v, g, beta = _inputs(T=5)
    o, _ = cuda_gdr.fused_recurrent_gated_delta_rule(q, k, v, g, beta)
    torch.testing.assert_close(o, gated_delta_torch.fused_recurrent_gated_delta_rule(q, k, v, g, beta)[0], rtol=0, atol=0)


def test_bad_input_is_rejected_before_fla(monkeypatch):
    monkeypatch.setattr(cuda_gdr, "_use_fla", lambda: True)
    monkeypatch.setattr(cuda_gdr, "_fla_ops", lambda: pytest.fail("FLA must not see bad input"))
    q, k, v, g, beta = _inputs()
    with pytest.raises(ValueError, match="beta"):
        cuda_gdr.chunk_gated_delta_rule(q, k, v, g, beta[..., :1])


def test_the_cuda_kernels_are_registered():
    for op in ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tq::{op}", "CUDA"), op
