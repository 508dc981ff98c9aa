"""chunk_gated_delta_rule (the chunked entry op) through its launch plan and the MSL simulator, against
the CPU reference.

The plan launches one fused kernel (gated_delta_fused.h: the cumsum, the l2norm, k k^T, its inverse,
v_new, o and the state update per chunk, no scratch); the CPU reference runs the same math in a
fused, segmented pass. Both accumulate in float32 in a different order, so float32 outputs agree to
float32 tolerances;
float16/bfloat16 o is rounded to its dtype on both sides, where a float32 difference may flip the
last bit, so the bound is about one ulp of that dtype (as in test_mps_gated_delta_recurrent.py).

The simulator runs every simdgroup_matrix product lane by lane: cases keep T <= 130 and few heads.
"""

import pytest
import torch

import _plans
from _gdr import CU, assert_plan_rejects_like_the_cpu_op, entry_inputs
from _gated_delta_bad_inputs import BAD_INPUTS, rule_args
from _utils import assert_close

OP = "chunk_gated_delta_rule"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Relative RMS error bounds of o by dtype; the final state is float32 for every input dtype.
O_RATIO = {F32: 1e-5, F16: 1e-3, BF16: 8e-3}
STATE_RATIO = 1e-5


def _max_errors(name, ref, out):
    err = (out.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    print(f"{name}: max abs err {err:.2e} (max |ref| {ref.abs().max().item() if ref.numel() else 0.0:.2e})")


def check_against_cpu(name, args, dtype):
    state_before = None if args["initial_state"] is None else args["initial_state"].clone()
    ref_o, ref_state = torch.ops.tq.chunk_gated_delta_rule(**args)
    o, state = _plans.run(OP, **args)
    assert o.dtype == dtype and state.dtype == F32
    _max_errors(name + "-o", ref_o, o)
    assert_close(name + "-o", ref_o.float(), o.float(), O_RATIO[dtype])
    assert state.shape == ref_state.shape
    if state.numel():
        _max_errors(name + "-state", ref_state, state)
        assert_close(name + "-state", ref_state, state, STATE_RATIO)
    if state_before is not None:
        assert torch.equal(args["initial_state"], state_before), "initial_state must not be modified"
    return o, state


CASES = [
    # id, B, T, H, HV, K, V, dtype, l2, initial_state, output_final_state, scale, cu_seqlens
    ("T130-varlen-gva-k64-l2-init", 1, 130, 2, 4, 64, 64, F32, True, True, True, None, CU),
    ("T64-gva-k128-v64-nol2-scale", 1, 64, 2, 4, 128, 64, F32, False, False, True, 0.3, None),
    ("T70-B2-k64-v64-l2-init", 2, 70, 1, 1, 64, 64, F32, True, True, True, None, None),
    ("T1-B2-gva-k64-v128-bf16-l2", 2, 1, 2, 4, 64, 128, BF16, True, True, False, 0.2, None),
    ("T64-k128-v64-f16-nol2", 1, 64, 1, 2, 128, 64, F16, False, False, True, None, None),
    ("T65-k256-v64-f16-l2-init", 1, 65, 1, 1, 256, 64, F16, True, True, True, None, None),
    ("T130-varlen-k64-bf16-nol2-nofinal", 1, 130, 1, 2, 64, 64, BF16, False, True, False, 0.5, CU),
    ("T1-k256-v256-l2-init", 1, 1, 1, 1, 256, 256, F32, True, True, True, None, None),
    # Every simdgroup owns value columns (V = 128) over three chunks, GVA; two column tiles (V = 256).
    ("T130-gva-k128-v128-l2-init", 1, 130, 1, 2, 128, 128, F32, True, True, True, None, None),
    ("T70-k64-v256-bf16-l2-init", 1, 70, 1, 1, 64, 256, BF16, True, True, True, 0.7, None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_chunk_gated_delta_rule(case):
    name, B, T, H, HV, K, V, dtype, l2, init, final, scale, cu = case
    args = entry_inputs(B, T, H, HV, K, V, dtype, l2, seed=len(name) * 7 + T, initial_state=init, cu_seqlens=cu)
    args.update(output_final_state=final, scale=scale)
    _, state = check_against_cpu(name, args, dtype)
    N = B if cu is None else len(cu) - 1
    assert tuple(state.shape) == ((N if final else 0), HV, K, V)
    if final and init and cu is not None:
        # The empty sequence returns its initial state unchanged.
        assert torch.equal(state[1], args["initial_state"][1])


def test_varlen_int64_offsets_strided_k_low_precision_gates():
    """int64 cu_seqlens, a non-contiguous k, and bfloat16/float16 g/beta (g read as given, beta as float32)."""
    args = entry_inputs(1, 9, 2, 2, 64, 64, F32, False, seed=5, initial_state=False, cu_seqlens=[0, 1, 9])
    args["cu_seqlens"] = args["cu_seqlens"].long()
    args["k"] = args["k"].transpose(1, 2).contiguous().transpose(1, 2)
    args["g"], args["beta"] = args["g"].bfloat16(), args["beta"].half()
    assert not args["k"].is_contiguous()
    check_against_cpu("varlen-int64", dict(args, output_final_state=True), F32)


def test_matches_the_recurrent_form():
    """The chunked form on the simulator against the CPU recurrence (a different algorithm: the
    token-by-token state update), float32, no l2norm, partial last chunk."""
    args = entry_inputs(1, 130, 1, 1, 64, 128, F32, False, seed=3)
    args.update(output_final_state=True)
    o, state = _plans.run(OP, **args)
    ref_o, ref_state = torch.ops.tq.fused_recurrent_gated_delta_rule(**args)
    _max_errors("vs-recurrent-o", ref_o, o)
    _max_errors("vs-recurrent-state", ref_state, state)
    assert_close("vs-recurrent-o", ref_o, o, 1e-5)
    assert_close("vs-recurrent-state", ref_state, state, 1e-5)


def test_float32_kernel_against_the_float64_reference_over_many_chunks():
    """Five chunks of state carried in float32 (two sequences, one of them a single token), GVA,
    l2norm, against the CPU op run in float64 on the same values: float32 rounding only."""
    args = entry_inputs(1, 300, 2, 4, 64, 128, F32, True, seed=17, cu_seqlens=[0, 1, 300])
    args.update(output_final_state=True)
    o, state = _plans.run(OP, **args)
    ref_o, ref_state = torch.ops.tq.chunk_gated_delta_rule(
        **{k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in args.items()})
    _max_errors("vs-float64-o", ref_o, o)
    _max_errors("vs-float64-state", ref_state, state)
    assert_close("vs-float64-o", ref_o, o.double(), 2e-6)
    assert_close("vs-float64-state", ref_state, state.double(), 2e-6)


# Every rule of the entry ops in the shared table; rows written for the recurrent op are checked
# against the chunked op's own CPU message (same rule, other op name).
ENTRY_BAD = [c for c in BAD_INPUTS if c[1] in ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule")]


@pytest.mark.parametrize("case_id, op, build, message", ENTRY_BAD, ids=[c[0] for c in ENTRY_BAD])
def test_plan_rejects_bad_input_like_the_cpu_op(case_id, op, build, message):
    assert_plan_rejects_like_the_cpu_op(OP, build())


def test_plan_rejects_float64_on_this_device():
    args = rule_args(dtype=torch.float64)
    assert _plans.plan(OP, **args)["error"] == (
        "tq.chunk_gated_delta_rule: q must be float32, float16 or bfloat16 on this device (float64 is CPU only), "
        "got torch.float64")


@pytest.mark.parametrize("l2", [False, True])
def test_plan_is_one_fused_launch_without_scratch(l2):
    """Qwen3-Next-like prefill (B=1, T=4096, H=16, HV=32, K=V=128, bfloat16): plan only."""
    B, T, H, HV, K, V = 1, 4096, 16, 32, 128, 128
    args = rule_args(B=B, T=T, H=H, HV=HV, K=K, V=V, dtype=BF16, initial_state=True)
    args["g"] = args["g"].to(BF16)  # converted to float32 by the host, like beta
    p = _plans.plan(OP, **dict(args, use_qk_l2norm_in_kernel=l2, output_final_state=False))
    assert p["error"] == ""
    assert p["outputs"] == [([B, T, HV, V], BF16), ([0, HV, K, V], F32)]
    assert p["input_dtypes"] == ["bfloat16"] * 3 + ["float32"] * 3 + ["int32"]
    [launch] = p["launches"]
    assert launch["kernel"] == "chunk_gated_delta_rule_bfloat16_k128"
    assert launch["grid"] == (1, HV, B) and launch["threads"] == (512, 1, 1)
    assert launch["threadgroup_memory"] == (64 * 64 + 4 * 64) * 4 <= 28 * 1024
    assert p["scratch_bytes"] == []


def test_plan_tiles_v256_and_walks_each_sequence():
    p = _plans.plan(OP, **rule_args(B=3, K=64, V=256))
    assert p["error"] == ""
    assert [launch["grid"] for launch in p["launches"]] == [(2, 4, 3)]


def test_plan_empty_batch_launches_nothing():
    p = _plans.plan(OP, **rule_args(B=0))
    assert p["error"] == "" and p["launches"] == [] and p["scratch_bytes"] == []
    assert p["outputs"] == [([0, 5, 4, 64], F32), ([0, 4, 64, 64], F32)]
