"""fused_recurrent_gated_delta_rule through its plan and the MSL simulator, against the CPU reference."""

import pytest
import torch

from _gated_delta_bad_inputs import rule_args
from _utils import assert_close
import _plans
from _gdr import assert_plan_rejects_like_the_cpu_op, entry_inputs

OP = "fused_recurrent_gated_delta_rule"
# Relative RMS error of o. The kernel and the reference read the same inputs and accumulate in
# float32, in a different order: float32 outputs differ by a few float32 ulps (measured <= 1e-6
# relative); float16/bfloat16 outputs additionally round to their dtype, where a float32 difference
# may flip the last bit (2^-11 and 2^-8 relative), so the bound is about one such ulp.
O_RATIO = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# The final state is float32 whatever the input dtype, so it is compared at float32 precision.
STATE_RATIO = 1e-5


def check_against_cpu(name, args, dtype):
    state_before = None if args["initial_state"] is None else args["initial_state"].clone()
    ref_o, ref_state = torch.ops.tq.fused_recurrent_gated_delta_rule(**args)
    o, state = _plans.run(OP, **args)
    assert o.dtype == dtype and state.dtype == torch.float32
    assert_close(name + "-o", ref_o.float(), o.float(), O_RATIO[dtype])
    assert state.shape == ref_state.shape
    if state.numel():
        assert_close(name + "-state", ref_state, state, STATE_RATIO)
    if state_before is not None:
        assert torch.equal(args["initial_state"], state_before), "initial_state must not be modified"
    return o, state


CASES = [
    # id, B, T, H, HV, K, V, dtype, l2, initial_state, output_final_state, scale
    ("decode-gva2-k128-v64", 2, 1, 2, 4, 128, 64, torch.float32, True, True, True, None),
    ("t5-gva2-k64-v128-nol2", 1, 5, 1, 2, 64, 128, torch.float32, False, False, True, None),
    ("t70-k256-v64-nostate", 1, 70, 1, 1, 256, 64, torch.float32, True, True, False, 0.3),
    ("t5-b2-k64-v256-nol2", 2, 5, 1, 1, 64, 256, torch.float32, False, False, False, None),
    ("t70-gva2-k128-v128", 1, 70, 1, 2, 128, 128, torch.float32, True, False, True, None),
    ("t5-f16-gva2-k64-v64", 1, 5, 2, 4, 64, 64, torch.float16, True, True, True, None),
    ("t5-bf16-k128-v64-nol2", 2, 5, 1, 2, 128, 64, torch.bfloat16, False, True, True, 0.2),
    ("decode-bf16-k64-v128", 3, 1, 1, 1, 64, 128, torch.bfloat16, True, True, True, None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_fused_recurrent_gated_delta_rule(case):
    name, B, T, H, HV, K, V, dtype, l2, init, final, scale = case
    args = entry_inputs(B, T, H, HV, K, V, dtype, l2, seed=len(name) * 7 + T, initial_state=init)
    args.update(output_final_state=final, scale=scale)
    _, state = check_against_cpu(name, args, dtype)
    assert tuple(state.shape) == ((B if final else 0), HV, K, V)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_sequences_do_not_share_state(dtype):
    """cu_seqlens with a sequence of length 0 in the middle: each sequence starts from its own
    initial state, and the empty one returns its initial state unchanged."""
    cu = [0, 6, 6, 13]
    args = entry_inputs(1, 13, 1, 2, 64, 64, dtype, True, seed=11, cu_seqlens=cu)
    args.update(output_final_state=True)
    o_all, state = check_against_cpu("varlen", args, dtype)
    assert torch.equal(state[1], args["initial_state"][1])
    # The same tokens as separate calls give the same outputs and states.
    for n, (a, b) in enumerate(zip(cu, cu[1:])):
        if a == b:
            continue
        one = {key: args[key][:, a:b] for key in ("q", "k", "v", "g", "beta")}
        o_n, s_n = _plans.run(OP, **one, initial_state=args["initial_state"][n : n + 1], output_final_state=True,
                              use_qk_l2norm_in_kernel=True)
        assert torch.equal(o_all[:, a:b], o_n)
        assert torch.equal(state[n : n + 1], s_n)


def test_varlen_int64_offsets_strided_q_low_precision_gates():
    """int64 cu_seqlens, a non-contiguous q, and bfloat16/float16 g/beta (read as float32)."""
    args = entry_inputs(1, 9, 2, 2, 128, 64, torch.float32, False, seed=5, initial_state=False, cu_seqlens=[0, 1, 9])
    args["cu_seqlens"] = args["cu_seqlens"].long()
    args["q"] = args["q"].transpose(1, 2).contiguous().transpose(1, 2)
    args["g"], args["beta"] = args["g"].bfloat16(), args["beta"].half()
    assert not args["q"].is_contiguous()
    check_against_cpu("varlen-int64", dict(args, output_final_state=False), torch.float32)


def _bad(**changes):
    args = rule_args()
    args.update(changes)
    return args


BAD = [
    ("head-dim", lambda: rule_args(K=96)),
    ("gva-ratio", lambda: rule_args(H=3, HV=4)),
    ("mixed-dtypes", lambda: _bad(k=torch.randn(1, 5, 2, 64, dtype=torch.float16))),
    ("state-dtype", lambda: _bad(initial_state=torch.zeros(1, 4, 64, 64, dtype=torch.float16))),
    ("state-shape", lambda: _bad(initial_state=torch.zeros(2, 4, 64, 64))),
    ("beta-shape", lambda: _bad(beta=torch.rand(1, 5, 2))),
    ("scale-inf", lambda: _bad(scale=float("inf"))),
    ("varlen-batch", lambda: rule_args(B=2) | dict(cu_seqlens=torch.tensor([0, 5]))),
    ("varlen-end", lambda: rule_args(cu_seqlens=[0, 2, 4])),
    ("varlen-order", lambda: rule_args(cu_seqlens=[0, 3, 2, 5])),
]


@pytest.mark.parametrize("build", [b for _, b in BAD], ids=[i for i, _ in BAD])
def test_plan_rejects_bad_input_like_the_cpu_op(build):
    assert_plan_rejects_like_the_cpu_op(OP, build())


def test_plan_shapes_and_launch():
    args = rule_args(B=2, T=3, H=2, HV=4, K=256, V=128, dtype=torch.bfloat16)
    p = _plans.plan(OP, **dict(args, output_final_state=False))
    assert p["error"] == ""
    assert p["outputs"] == [([2, 3, 4, 128], torch.bfloat16), ([0, 4, 256, 128], torch.float32)]
    assert p["input_dtypes"] == ["bfloat16"] * 3 + ["float32"] * 3 + ["int32"]
    (launch,) = p["launches"]
    assert launch["kernel"] == "fused_recurrent_gated_delta_rule_bfloat16_k256"
    assert launch["grid"] == (4, 4, 2) and launch["threads"] == (256, 1, 1)
    assert launch["threadgroup_memory"] <= 28 * 1024
    assert '"fused_recurrent_gated_delta_rule_"' in (_plans.KERNELS / "gated_delta_recurrent.metal").read_text()
    # B = 0: empty outputs, nothing to launch.
    empty = _plans.plan(OP, **rule_args(B=0))
    assert empty["error"] == "" and empty["launches"] == []


def test_decode_bytes_moved():
    """Decode (T=1, B=1, H=2, HV=4, K=V=128): the state is read once and written once, each input
    element is read once per threadgroup, and the whole launch moves <= 1.1x the minimum device
    bytes (state in and out, q/k/v/g/beta read once, o written once)."""
    B, H, HV, K, V = 1, 2, 4, 128, 128
    args = entry_inputs(B, 1, H, HV, K, V, torch.float32, True, seed=3)
    stats = []
    _plans.run(OP, **args, output_final_state=True, stats=stats)
    report = stats[0]["report"]
    state_bytes = B * HV * K * V * 4
    assert report.bytes_read[5] == state_bytes and report.bytes_written[8] == state_bytes
    assert report.bytes_written[7] == B * HV * V * 4
    minimum = 2 * state_bytes + 4 * (2 * B * H * K + 2 * B * HV * V + 2 * B * HV)
    moved = _plans.device_bytes(stats)
    assert moved <= 1.1 * minimum, f"{moved} bytes moved, minimum {minimum}"
