"""Gated delta rule: chunked == recurrent, external references, every stage op, varlen, dtypes, bad inputs, opcheck.

References, all in float64:
- a plain per-sequence, per-head, per-chunk loop of DESIGN §5 (``reference64`` below), which also
  yields every stage's output;
- transformers' ``torch_chunk_gated_delta_rule`` / ``torch_recurrent_gated_delta_rule`` (Qwen3-Next
  modeling file). They cast to float32 internally; ``_float64_copy`` runs the very same source with
  ``torch.float32`` meaning float64, so the comparison is exact to float64 rounding;
- FLA's ``naive_recurrent_gated_delta_rule`` when FLA imports (it needs Triton; otherwise skipped).
  FLA is deliberately not installed here: transformers would pick it up for every model.
"""

from __future__ import annotations

import inspect
import re
import types

import pytest
import torch
import torch.nn.functional as F

import torch_tq
from torch_tq import _gated_delta_ops as gdr
from torch_tq.backends.cpu import gated_delta_rule as cpu_gdr
from torch_tq.integrations.gated_delta import fla_or_torch_fallback
from _gated_delta_bad_inputs import BAD_INPUTS, rule_args
from _utils import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


BT = 64
F64_TOL = 1e-10
OUT_RATIO = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_inputs(B, T, H, HV, K, V, dtype=torch.float64, N=None, state=True):
    """Fresh random inputs: g = -softplus(randn) (log decays < 0), beta = sigmoid(randn), never zeros."""
    N = B if N is None else N
    f64 = dict(dtype=torch.float64)
    q, k = torch.randn(B, T, H, K, **f64), torch.randn(B, T, H, K, **f64)
    v = torch.randn(B, T, HV, V, **f64)
    g = -F.softplus(torch.randn(B, T, HV, **f64))
    beta = torch.randn(B, T, HV, **f64).sigmoid()
    h0 = torch.randn(N, HV, K, V, **f64) if state else None
    cast = lambda x: x.to(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(g), cast(beta), (None if h0 is None else h0.to(
        torch.float64 if dtype == torch.float64 else torch.float32))


def l2n(x):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def reference64(q, k, v, g, beta, scale=None, h0=None, cu_seqlens=None, l2norm=False):
    """DESIGN §5 written out per sequence, value head and chunk, in float64. Returns a dict with the
    final output, final states and every stage's tensor in the ops' layouts."""
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    if l2norm:
        q, k = l2n(q), l2n(k)
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    G = HV // H
    scale = K**-0.5 if scale is None else scale
    offsets = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
    rows = range(B) if cu_seqlens is None else [0] * (len(offsets) - 1)
    spans = [(b, 0, T) for b in rows] if cu_seqlens is None else [(0, s, e) for s, e in zip(offsets, offsets[1:])]
    gc = torch.zeros(B, T, HV, dtype=torch.float64)
    A = torch.zeros(B, T, HV, BT, dtype=torch.float64)
    Ai = torch.zeros_like(A)
    w = torch.zeros(B, T, HV, K, dtype=torch.float64)
    u = torch.zeros(B, T, HV, V, dtype=torch.float64)
    v_new = torch.zeros_like(u)
    o = torch.zeros_like(u)
    hs, finals = [], []
    for n, (b, s, e) in enumerate(spans):
        chunk_starts = list(range(s, e, BT))
        h_seq = torch.zeros(len(chunk_starts), HV, K, V, dtype=torch.float64)
        final = torch.zeros(HV, K, V, dtype=torch.float64)
        for i in range(HV):
            hk = i // G
            S = torch.zeros(K, V, dtype=torch.float64) if h0 is None else h0[n, i].double().clone()
            for c, cs in enumerate(chunk_starts):
                ce = min(cs + BT, e)
                L = ce - cs
                kk, qq, vv = k[b, cs:ce, hk], q[b, cs:ce, hk], v[b, cs:ce, i]
                bb = beta[b, cs:ce, i]
                Gi = torch.cumsum(g[b, cs:ce, i], 0)
                gc[b, cs:ce, i] = Gi
                # exp(G_r - G_j) for j <= r (differences <= 0); the rest is dropped by the where.
                lower = torch.ones(L, L, dtype=torch.bool).tril()
                decay = torch.where(lower, torch.exp(Gi[:, None] - Gi[None, :]), 0.0)
                Ac = (bb[:, None] * (kk @ kk.T) * decay).tril(-1)
                Aq = (qq @ kk.T) * decay
                T_inv = torch.linalg.inv(torch.eye(L, dtype=torch.float64) + Ac)
                A[b, cs:ce, i, :L] = Ac
                Ai[b, cs:ce, i, :L] = T_inv
                wc = T_inv @ (bb[:, None] * torch.exp(Gi)[:, None] * kk)
                uc = T_inv @ (bb[:, None] * vv)
                w[b, cs:ce, i], u[b, cs:ce, i] = wc, uc
                h_seq[c, i] = S
                vn = uc - wc @ S
                v_new[b, cs:ce, i] = vn
                o[b, cs:ce, i] = scale * ((qq * torch.exp(Gi)[:, None]) @ S + Aq @ vn)
                S = torch.exp(Gi[-1]) * S + (torch.exp(Gi[-1] - Gi)[:, None] * kk).T @ vn
            final[i] = S
        hs.append(h_seq)
        finals.append(final)
    if cu_seqlens is None:
        h = torch.stack(hs)  # [B, NT, HV, K, V]
    else:
        h = torch.cat(hs)[None]
    return dict(o=o, final=torch.stack(finals), g_cum=gc, A=A, Ai=Ai, w=w, u=u, v_new=v_new, h=h, q=q, k=k)


def assert_f64(name, ref, out, tol=F64_TOL):
    assert out.dtype == torch.float64, f"{name}: dtype {out.dtype}"
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = (out - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), f"{name}: max abs error {err:.3e} > {tol:.0e}"


# name, B, T, H, HV, K, V, l2norm, initial_state
CASES = [
    ("B1-T63-H2-HV4-K64-V64-l2", 1, 63, 2, 4, 64, 64, True, True),
    ("B2-T65-H1-HV1-K64-V128", 2, 65, 1, 1, 64, 128, False, True),
    ("B1-T130-H2-HV2-K128-V64-l2-nostate", 1, 130, 2, 2, 128, 64, True, False),
    ("B1-T1-H1-HV2-K256-V64", 1, 1, 1, 2, 256, 64, True, True),
    ("B2-T64-H1-HV3-K64-V256", 2, 64, 1, 3, 64, 256, True, False),
    ("B2-T1-H2-HV4-K128-V128-decode-nostate", 2, 1, 2, 4, 128, 128, False, False),
]
CASE_IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_chunk_gated_delta_rule_equals_recurrent_float64(case):
    _, B, T, H, HV, K, V, l2, state = case
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HV, K, V, state=state)
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=l2)
    o_c, s_c = gdr.chunk_gated_delta_rule(q, k, v, g, beta, **kw)
    o_r, s_r = gdr.fused_recurrent_gated_delta_rule(q, k, v, g, beta, **kw)
    assert_f64("o", o_r, o_c)
    assert_f64("final_state", s_r, s_c)


@pytest.mark.parametrize("offsets", [None, [0, 100, 103, 330]], ids=["dense", "varlen"])
def test_chunk_gated_delta_rule_segments_carry_the_state(monkeypatch, offsets):
    # The entry op runs SEGMENT_CHUNKS chunks at a time; several segments must equal one.
    T = 330 if offsets is None else offsets[-1]
    N = 1 if offsets is None else len(offsets) - 1
    cu = None if offsets is None else torch.tensor(offsets)
    q, k, v, g, beta, h0 = make_inputs(1, T, 1, 2, 64, 64, N=N)
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
    o_one, s_one = gdr.chunk_gated_delta_rule(q, k, v, g, beta, **kw)
    monkeypatch.setattr(cpu_gdr, "SEGMENT_CHUNKS", 2)
    o_seg, s_seg = gdr.chunk_gated_delta_rule(q, k, v, g, beta, **kw)
    assert_f64("o", o_one, o_seg)
    assert_f64("final_state", s_one, s_seg)


@pytest.mark.parametrize("case", CASES[:3], ids=CASE_IDS[:3])
def test_chunk_gated_delta_rule_matches_design_reference(case):
    _, B, T, H, HV, K, V, l2, state = case
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HV, K, V, state=state)
    ref = reference64(q, k, v, g, beta, scale=0.3, h0=h0, l2norm=l2)
    o, s = gdr.chunk_gated_delta_rule(q, k, v, g, beta, scale=0.3, initial_state=h0, output_final_state=True,
                                      use_qk_l2norm_in_kernel=l2)
    assert_f64("o", ref["o"], o)
    assert_f64("final_state", ref["final"], s)


def _float64_copy(fn):
    """The same function object code with ``torch.float32`` resolving to float64 (transformers and
    FLA cast their inputs to float32 first; this keeps the comparison in float64)."""
    fn = inspect.unwrap(fn)

    class _Torch64:
        float32 = torch.float64

        def __getattr__(self, name):
            return getattr(torch, name)

    globals_ = dict(fn.__globals__)
    globals_["torch"] = _Torch64()
    copy = types.FunctionType(fn.__code__, globals_, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def _transformers_refs():
    """transformers' two functions as they run on CPU tensors (its pure-PyTorch code even where it bound FLA)."""
    mod = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next",
                              reason="transformers with Qwen3-Next (>= 4.56) is not installed")
    return tuple(fla_or_torch_fallback(f, "cpu") for f in (mod.torch_chunk_gated_delta_rule,
                                                           mod.torch_recurrent_gated_delta_rule))


@pytest.mark.parametrize("case", CASES[:4], ids=CASE_IDS[:4])
def test_chunk_gated_delta_rule_matches_transformers_float64(case):
    _, B, T, H, HV, K, V, l2, state = case
    chunk_ref, recurrent_ref = (_float64_copy(f) for f in _transformers_refs())
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HV, K, V, state=state)
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=l2)
    o_ref, s_ref = chunk_ref(q, k, v, g, beta, **kw)
    o_rec, s_rec = recurrent_ref(q, k, v, g, beta, **kw)
    assert o_ref.dtype == torch.float64, "the float64 copy of transformers' function did not run in float64"
    o, s = gdr.chunk_gated_delta_rule(q, k, v, g, beta, **kw)
    assert_f64("o vs torch_chunk_gated_delta_rule", o_ref, o)
    assert_f64("state vs torch_chunk_gated_delta_rule", s_ref, s)
    o, s = gdr.fused_recurrent_gated_delta_rule(q, k, v, g, beta, **kw)
    assert_f64("o vs torch_recurrent_gated_delta_rule", o_rec, o)
    assert_f64("state vs torch_recurrent_gated_delta_rule", s_rec, s)


def test_chunk_gated_delta_rule_matches_transformers_float32_as_shipped():
    chunk_ref, _ = _transformers_refs()
    q, k, v, g, beta, h0 = make_inputs(1, 100, 2, 4, 64, 64, dtype=torch.float32)
    o_ref, s_ref = chunk_ref(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o, s = torch_tq_entry("chunk")(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                   use_qk_l2norm_in_kernel=True)
    assert_close("o", o_ref, o, 2e-5)
    assert_close("final_state", s_ref, s, 2e-5)


def test_fused_recurrent_matches_fla_naive_float64():
    try:
        from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    except Exception as exc:  # ImportError, or Triton missing inside fla's package import
        pytest.skip(f"flash-linear-attention is not importable here ({type(exc).__name__}: {exc}); "
                    "the transformers references cover the same math")
    naive = _float64_copy(naive_recurrent_gated_delta_rule)
    q, k, v, g, beta, h0 = make_inputs(1, 70, 2, 2, 64, 64)
    o_ref, s_ref = naive(l2n(q), l2n(k), v, beta, g, scale=0.2, initial_state=h0, output_final_state=True)
    o, s = gdr.fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale=0.2, initial_state=h0, output_final_state=True,
                                                use_qk_l2norm_in_kernel=True)
    assert_f64("o", o_ref.double(), o)
    assert_f64("final_state", s_ref.double(), s)


def torch_tq_entry(kind):
    """The public wrapper (``torch_tq.<name>`` once the package exports it, else the module's)."""
    name = "chunk_gated_delta_rule" if kind == "chunk" else "fused_recurrent_gated_delta_rule"
    return getattr(torch_tq, name, getattr(gdr, name))


VARLEN = [
    # name, offsets, H, HV
    ("two-seqs-partial-chunks", [0, 70, 133], 1, 2),
    ("empty-and-tiny-seqs", [0, 0, 1, 65, 65, 110], 2, 4),
]


@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
@pytest.mark.parametrize("name, offsets, H, HV", VARLEN, ids=[c[0] for c in VARLEN])
def test_varlen_equals_each_sequence_alone(kind, name, offsets, H, HV):
    T, N, K, V = offsets[-1], len(offsets) - 1, 64, 64
    q, k, v, g, beta, h0 = make_inputs(1, T, H, HV, K, V, N=N)
    fn = torch_tq_entry(kind)
    cu = torch.tensor(offsets)
    o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
    assert s.shape == (N, HV, K, V)
    for n, (a, b) in enumerate(zip(offsets, offsets[1:])):
        if a == b:
            assert_f64(f"state of empty sequence {n}", h0[n], s[n], tol=0)
            continue
        o_n, s_n = fn(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], initial_state=h0[n:n + 1],
                      output_final_state=True, use_qk_l2norm_in_kernel=True)
        assert_f64(f"o of sequence {n}", o_n, o[:, a:b])
        assert_f64(f"state of sequence {n}", s_n[0], s[n])
    ref = reference64(q, k, v, g, beta, h0=h0, cu_seqlens=cu, l2norm=True)
    assert_f64("o vs reference", ref["o"], o)


STAGE_CASES = [
    # name, B, T, H, HV, K, V, offsets
    ("B2-T130-H1-HV2-K64-V128", 2, 130, 1, 2, 64, 128, None),
    ("B1-T64-H2-HV4-K128-V64", 1, 64, 2, 4, 128, 64, None),
    ("varlen-0-70-75-200", 1, 200, 1, 2, 64, 64, [0, 70, 75, 200]),
]


@pytest.mark.parametrize("case", STAGE_CASES, ids=[c[0] for c in STAGE_CASES])
def test_stage_ops_match_design_reference(case):
    _, B, T, H, HV, K, V, offsets = case
    cu = None if offsets is None else torch.tensor(offsets)
    N = B if cu is None else len(offsets) - 1
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HV, K, V, N=N)
    ref = reference64(q, k, v, g, beta, scale=0.25, h0=h0, cu_seqlens=cu, l2norm=True)
    qn, kn = ref["q"], ref["k"]
    g_cum = gdr.chunk_local_cumsum(g, cu_seqlens=cu)
    assert_f64("chunk_local_cumsum", ref["g_cum"], g_cum)
    A = gdr.chunk_scaled_dot_kkt(kn, ref["g_cum"], beta, cu_seqlens=cu)
    assert_f64("chunk_scaled_dot_kkt", ref["A"], A)
    Ai = gdr.solve_tril(ref["A"], cu_seqlens=cu)
    assert_f64("solve_tril", ref["Ai"], Ai)
    w, u = gdr.recompute_w_u(kn, v, beta, ref["Ai"], ref["g_cum"], cu_seqlens=cu)
    assert_f64("recompute_w_u w", ref["w"], w)
    assert_f64("recompute_w_u u", ref["u"], u)
    h, v_new, final = gdr.chunk_fwd_h(kn, ref["w"], ref["u"], ref["g_cum"], initial_state=h0, cu_seqlens=cu)
    assert_f64("chunk_fwd_h h", ref["h"], h)
    assert_f64("chunk_fwd_h v_new", ref["v_new"], v_new)
    assert_f64("chunk_fwd_h final_state", ref["final"], final)
    o = gdr.chunk_fwd_o(qn, kn, ref["v_new"], ref["h"], ref["g_cum"], scale=0.25, cu_seqlens=cu)
    assert_f64("chunk_fwd_o", ref["o"], o)


def test_chunk_local_cumsum_reverse_and_scale():
    g = -torch.rand(2, 100, 3, dtype=torch.float64)
    out = gdr.chunk_local_cumsum(g, chunk_size=32, reverse=True, scale=0.5)
    ref = torch.cat([g[:, s:s + 32].flip(1).cumsum(1).flip(1) for s in range(0, 100, 32)], 1) * 0.5
    assert_f64("reverse cumsum", ref, out)


def test_solve_tril_is_the_inverse_of_every_chunk():
    A = torch.randn(1, 130, 3, BT, dtype=torch.float64) * 0.3
    Ai = gdr.solve_tril(A)
    for s in range(0, 130, BT):
        L = min(BT, 130 - s)
        for i in range(3):
            M = torch.eye(L, dtype=torch.float64) + A[0, s:s + L, i, :L].tril(-1)
            assert_f64("(I + A) Ai", torch.eye(L, dtype=torch.float64), M @ Ai[0, s:s + L, i, :L])


def test_stage_pipeline_equals_the_entry_op_float32():
    q, k, v, g, beta, h0 = make_inputs(1, 150, 2, 4, 64, 64, dtype=torch.float32)
    qn, kn = cpu_gdr.l2norm(q), cpu_gdr.l2norm(k)
    g_cum = gdr.chunk_local_cumsum(g)
    A = gdr.solve_tril(gdr.chunk_scaled_dot_kkt(kn, g_cum, beta))
    w, u = gdr.recompute_w_u(kn, v, beta, A, g_cum)
    h, v_new, final = gdr.chunk_fwd_h(kn, w, u, g_cum, initial_state=h0)
    o = gdr.chunk_fwd_o(qn, kn, v_new, h, g_cum)
    assert {t.dtype for t in (g_cum, A, w, u, h, v_new, final, o)} == {torch.float32}
    o_ref, s_ref = gdr.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                              use_qk_l2norm_in_kernel=True)
    assert_close("o", o_ref, o, 1e-5)
    assert_close("final_state", s_ref, final, 1e-5)


@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_inputs(kind, dtype):
    q, k, v, g, beta, h0 = make_inputs(2, 70, 2, 4, 64, 128, dtype=dtype)
    o, s = torch_tq_entry(kind)(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                use_qk_l2norm_in_kernel=True)
    assert o.dtype == dtype and s.dtype == torch.float32
    ref = reference64(q, k, v, g, beta, h0=h0, l2norm=True)
    assert_close("o", ref["o"], o, OUT_RATIO[dtype])
    assert_close("final_state", ref["final"], s, OUT_RATIO[torch.float32])


@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
def test_strided_inputs(kind):
    # transformers hands over views of its projections (split, reshape, transpose).
    q, k, v, g, beta, h0 = make_inputs(2, 70, 2, 4, 64, 64, dtype=torch.float32)
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, g, beta)]
    assert not strided[0].is_contiguous()
    fn = torch_tq_entry(kind)
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o_ref, s_ref = fn(q, k, v, g, beta, **kw)
    o, s = fn(*strided, **kw)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)
    assert o.is_contiguous()


def test_prefill_then_decode_equals_one_pass():
    q, k, v, g, beta, h0 = make_inputs(2, 80, 2, 4, 64, 64, dtype=torch.float32)
    kw = dict(output_final_state=True, use_qk_l2norm_in_kernel=True)
    o_all, s_all = gdr.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, **kw)
    o, s = gdr.chunk_gated_delta_rule(q[:, :77], k[:, :77], v[:, :77], g[:, :77], beta[:, :77], initial_state=h0, **kw)
    outs = [o]
    for t in range(77, 80):
        sl = slice(t, t + 1)
        o, s = gdr.fused_recurrent_gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl],
                                                    initial_state=s, **kw)
        outs.append(o)
    assert_close("o", o_all, torch.cat(outs, 1), 1e-5)
    assert_close("final_state", s_all, s, 1e-5)


@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
def test_final_state_convention_and_inputs_untouched(kind):
    q, k, v, g, beta, h0 = make_inputs(1, 10, 1, 2, 64, 64, dtype=torch.float32)
    h0_bf16 = h0.to(torch.bfloat16)
    before = h0_bf16.clone()
    o, s = torch_tq_entry(kind)(q, k, v, g, beta, initial_state=h0_bf16)
    assert s is None and o.shape == (1, 10, 2, 64)
    assert torch.equal(h0_bf16, before)
    op = getattr(torch.ops.tq, "chunk_gated_delta_rule" if kind == "chunk" else "fused_recurrent_gated_delta_rule")
    o2, empty = op(q, k, v, g, beta, initial_state=h0_bf16.float())
    assert empty.shape == (0, 2, 64, 64) and empty.dtype == torch.float32
    torch.testing.assert_close(o2, o)


VALUE_RULES = {"rule-varlen-start", "rule-varlen-order", "rule-varlen-end"}  # need the data: real kernels only
WRAPPER_CASTS = {"rule-state-dtype"}  # the wrapper reads any float state as float32, as FLA does


# Not every entry point applies to every rule: fake tensors carry no cu_seqlens values, and the
# wrapper legitimately casts a non-float32 state; those pairs are not generated.
BAD_INPUT_ENTRIES = [
    pytest.param(*case, entry, id=f"{entry}-{case[0]}")
    for entry in ("wrapper", "torch.ops", "fake")
    for case in BAD_INPUTS
    if not (entry == "fake" and case[0] in VALUE_RULES) and not (entry == "wrapper" and case[0] in WRAPPER_CASTS)
]


@pytest.mark.parametrize("case_id, op, build, message, entry", BAD_INPUT_ENTRIES)
def test_bad_input_is_rejected(case_id, op, build, message, entry):
    kwargs = build()
    if entry == "wrapper":
        fn = getattr(gdr, op)
    elif entry == "torch.ops":
        fn = getattr(torch.ops.tq, op)
    else:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode()
        kwargs = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}

        def fn(**kw):
            with mode:
                return getattr(torch.ops.tq, op)(**kw)

    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        fn(**kwargs)


def test_chunk_fwd_o_checks_varlen_chunk_count():
    a = rule_args(T=70, cu_seqlens=[0, 65, 70])
    h = torch.randn(1, 2, 4, 64, 64)  # needs 2 + 1 = 3 chunk states
    with pytest.raises(ValueError, match=re.escape("tq.chunk_fwd_o: h must hold NT = 3 chunk states")):
        gdr.chunk_fwd_o(a["q"], a["k"], a["v"], h, a["g"], cu_seqlens=a["cu_seqlens"])


def _opcheck_samples():
    r = rule_args(B=2, T=70, H=1, HV=2, initial_state=True)
    rv = rule_args(T=70, H=1, HV=2, cu_seqlens=[0, 5, 70], initial_state=True)
    # The recurrence loops in Python per token and opcheck runs it many times: keep T small there.
    rs = rule_args(B=2, T=6, H=1, HV=2, initial_state=True)
    rsv = rule_args(T=6, H=1, HV=2, cu_seqlens=[0, 2, 6], initial_state=True)
    rb = rule_args(T=3, H=2, HV=2, K=128, V=64, dtype=torch.bfloat16) | dict(output_final_state=False, scale=0.5)
    g = r["g"]
    kn = cpu_gdr.l2norm(r["k"])
    g_cum = torch.ops.tq.chunk_local_cumsum(g)
    A = torch.ops.tq.solve_tril(torch.ops.tq.chunk_scaled_dot_kkt(kn, g_cum, r["beta"]))
    w, u = torch.ops.tq.recompute_w_u(kn, r["v"], r["beta"], A, g_cum)
    h, v_new, _ = torch.ops.tq.chunk_fwd_h(kn, w, u, g_cum)
    return [
        ("chunk_gated_delta_rule", r), ("chunk_gated_delta_rule", rv), ("chunk_gated_delta_rule", rb),
        ("fused_recurrent_gated_delta_rule", rs), ("fused_recurrent_gated_delta_rule", rsv),
        ("chunk_local_cumsum", dict(g=g, chunk_size=32, reverse=True, scale=2.0, cu_seqlens=None)),
        ("chunk_local_cumsum", dict(g=rv["g"], cu_seqlens=rv["cu_seqlens"])),
        ("chunk_scaled_dot_kkt", dict(k=kn, g=g_cum, beta=r["beta"], cu_seqlens=None)),
        ("solve_tril", dict(A=A, cu_seqlens=None)),
        ("recompute_w_u", dict(k=kn, v=r["v"], beta=r["beta"], A=A, g=g_cum, cu_seqlens=None)),
        ("chunk_fwd_h", dict(k=kn, w=w, u=u, g=g_cum, initial_state=r["initial_state"], cu_seqlens=None)),
        ("chunk_fwd_o", dict(q=r["q"], k=kn, v=v_new, h=h, g=g_cum, scale=None, cu_seqlens=None)),
    ]


@pytest.mark.parametrize("sample", range(12))
def test_opcheck(sample):
    op, kwargs = _opcheck_samples()[sample]
    torch.library.opcheck(getattr(torch.ops.tq, op).default, args=(), kwargs=kwargs)


def test_opcheck_chunk_fwd_h_varlen():
    rv = rule_args(T=70, H=1, HV=2, cu_seqlens=[0, 5, 70], initial_state=True)
    cu = rv["cu_seqlens"]
    kn = cpu_gdr.l2norm(rv["k"])
    g_cum = torch.ops.tq.chunk_local_cumsum(rv["g"], cu_seqlens=cu)
    w, u = torch.ops.tq.recompute_w_u(kn, rv["v"], rv["beta"], torch.ops.tq.solve_tril(
        torch.ops.tq.chunk_scaled_dot_kkt(kn, g_cum, rv["beta"], cu), cu), g_cum, cu)
    kwargs = dict(k=kn, w=w, u=u, g=g_cum, initial_state=rv["initial_state"], cu_seqlens=cu)
    h, v_new, _ = torch.ops.tq.chunk_fwd_h(**kwargs)
    assert h.shape == (1, 3, 2, 64, 64)
    torch.library.opcheck(torch.ops.tq.chunk_fwd_h.default, args=(), kwargs=kwargs)
    torch.library.opcheck(torch.ops.tq.chunk_fwd_o.default, args=(),
                          kwargs=dict(q=rv["q"], k=kn, v=v_new, h=h, g=g_cum, scale=None, cu_seqlens=cu))


@pytest.mark.parametrize("op", ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"])
def test_empty_batch(op):
    """B = 0 returns empty outputs of the right shapes (the MPS plans do the same)."""
    q, k = torch.randn(0, 5, 2, 64), torch.randn(0, 5, 2, 64)
    v, g, beta = torch.randn(0, 5, 4, 32 * 2), torch.randn(0, 5, 4), torch.rand(0, 5, 4)
    o, state = getattr(torch.ops.tq, op)(q, k, v, g, beta, output_final_state=True)
    assert o.shape == (0, 5, 4, 64) and state.shape == (0, 4, 64, 64)
