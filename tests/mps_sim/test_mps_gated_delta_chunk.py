"""tq.recompute_w_u, tq.chunk_fwd_h and tq.chunk_fwd_o through their plans and the MSL simulator,
against the CPU reference.

Inputs are what the pipeline feeds these stages: l2-normalised random q/k, log-sigmoid gates summed by
the CPU chunk_local_cumsum, A from the CPU kkt + solve_tril, w/u and h/v_new from the CPU stages.
Tolerances: the kernels read the same float32 values as the CPU reference (float16/bfloat16 q/k/v
convert to float32 exactly on both sides), so only the float32 summation order differs (64-term
products per chunk, K-term products per state row, a state carried over <= 3 chunks): float32
tolerances for every input dtype.

The simulator runs every 8x8 simdgroup_matrix product lane by lane, so the cases keep T <= 130, one or
two value heads (four for GVA with H = 2, where key head hv // 2 differs from hv % H), and the
256-wide dims at T <= 65.
"""

import pytest
import torch
import torch.nn.functional as F

import _plans
from _gdr import CU, assert_allclose_written, assert_plan_rejects_like_the_cpu_op, cu_tensor
from _sim_adapter import library
from torch_tq.backends.cpu import gated_delta_rule as cpu_gdr

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
BT = 64



def _inputs(B, T, H, HV, K, V, offsets=None, dtype=F32, v_dtype=None):
    """Realistic stage inputs, produced by the CPU stage ops from the (already converted) q/k/v."""
    cu = cu_tensor(offsets)
    q = cpu_gdr.l2norm(torch.randn(B, T, H, K)).to(dtype)
    k = cpu_gdr.l2norm(torch.randn(B, T, H, K)).to(dtype)
    v = torch.randn(B, T, HV, V).to(v_dtype or dtype)
    raw_g = F.logsigmoid(torch.randn(B, T, HV) + 2.0)
    g = torch.ops.tq.chunk_local_cumsum(raw_g, cu_seqlens=cu)
    beta = torch.rand(B, T, HV)
    A = torch.ops.tq.solve_tril(torch.ops.tq.chunk_scaled_dot_kkt(k, g, beta, cu), cu)
    return dict(q=q, k=k, v=v, g=g, raw_g=raw_g, beta=beta, A=A, cu_seqlens=cu)


def _state(N, HV, K, V):
    return torch.randn(N, HV, K, V) * 0.1



# ---- recompute_w_u -------------------------------------------------------------------------------

# id, B, T, H, HV, K, V, offsets, k/q dtype, v dtype
WU_CASES = [
    ("T1-B2-K64-V128", 2, 1, 1, 2, 64, 128, None, F32, F32),
    ("T64-K128-fp16", 1, 64, 1, 2, 128, 64, None, F16, F16),
    ("T65-K256-bf16", 1, 65, 1, 2, 256, 64, None, BF16, BF16),
    ("T130-V256-varlen", 1, 130, 1, 2, 64, 256, CU, F32, F32),
    ("T65-H2-HV4-k-fp16-v-fp32", 1, 65, 2, 4, 64, 64, None, F16, F32),
]


@pytest.mark.parametrize("case", WU_CASES, ids=[c[0] for c in WU_CASES])
def test_recompute_w_u(case):
    _, B, T, H, HV, K, V, offsets, dtype, v_dtype = case
    x = _inputs(B, T, H, HV, K, V, offsets, dtype, v_dtype)
    kwargs = dict(k=x["k"], v=x["v"], beta=x["beta"], A=x["A"], g=x["g"], cu_seqlens=x["cu_seqlens"])
    w_ref, u_ref = torch.ops.tq.recompute_w_u(**kwargs)
    w, u = _plans.run("recompute_w_u", **kwargs)
    assert_allclose_written("w", w_ref, w, rtol=1e-5, atol=1e-6)
    assert_allclose_written("u", u_ref, u, rtol=1e-5, atol=1e-5)


def test_recompute_w_u_reads_only_the_lower_triangle_of_A():
    """NaN above A's diagonal (the reference's tril() drops it) and float16 beta/A/g (read as float32)."""
    x = _inputs(1, 70, 1, 2, 64, 64)
    A = x["A"].clone()
    upper = torch.ones(BT, BT, dtype=torch.bool).triu(1)
    for s, L in ((0, 64), (64, 6)):
        block = A[0, s:s + L].transpose(0, 1)  # [HV, L, 64] view
        block[:, upper[:L]] = float("nan")
    kwargs = dict(k=x["k"], v=x["v"], beta=x["beta"].half(), A=A.half(), g=x["g"].half())
    w_ref, u_ref = torch.ops.tq.recompute_w_u(**kwargs)
    w, u = _plans.run("recompute_w_u", **kwargs)
    assert_allclose_written("w", w_ref, w, rtol=1e-5, atol=1e-6)
    assert_allclose_written("u", u_ref, u, rtol=1e-5, atol=1e-5)


# ---- chunk_fwd_h ---------------------------------------------------------------------------------

# id, B, T, H, HV, K, V, offsets, k dtype, initial state
H_CASES = [
    ("T1-B2-init", 2, 1, 1, 2, 64, 64, None, F32, True),
    ("T64-K128-fp16", 1, 64, 1, 2, 128, 64, None, F16, False),
    ("T65-K256", 1, 65, 1, 2, 256, 64, None, F32, True),
    ("T65-V256-bf16", 1, 65, 1, 1, 64, 256, None, BF16, False),
    ("T64-H2-HV4-V128", 1, 64, 2, 4, 64, 128, None, F32, True),
    ("T130-varlen-bf16-init", 1, 130, 1, 2, 64, 64, CU, BF16, True),
    ("T130-B2", 2, 130, 1, 1, 64, 64, None, F32, False),
]


def _h_inputs(B, T, H, HV, K, V, offsets, dtype, init):
    x = _inputs(B, T, H, HV, K, V, offsets, dtype)
    w, u = torch.ops.tq.recompute_w_u(x["k"], x["v"], x["beta"], x["A"], x["g"], x["cu_seqlens"])
    N = B if offsets is None else len(offsets) - 1
    return x, dict(k=x["k"], w=w, u=u, g=x["g"], initial_state=_state(N, HV, K, V) if init else None,
                   cu_seqlens=x["cu_seqlens"])


@pytest.mark.parametrize("case", H_CASES, ids=[c[0] for c in H_CASES])
def test_chunk_fwd_h(case):
    _, B, T, H, HV, K, V, offsets, dtype, init = case
    _, kwargs = _h_inputs(B, T, H, HV, K, V, offsets, dtype, init)
    h_ref, v_new_ref, final_ref = torch.ops.tq.chunk_fwd_h(**kwargs)
    h, v_new, final = _plans.run("chunk_fwd_h", **kwargs)
    assert_allclose_written("h", h_ref, h, rtol=1e-5, atol=1e-5)
    assert_allclose_written("v_new", v_new_ref, v_new, rtol=1e-5, atol=1e-5)
    assert_allclose_written("final_state", final_ref, final, rtol=1e-5, atol=1e-5)
    if offsets is not None and init:
        # The empty sequence has no chunk: its final state is its initial state, bit for bit.
        assert torch.equal(final[1], kwargs["initial_state"][1])


def test_chunk_fwd_h_without_tokens_returns_the_initial_state():
    """T = 0: no chunk, h and v_new are empty, the final state is the initial state (zeros without it)."""
    k, w, u, g = torch.randn(2, 0, 1, 64), torch.randn(2, 0, 2, 64), torch.randn(2, 0, 2, 64), torch.randn(2, 0, 2)
    h0 = _state(2, 2, 64, 64)
    h, v_new, final = _plans.run("chunk_fwd_h", k=k, w=w, u=u, g=g, initial_state=h0)
    assert h.shape == (2, 0, 2, 64, 64) and v_new.shape == (2, 0, 2, 64)
    assert torch.equal(final, h0)
    assert torch.equal(_plans.run("chunk_fwd_h", k=k, w=w, u=u, g=g)[2], torch.zeros(2, 2, 64, 64))


# ---- chunk_fwd_o ---------------------------------------------------------------------------------

# id, B, T, H, HV, K, V, offsets, q/k dtype, scale
O_CASES = [
    ("T1-B2-V256", 2, 1, 1, 2, 64, 256, None, F32, None),
    ("T64-K128-fp16", 1, 64, 1, 2, 128, 64, None, F16, None),
    ("T65-K256-bf16-scale", 1, 65, 1, 2, 256, 64, None, BF16, 0.3),
    ("T64-H2-HV4-V128", 1, 64, 2, 4, 64, 128, None, F32, None),
    ("T130-varlen", 1, 130, 1, 2, 64, 64, CU, F32, 1.5),
]


def _o_inputs(B, T, H, HV, K, V, offsets, dtype):
    x, hk = _h_inputs(B, T, H, HV, K, V, offsets, dtype, init=True)
    h, v_new, _ = torch.ops.tq.chunk_fwd_h(**hk)
    return dict(q=x["q"], k=x["k"], v=v_new, h=h, g=x["g"], cu_seqlens=x["cu_seqlens"])


@pytest.mark.parametrize("case", O_CASES, ids=[c[0] for c in O_CASES])
def test_chunk_fwd_o(case):
    _, B, T, H, HV, K, V, offsets, dtype, scale = case
    kwargs = dict(_o_inputs(B, T, H, HV, K, V, offsets, dtype), scale=scale)
    ref = torch.ops.tq.chunk_fwd_o(**kwargs)
    out = _plans.run("chunk_fwd_o", **kwargs)
    assert_allclose_written("o", ref, out, rtol=1e-5, atol=1e-6)


def test_chunk_fwd_o_mixed_qk_dtypes_and_float16_stage_inputs():
    """q float16 with k float32 (both read as float32); float16 v_new, h and g (read as float32)."""
    kwargs = _o_inputs(1, 65, 1, 2, 64, 64, None, F32)
    kwargs.update(q=kwargs["q"].half(), v=kwargs["v"].half(), h=kwargs["h"].half(), g=kwargs["g"].half())
    assert _plans.plan("chunk_fwd_o", **kwargs)["launches"][0]["kernel"] == "chunk_fwd_o_float32_float32"
    assert_allclose_written("o", torch.ops.tq.chunk_fwd_o(**kwargs), _plans.run("chunk_fwd_o", **kwargs), 1e-5, 1e-6)


# ---- the three stages chained, against the entry op ------------------------------------------------

def test_stages_chained_match_chunk_gated_delta_rule():
    """recompute_w_u -> chunk_fwd_h -> chunk_fwd_o on the simulator's own outputs reproduce the CPU entry
    op (a different, fused evaluation order), with cu_seqlens and an initial state."""
    x = _inputs(1, 130, 1, 2, 64, 64, CU)
    h0 = _state(3, 2, 64, 64)
    w, u = _plans.run("recompute_w_u", k=x["k"], v=x["v"], beta=x["beta"], A=x["A"], g=x["g"], cu_seqlens=x["cu_seqlens"])
    h, v_new, final = _plans.run("chunk_fwd_h", k=x["k"], w=w, u=u, g=x["g"], initial_state=h0, cu_seqlens=x["cu_seqlens"])
    o = _plans.run("chunk_fwd_o", q=x["q"], k=x["k"], v=v_new, h=h, g=x["g"], cu_seqlens=x["cu_seqlens"])
    o_ref, final_ref = torch.ops.tq.chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["raw_g"], x["beta"], None, h0,
                                                           True, False, x["cu_seqlens"])
    assert_allclose_written("o", o_ref, o, rtol=1e-4, atol=1e-5)
    assert_allclose_written("final_state", final_ref, final, rtol=1e-4, atol=1e-5)


# ---- plans: bad inputs, limits -------------------------------------------------------------------

def _wu(B=1, **kw):
    base = dict(k=torch.randn(B, 5, 2, 64), v=torch.randn(B, 5, 4, 64), beta=torch.rand(B, 5, 4),
                A=torch.randn(B, 5, 4, 64), g=-torch.rand(B, 5, 4), cu_seqlens=None)
    return dict(base, **kw)


def _h(**kw):
    base = dict(k=torch.randn(1, 5, 2, 64), w=torch.randn(1, 5, 4, 64), u=torch.randn(1, 5, 4, 64),
                g=-torch.rand(1, 5, 4), initial_state=None, cu_seqlens=None)
    return dict(base, **kw)


def _o(**kw):
    base = dict(q=torch.randn(1, 70, 2, 64), k=torch.randn(1, 70, 2, 64), v=torch.randn(1, 70, 4, 64),
                h=torch.randn(1, 2, 4, 64, 64), g=-torch.rand(1, 70, 4), scale=None, cu_seqlens=None)
    return dict(base, **kw)


BAD_INPUTS = [
    ("wu-k-rank", "recompute_w_u", lambda: _wu(k=torch.randn(5, 2, 64))),
    ("wu-k-dtype", "recompute_w_u", lambda: _wu(k=torch.zeros(1, 5, 2, 64, dtype=torch.int32))),
    ("wu-head-dim", "recompute_w_u", lambda: _wu(k=torch.randn(1, 5, 2, 96))),
    ("wu-v-tokens", "recompute_w_u", lambda: _wu(v=torch.randn(1, 6, 4, 64))),
    ("wu-value-dim", "recompute_w_u", lambda: _wu(v=torch.randn(1, 5, 4, 32))),
    ("wu-gva", "recompute_w_u", lambda: _wu(k=torch.randn(1, 5, 3, 64))),
    ("wu-beta-shape", "recompute_w_u", lambda: _wu(beta=torch.rand(1, 5, 2))),
    ("wu-A-rank", "recompute_w_u", lambda: _wu(A=torch.randn(1, 5, 4))),
    ("wu-A-chunk", "recompute_w_u", lambda: _wu(A=torch.randn(1, 5, 4, 32))),
    ("wu-g-dtype", "recompute_w_u", lambda: _wu(g=torch.zeros(1, 5, 4, dtype=torch.int64))),
    ("wu-varlen-batch", "recompute_w_u", lambda: _wu(B=2, cu_seqlens=torch.tensor([0, 5]))),
    ("wu-varlen-end", "recompute_w_u", lambda: _wu(cu_seqlens=torch.tensor([0, 2, 4]))),
    ("h-k-rank", "chunk_fwd_h", lambda: _h(k=torch.randn(1, 5, 2, 64, 1))),
    ("h-u-tokens", "chunk_fwd_h", lambda: _h(u=torch.randn(1, 4, 4, 64))),
    ("h-w-shape", "chunk_fwd_h", lambda: _h(w=torch.randn(1, 5, 4, 128))),
    ("h-w-dtype", "chunk_fwd_h", lambda: _h(w=torch.zeros(1, 5, 4, 64, dtype=torch.int32))),
    ("h-g-shape", "chunk_fwd_h", lambda: _h(g=-torch.rand(1, 5, 2))),
    ("h-state-shape", "chunk_fwd_h", lambda: _h(initial_state=torch.zeros(1, 4, 64, 32))),
    ("h-state-dtype", "chunk_fwd_h", lambda: _h(initial_state=torch.zeros(1, 4, 64, 64, dtype=torch.float16))),
    ("h-varlen-order", "chunk_fwd_h", lambda: _h(cu_seqlens=torch.tensor([0, 4, 2, 5]))),
    ("h-varlen-states", "chunk_fwd_h", lambda: _h(cu_seqlens=torch.tensor([0, 2, 5]),
                                                  initial_state=torch.zeros(1, 4, 64, 64))),
    ("o-k-shape", "chunk_fwd_o", lambda: _o(k=torch.randn(1, 70, 1, 64))),
    ("o-v-dim", "chunk_fwd_o", lambda: _o(v=torch.randn(1, 70, 4, 96))),
    ("o-h-rank", "chunk_fwd_o", lambda: _o(h=torch.randn(1, 2, 4, 64))),
    ("o-h-shape", "chunk_fwd_o", lambda: _o(h=torch.randn(1, 2, 4, 64, 128))),
    ("o-h-chunks", "chunk_fwd_o", lambda: _o(h=torch.randn(1, 1, 4, 64, 64))),
    ("o-scale", "chunk_fwd_o", lambda: _o(scale=float("nan"))),
    ("o-varlen-short", "chunk_fwd_o", lambda: _o(cu_seqlens=torch.tensor([70]))),
    ("o-varlen-start", "chunk_fwd_o", lambda: _o(cu_seqlens=torch.tensor([1, 70]))),
    ("o-varlen-h-chunks", "chunk_fwd_o", lambda: _o(cu_seqlens=torch.tensor([0, 66, 66, 70]))),
]


@pytest.mark.parametrize("case_id, op, build", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_plan_rejects_bad_input_like_the_cpu_op(case_id, op, build):
    assert_plan_rejects_like_the_cpu_op(op, build())


def test_plans_respect_apple_limits_and_name_instantiated_kernels():
    kernels = set(library(_plans.KERNELS / "gated_delta_chunk.metal").kernels)
    g, A = torch.empty(1, 130, 2), torch.empty(1, 130, 2, 64)
    for K in (64, 128, 256):
        for V in (64, 128, 256):
            for dtype in (F32, F16, BF16):
                name = str(dtype)[6:]
                k = torch.empty(1, 130, 1, K, dtype=dtype)
                v = torch.empty(1, 130, 2, V, dtype=dtype)
                plans = {
                    f"recompute_w_u_{name}_{name}": _plans.plan("recompute_w_u", k=k, v=v, beta=g, A=A, g=g),
                    f"chunk_fwd_h_{name}_k{K}": _plans.plan("chunk_fwd_h", k=k, w=torch.empty(1, 130, 2, K),
                                                            u=v.float(), g=g, cu_seqlens=cu_tensor(CU)),
                    f"chunk_fwd_o_{name}_float32": _plans.plan("chunk_fwd_o", q=k, k=k, v=v.float(),
                                                               h=torch.empty(1, 3, 2, K, V), g=g),
                }
                for kernel, p in plans.items():
                    assert p["error"] == ""
                    (launch,) = p["launches"]
                    assert launch["kernel"] == kernel and kernel in kernels
                    # chunk_fwd_h: 8 simdgroups on 64 value columns; the others: 4 simdgroups.
                    threads = 256 if kernel.startswith("chunk_fwd_h") else 128
                    assert launch["threads"] == (threads, 1, 1) and launch["threadgroup_memory"] <= 28 * 1024
                    assert all(n >= 1 for n in launch["grid"])
                    if kernel.startswith("chunk_fwd_h"):
                        assert launch["grid"] == (V // 64, 2, 3)
                # h is sized from the cu_seqlens values: 2 + 0 + 1 chunks.
                assert plans[f"chunk_fwd_h_{name}_k{K}"]["outputs"][0][0] == [1, 3, 2, K, V]
    # chunk_fwd_o writes float32 only (the entry op has its own fused kernel): no other output dtype.
    assert {k for k in kernels if k.startswith("chunk_fwd_o_")} == {
        f"chunk_fwd_o_{a}_float32" for a in ("float32", "float16", "bfloat16")}
