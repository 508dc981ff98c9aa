"""tq.chunk_local_cumsum, tq.chunk_scaled_dot_kkt and tq.solve_tril through their plans and the MSL simulator, against the CPU reference.

Tolerances: every kernel reads the same float32 values as the CPU reference (float16/bfloat16 k and g
convert to float32 exactly on both sides), so only the float32 summation order differs: the kkt dot
products (K terms), the cumsum (CPU: sequential in double, here a simd prefix tree in float32) and the
solve's merges. Hence float32 tolerances for every input dtype.
"""

import pytest
import torch
import torch.nn.functional as F

import _plans
from _gdr import CU, assert_allclose_written, assert_plan_rejects_like_the_cpu_op, cu_tensor
from torch_tq.backends.cpu import gated_delta_rule as cpu_gdr

BT = 64


def _gates(B, T, HV, dtype=torch.float32):
    return (-F.softplus(torch.randn(B, T, HV))).to(dtype)


def _keys(B, T, H, K, dtype=torch.float32):
    return cpu_gdr.l2norm(torch.randn(B, T, H, K)).to(dtype)


def _chunks(B, T, offsets):
    """(batch row, first token, length) of every chunk of 64 tokens (chunks restart at sequence starts)."""
    spans = [(b, 0, T) for b in range(B)] if offsets is None else [(0, s, e - s) for s, e in zip(offsets, offsets[1:])]
    return [(b, s + c, min(BT, n - c)) for b, s, n in spans for c in range(0, n, BT)]




# ---- chunk_local_cumsum ------------------------------------------------------------------------

# id, B, T, HV, chunk_size, reverse, scale, offsets, g dtype
CUMSUM_CASES = [
    ("T130", 2, 130, 3, 64, False, None, None, torch.float32),
    ("T1", 1, 1, 2, 64, False, None, None, torch.float32),
    ("T64-reverse-scale", 1, 64, 2, 64, True, 0.5, None, torch.float32),
    ("T65-fp16", 2, 65, 2, 64, True, None, None, torch.float16),
    ("T63-bf16-scale", 1, 63, 9, 64, False, -2.0, None, torch.bfloat16),
    ("cs16-varlen-reverse", 1, 130, 2, 16, True, 1.5, CU, torch.float32),
    ("cs64-varlen", 1, 130, 2, 64, False, None, CU, torch.float32),
    ("cs1-varlen", 1, 65, 2, 1, False, None, [0, 20, 20, 65], torch.float32),
    ("cs4096", 2, 130, 2, 4096, True, None, None, torch.float32),
]


@pytest.mark.parametrize("case", CUMSUM_CASES, ids=[c[0] for c in CUMSUM_CASES])
def test_chunk_local_cumsum(case):
    _, B, T, HV, cs, reverse, scale, offsets, dtype = case
    g = _gates(B, T, HV, dtype)
    kwargs = dict(g=g, chunk_size=cs, reverse=reverse, scale=scale, cu_seqlens=cu_tensor(offsets))
    ref = torch.ops.tq.chunk_local_cumsum(**kwargs)
    out = _plans.run("chunk_local_cumsum", **kwargs)
    # Sums of up to 64 (4096) terms of size ~0.7: float32 rounding of the partial sums.
    assert_allclose_written("chunk_local_cumsum", ref, out, rtol=1e-5, atol=2e-5 * (1 + abs(scale or 1)))


# ---- chunk_scaled_dot_kkt ----------------------------------------------------------------------

# id, B, T, H, HV, K, offsets, k dtype
KKT_CASES = [
    ("T1-K64", 2, 1, 1, 2, 64, None, torch.float32),
    ("T63-K128", 1, 63, 1, 2, 128, None, torch.float32),
    ("T64-K256", 1, 64, 1, 2, 256, None, torch.float32),
    ("T65-K64-H2", 2, 65, 2, 4, 64, None, torch.float32),
    ("T130-K128", 1, 130, 1, 2, 128, None, torch.float32),
    ("varlen-K64", 1, 130, 1, 2, 64, CU, torch.float32),
    ("fp16-K128", 1, 65, 1, 2, 128, None, torch.float16),
    ("bf16-K64-varlen", 1, 130, 1, 2, 64, CU, torch.bfloat16),
]


def _check_kkt_layout(A, B, T, offsets):
    """Zero on and above the diagonal of every chunk row, and from column L on in a partial chunk."""
    for b, s, L in _chunks(B, T, offsets):
        rows = A[b, s:s + L]  # [L, HV, 64]
        keep = torch.ones(L, BT, dtype=torch.bool).tril(-1)
        assert torch.all(rows.transpose(0, 1)[:, ~keep] == 0)


@pytest.mark.parametrize("case", KKT_CASES, ids=[c[0] for c in KKT_CASES])
def test_chunk_scaled_dot_kkt(case):
    _, B, T, H, HV, K, offsets, dtype = case
    k = _keys(B, T, H, K, dtype)
    g = torch.ops.tq.chunk_local_cumsum(_gates(B, T, HV), cu_seqlens=cu_tensor(offsets))
    beta = torch.rand(B, T, HV)
    kwargs = dict(k=k, g=g, beta=beta, cu_seqlens=cu_tensor(offsets))
    ref = torch.ops.tq.chunk_scaled_dot_kkt(**kwargs)
    out = _plans.run("chunk_scaled_dot_kkt", **kwargs)
    # |A_ij| <= 1 (unit keys, beta and decay <= 1): K-term float32 dot products.
    assert_allclose_written("chunk_scaled_dot_kkt", ref, out, rtol=1e-5, atol=1e-6)
    _check_kkt_layout(out, B, T, offsets)


def test_chunk_scaled_dot_kkt_raw_keys_and_float16_gates():
    """Unnormalised keys (|k.k| ~ K) and float16 g/beta (the plan reads them as float32)."""
    B, T, H, HV, K = 1, 70, 1, 2, 256
    k = torch.randn(B, T, H, K)
    g = torch.ops.tq.chunk_local_cumsum(_gates(B, T, HV) * 0.1).half()
    beta = torch.rand(B, T, HV).half()
    ref = torch.ops.tq.chunk_scaled_dot_kkt(k, g, beta)
    out = _plans.run("chunk_scaled_dot_kkt", k=k, g=g, beta=beta)
    assert_allclose_written("chunk_scaled_dot_kkt", ref, out, rtol=1e-5, atol=1e-4)


# ---- solve_tril --------------------------------------------------------------------------------

def _kkt_input(B, T, HV, offsets, K=64):
    """A realistic solve_tril input: the CPU kkt of l2-normalised keys (well conditioned)."""
    g = torch.ops.tq.chunk_local_cumsum(_gates(B, T, HV), cu_seqlens=cu_tensor(offsets))
    return torch.ops.tq.chunk_scaled_dot_kkt(_keys(B, T, 1, K), g, torch.rand(B, T, HV), cu_tensor(offsets))


def _check_inverse(A, Ai, B, T, offsets):
    """(I + A) Ai = I on every chunk's L x L block; the rows of Ai hold exactly 1 on the diagonal and 0
    above it and from column L on."""
    worst = 0.0
    for b, s, L in _chunks(B, T, offsets):
        for h in range(A.shape[2]):
            M = torch.eye(L, dtype=torch.float64) + A[b, s:s + L, h, :L].double().tril(-1)
            T_ = Ai[b, s:s + L, h].double()
            assert torch.equal(T_.diagonal()[:L], torch.ones(L, dtype=torch.float64))
            assert torch.all(T_.triu(1) == 0)
            worst = max(worst, (M @ T_[:, :L] - torch.eye(L, dtype=torch.float64)).abs().max().item())
    assert worst < 1e-5, f"(I + A) Ai - I: max {worst:.3e}"


# id, B, T, HV, offsets
SOLVE_CASES = [
    ("T1", 2, 1, 2, None),
    ("T63", 1, 63, 2, None),
    ("T64", 1, 64, 2, None),
    ("T65", 2, 65, 2, None),
    ("T130", 1, 130, 3, None),
    ("varlen", 1, 130, 2, CU),
]


@pytest.mark.parametrize("case", SOLVE_CASES, ids=[c[0] for c in SOLVE_CASES])
def test_solve_tril(case):
    _, B, T, HV, offsets = case
    A = _kkt_input(B, T, HV, offsets)
    ref = torch.ops.tq.solve_tril(A, cu_tensor(offsets))
    out = _plans.run("solve_tril", A=A, cu_seqlens=cu_tensor(offsets))
    assert_allclose_written("solve_tril", ref, out, rtol=1e-5, atol=1e-6)
    _check_inverse(A, out, B, T, offsets)


def test_solve_tril_correlated_keys():
    """Keys sharing one direction and slow decay: |A| up to ~0.8, so every merge level matters. The
    simulator's error against float64 is that of the CPU op in float32 (both ~1e-7)."""
    B, T, HV, K = 1, 130, 2, 64
    k = cpu_gdr.l2norm(torch.randn(B, T, 1, K) * 0.5 + torch.randn(K))
    g = torch.ops.tq.chunk_local_cumsum(_gates(B, T, HV) * 0.05)
    A = torch.ops.tq.chunk_scaled_dot_kkt(k, g, torch.rand(B, T, HV))
    assert A.abs().max() > 0.5
    out = _plans.run("solve_tril", A=A)
    assert_allclose_written("solve_tril", torch.ops.tq.solve_tril(A), out, rtol=1e-5, atol=1e-6)
    assert_allclose_written("solve_tril vs float64", torch.ops.tq.solve_tril(A.double()).float(), out, rtol=1e-5, atol=1e-6)
    _check_inverse(A, out, B, T, None)


def test_solve_tril_reads_only_the_strictly_lower_triangle():
    """NaN on and above the diagonal (and beyond a partial chunk's rows) must not reach the result;
    a float16 A is read as float32."""
    B, T, HV = 1, 130, 2
    A = _kkt_input(B, T, HV, CU)
    upper = torch.ones(BT, BT, dtype=torch.bool).triu()
    for _, s, L in _chunks(B, T, CU):
        block = A[0, s:s + L].transpose(0, 1)  # [HV, L, 64] view
        block[:, upper[:L]] = float("nan")
    ref = torch.ops.tq.solve_tril(A, cu_tensor(CU))
    out = _plans.run("solve_tril", A=A, cu_seqlens=cu_tensor(CU))
    assert_allclose_written("solve_tril", ref, out, rtol=1e-5, atol=1e-6)
    A16 = A.nan_to_num(0.0).half()
    assert_allclose_written("solve_tril fp16", torch.ops.tq.solve_tril(A16), _plans.run("solve_tril", A=A16), 1e-5, 1e-6)


def test_prep_pipeline_matches_cpu():
    """cumsum -> kkt -> solve_tril chained on the simulator's own outputs, K = 256, GVA 1:2."""
    B, T, H, HV, K = 1, 100, 1, 2, 256
    g, k, beta = _gates(B, T, HV), _keys(B, T, H, K), torch.rand(B, T, HV)
    g_cum = _plans.run("chunk_local_cumsum", g=g)
    A = _plans.run("chunk_scaled_dot_kkt", k=k, g=g_cum, beta=beta)
    Ai = _plans.run("solve_tril", A=A)
    ref = torch.ops.tq.solve_tril(torch.ops.tq.chunk_scaled_dot_kkt(k, torch.ops.tq.chunk_local_cumsum(g), beta))
    assert_allclose_written("pipeline", ref, Ai, rtol=1e-4, atol=1e-5)


# ---- plans: bad inputs, empty inputs, limits -----------------------------------------------------

def _cumsum(**kw):
    return dict(dict(g=_gates(1, 5, 4), chunk_size=64, reverse=False, scale=None, cu_seqlens=None), **kw)


def _kkt(**kw):
    return dict(dict(k=torch.randn(1, 5, 2, 64), g=_gates(1, 5, 4), beta=torch.rand(1, 5, 4), cu_seqlens=None), **kw)


def _solve(**kw):
    return dict(dict(A=torch.randn(1, 5, 4, 64), cu_seqlens=None), **kw)


BAD_INPUTS = [
    ("cumsum-rank", "chunk_local_cumsum", lambda: _cumsum(g=torch.randn(5, 4))),
    ("cumsum-dtype", "chunk_local_cumsum", lambda: _cumsum(g=torch.zeros(1, 5, 4, dtype=torch.int32))),
    ("cumsum-chunk-size", "chunk_local_cumsum", lambda: _cumsum(chunk_size=48)),
    ("cumsum-chunk-size-0", "chunk_local_cumsum", lambda: _cumsum(chunk_size=0)),
    ("cumsum-scale", "chunk_local_cumsum", lambda: _cumsum(scale=float("inf"))),
    ("cumsum-varlen-batch", "chunk_local_cumsum", lambda: _cumsum(g=_gates(2, 5, 4), cu_seqlens=torch.tensor([0, 5]))),
    ("cumsum-varlen-end", "chunk_local_cumsum", lambda: _cumsum(cu_seqlens=torch.tensor([0, 2, 4]))),
    ("kkt-head-dim", "chunk_scaled_dot_kkt", lambda: _kkt(k=torch.randn(1, 5, 2, 96))),
    ("kkt-gva", "chunk_scaled_dot_kkt", lambda: _kkt(k=torch.randn(1, 5, 3, 64))),
    ("kkt-beta-tokens", "chunk_scaled_dot_kkt", lambda: _kkt(beta=torch.rand(1, 6, 4))),
    ("kkt-g-shape", "chunk_scaled_dot_kkt", lambda: _kkt(g=_gates(1, 5, 2))),
    ("kkt-varlen-dtype", "chunk_scaled_dot_kkt", lambda: _kkt(cu_seqlens=torch.tensor([0.0, 5.0]))),
    ("kkt-varlen-order", "chunk_scaled_dot_kkt", lambda: _kkt(cu_seqlens=torch.tensor([0, 4, 2, 5]))),
    ("solve-rank", "solve_tril", lambda: _solve(A=torch.randn(5, 4, 64))),
    ("solve-chunk", "solve_tril", lambda: _solve(A=torch.randn(1, 5, 4, 32))),
    ("solve-varlen-start", "solve_tril", lambda: _solve(cu_seqlens=torch.tensor([1, 5]))),
    ("solve-varlen-short", "solve_tril", lambda: _solve(cu_seqlens=torch.tensor([5]))),
]


@pytest.mark.parametrize("case_id, op, build", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_plan_rejects_bad_input_like_the_cpu_op(case_id, op, build):
    assert_plan_rejects_like_the_cpu_op(op, build())


def test_empty_inputs_launch_nothing():
    for op, kwargs in (("chunk_local_cumsum", _cumsum(g=torch.randn(1, 0, 4))),
                       ("chunk_scaled_dot_kkt", _kkt(k=torch.randn(2, 0, 2, 64), g=torch.randn(2, 0, 4),
                                                     beta=torch.rand(2, 0, 4))),
                       ("solve_tril", _solve(A=torch.randn(1, 0, 4, 64)))):
        p = _plans.plan(op, **kwargs)
        assert p["error"] == "" and p["launches"] == []
        assert [s for s, _ in p["outputs"]] == [list(getattr(torch.ops.tq, op)(**kwargs).shape)]


def test_plans_respect_apple_limits():
    plans = [_plans.plan("chunk_local_cumsum", **_cumsum(g=_gates(1, 5, 40), chunk_size=2**40)),
             _plans.plan("chunk_scaled_dot_kkt", **_kkt(k=torch.randn(1, 5, 2, 256).half())),
             _plans.plan("solve_tril", **_solve())]
    for p in plans:
        assert p["error"] == ""
        for launch in p["launches"]:
            threads = launch["threads"][0] * launch["threads"][1] * launch["threads"][2]
            assert 0 < threads <= 1024 and threads % 32 == 0
            assert launch["threadgroup_memory"] <= 28 * 1024
    # chunk_size beyond T is capped (same sums, 32-bit params): one chunk per batch row.
    assert plans[0]["launches"][0]["grid"] == (1, 5, 1)
    assert [l["kernel"] for p in plans for l in p["launches"]] == [
        "chunk_local_cumsum_float32", "chunk_scaled_dot_kkt_float16", "solve_tril"]
