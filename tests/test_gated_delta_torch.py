"""The GPU-shaped PyTorch gated delta rule (CUDA without FLA), run here on CPU tensors.

``torch_tq.backends.cuda.gated_delta_torch`` is plain PyTorch, so it is checked on CPU against the
float64 per-head, per-chunk loop of DESIGN §5 (``reference64``) and the CPU reference, over the
gated-delta case grid (GVA, odd T, initial state, l2norm, decode), varlen ``cu_seqlens`` with empty
and partial sequences, several segments, and float32/float16/bfloat16 inputs. Every test runs with
uninitialised memory filled with NaN (``_poisoned``), so an output element that is never written
fails. It also pins the shape that makes it fast on a GPU: one aten op per chunk in the chunked
state pass and five per token in the recurrence (counted, not timed).
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torch_tq.backends.cpu import gated_delta_rule as reference
from torch_tq.backends.cuda import gated_delta_rule as cuda_gdr
from torch_tq.backends.cuda import gated_delta_torch as gpu_torch
from _utils import assert_close
from test_gated_delta_rule import CASE_IDS, CASES, OUT_RATIO, VARLEN, assert_f64, make_inputs, reference64

pytestmark = pytest.mark.usefixtures("one_thread", "_poisoned")

SOLVES = gpu_torch.SOLVES


@pytest.fixture
def _poisoned():
    """torch.empty returns NaN-filled memory while a test runs (deterministic mode's fill)."""
    was = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was[0])
    torch.utils.deterministic.fill_uninitialized_memory = was[1]


def _entry(kind, solve=None):
    if kind == "recurrent":
        return gpu_torch.fused_recurrent_gated_delta_rule
    return lambda *args, **kw: gpu_torch.chunk_gated_delta_rule(*args, solve=solve, **kw)


KINDS = [pytest.param("chunk", s, id=f"chunk-{s}") for s in SOLVES] + [pytest.param("recurrent", None, id="recurrent")]


@pytest.mark.parametrize("kind, solve", KINDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_design_reference_float64(case, kind, solve):
    _, B, T, H, HV, K, V, l2, state = case
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HV, K, V, state=state)
    ref = reference64(q, k, v, g, beta, scale=0.3, h0=h0, l2norm=l2)
    o, s = _entry(kind, solve)(q, k, v, g, beta, scale=0.3, initial_state=h0, output_final_state=True,
                               use_qk_l2norm_in_kernel=l2)
    assert_f64("o", ref["o"], o)
    assert_f64("final_state", ref["final"], s)


@pytest.mark.parametrize("kind, solve", KINDS)
@pytest.mark.parametrize("name, offsets, H, HV", VARLEN, ids=[c[0] for c in VARLEN])
def test_varlen_float64(kind, solve, name, offsets, H, HV):
    T, N, K, V = offsets[-1], len(offsets) - 1, 64, 64
    q, k, v, g, beta, h0 = make_inputs(1, T, H, HV, K, V, N=N)
    cu = torch.tensor(offsets, dtype=torch.int32)
    ref = reference64(q, k, v, g, beta, h0=h0, cu_seqlens=cu, l2norm=True)
    o, s = _entry(kind, solve)(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                               use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
    assert_f64("o", ref["o"], o)
    assert_f64("final_state", ref["final"], s)
    for n, (a, b) in enumerate(zip(offsets, offsets[1:])):
        if a == b:  # an empty sequence passes its state through unchanged
            assert_f64(f"state of empty sequence {n}", h0[n], s[n], tol=0)


@pytest.mark.parametrize("solve", SOLVES)
@pytest.mark.parametrize("offsets", [None, [0, 100, 103, 330]], ids=["dense", "varlen"])
def test_segments_carry_the_state(monkeypatch, solve, offsets):
    # One chunk per segment (the budget below one head x chunk still makes progress) equals one segment.
    T = 330 if offsets is None else offsets[-1]
    N = 1 if offsets is None else len(offsets) - 1
    cu = None if offsets is None else torch.tensor(offsets)
    q, k, v, g, beta, h0 = make_inputs(1, T, 1, 2, 64, 64, N=N)
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu, solve=solve)
    o_one, s_one = gpu_torch.chunk_gated_delta_rule(q, k, v, g, beta, **kw)
    monkeypatch.setattr(gpu_torch, "SEGMENT_HEAD_CHUNKS", 1)
    o_seg, s_seg = gpu_torch.chunk_gated_delta_rule(q, k, v, g, beta, **kw)
    assert_f64("o", o_one, o_seg)
    assert_f64("final_state", s_one, s_seg)
    ref = reference64(q, k, v, g, beta, h0=h0, cu_seqlens=cu, l2norm=True)
    assert_f64("o vs reference", ref["o"], o_seg)


@pytest.mark.parametrize("kind, solve", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_inputs(kind, solve, dtype):
    q, k, v, g, beta, h0 = make_inputs(2, 130, 2, 4, 64, 128, dtype=dtype)
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o, s = _entry(kind, solve)(q, k, v, g, beta, **kw)
    assert o.dtype == dtype and s.dtype == torch.float32
    ref = reference64(q, k, v, g, beta, h0=h0, l2norm=True)
    assert_close("o vs float64", ref["o"], o, OUT_RATIO[dtype])
    assert_close("final_state vs float64", ref["final"], s, OUT_RATIO[torch.float32])
    # Against the CPU reference on the same low-precision inputs: the same float32 math, other op order.
    fn = getattr(reference, "chunk_gated_delta_rule" if kind == "chunk" else "fused_recurrent_gated_delta_rule")
    o_ref, s_ref = fn(q, k, v, g, beta, **kw)
    assert_close("o vs CPU reference", o_ref, o, OUT_RATIO[dtype])
    assert_close("final_state vs CPU reference", s_ref, s, OUT_RATIO[torch.float32])


@pytest.mark.parametrize("kind, solve", KINDS)
def test_state_convention_and_inputs_untouched(kind, solve):
    q, k, v, g, beta, h0 = make_inputs(1, 70, 1, 2, 64, 64, dtype=torch.bfloat16)
    inputs = (q, k, v, g, beta, h0)
    before = [x.clone() for x in inputs]
    fn = _entry(kind, solve)
    o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert s.shape == h0.shape and s.dtype == torch.float32 and s.data_ptr() != h0.data_ptr() and s.is_contiguous()
    o2, empty = fn(q, k, v, g, beta, initial_state=h0)
    assert empty.shape == (0, 2, 64, 64) and empty.dtype == torch.float32
    torch.testing.assert_close(o2, o, rtol=0, atol=0)
    assert o.is_contiguous() and o.dtype == torch.bfloat16
    assert all(torch.equal(x, y) for x, y in zip(inputs, before))


@pytest.mark.parametrize("kind, solve", KINDS)
def test_strided_inputs_and_empty_batch(kind, solve):
    fn = _entry(kind, solve)
    q, k, v, g, beta, h0 = make_inputs(2, 70, 2, 4, 64, 64, dtype=torch.float32)
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, g, beta)]
    kw = dict(output_final_state=True, use_qk_l2norm_in_kernel=True)
    o_ref, s_ref = fn(q, k, v, g, beta, initial_state=h0, **kw)
    o, s = fn(*strided, initial_state=h0.transpose(2, 3).contiguous().transpose(2, 3), **kw)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)
    o, s = fn(q[:0], k[:0], v[:0], g[:0], beta[:0], **kw)
    assert o.shape == (0, 70, 4, 64) and s.shape == (0, 4, 64, 64)


def test_unknown_solve_is_rejected():
    q, k, v, g, beta, _ = make_inputs(1, 8, 1, 1, 64, 64, dtype=torch.float32)
    with pytest.raises(ValueError, match="solve must be one of"):
        gpu_torch.chunk_gated_delta_rule(q, k, v, g, beta, solve="inverse")


class _CountOps(TorchDispatchMode):
    """Counts the aten ops that are not views (each one a kernel launch on a GPU, roughly)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _ops(fn, T, **kw):
    q, k, v, g, beta, h0 = make_inputs(1, T, 2, 4, 64, 64, dtype=torch.bfloat16)
    with _CountOps() as mode:
        fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True, **kw)
    return mode.ops


@pytest.mark.parametrize("solve", SOLVES)
def test_the_chunked_state_pass_is_one_op_per_chunk(solve):
    """Everything but the state pass is batched over chunks: one more chunk is one more aten op."""
    fn = gpu_torch.chunk_gated_delta_rule
    extra = _ops(fn, 3 * 64, solve=solve)
    extra.subtract(_ops(fn, 2 * 64, solve=solve))
    assert +extra == collections.Counter({"aten.baddbmm_": 1})


def test_the_recurrence_is_five_ops_per_token():
    fn = gpu_torch.fused_recurrent_gated_delta_rule
    extra = _ops(fn, 3)
    extra.subtract(_ops(fn, 2))
    assert +extra == collections.Counter({"aten.bmm": 2, "aten.addcmul": 1, "aten.mul_": 1, "aten.baddbmm_": 1})


def test_a_decode_step_is_few_ops():
    """T = 1 takes the decode step: 20 non-view aten ops here with l2norm, a state and bfloat16 gates, two
    of them allocations and two casts (transformers' torch_recurrent_gated_delta_rule: 30 for the same call)."""
    ops = _ops(gpu_torch.fused_recurrent_gated_delta_rule, 1)
    assert sum(ops.values()) <= 20, ops
    assert ops["aten.bmm"] == 2 and ops["aten.baddbmm_"] == 1, ops


@pytest.mark.parametrize("op", ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"])
def test_cuda_without_fla_runs_this_path(monkeypatch, op):
    monkeypatch.setattr(cuda_gdr, "_use_fla", lambda: False)
    monkeypatch.setattr(cuda_gdr, "_fla_ops", lambda: pytest.fail("FLA must not be called"))
    q, k, v, g, beta, h0 = make_inputs(1, 70, 2, 4, 64, 64, dtype=torch.bfloat16)
    args = (q, k, v, g, beta, 0.3, h0, True, True, None)
    o, s = getattr(cuda_gdr, op)(*args)
    o_gpu, s_gpu = getattr(gpu_torch, op)(*args)
    torch.testing.assert_close(o, o_gpu, rtol=0, atol=0)
    torch.testing.assert_close(s, s_gpu, rtol=0, atol=0)
