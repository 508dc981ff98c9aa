"""The host code of mps_ops/torch_tq_mps.mm, compiled on this machine without its Metal parts.

``_host_code`` drops the two Objective-C/Metal sections of the .mm, puts in their place an
``encode`` that launches nothing but checks every binding (input/output/scratch index in range,
bound input defined, contiguous and of the dtype the plan reads) and records the kernel names,
compiles the rest with the system C++ compiler against the installed torch and loads it. Then:

* loading it at all means every ``m.impl`` of ``TORCH_LIBRARY_IMPL(tq, MPS, m)`` matches the
  schema torch_tq defines in Python (a mismatch fails the load); all 12 ops get an MPS kernel;
* every op's MPS kernel, called on CPU tensors through ``redispatch``, returns what the CPU op
  returns (structure, shapes, dtypes; values are not computed), encodes the kernels of the plan
  the simulator tests execute (``_plans.plan``), binds only what exists, and hands encode() the
  inputs the simulator binds (schema order, the plan's dtypes, in-place tensors themselves);
* bad inputs raise ValueError with exactly the CPU op's text (check_plan: TORCH_CHECK_VALUE).

The compile (~30 s to a minute, torch/extension.h) is cached by content hash in $TQ_SIM_CACHE.
"""

from __future__ import annotations

import pytest
import torch

import _host_code
import _plans
import torch_tq
from _bad_inputs import BAD_INPUTS, attention_args, copy_args, dequantize_args, quantize_args
from _gated_delta_bad_inputs import BAD_INPUTS as GDR_BAD_INPUTS
from _gated_delta_bad_inputs import cumsum_args, h_args, kkt_args, o_args, rule_args, solve_args, wu_args
from _gdr import CU, entry_inputs
from torch_tq import _gated_delta_ops, _ops

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
OPS = sorted([*_ops.SCHEMAS, *_gated_delta_ops.SCHEMAS])

_REASON = _host_code.unavailable()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.fixture(scope="module", autouse=True)
def host_library():
    lib = _host_code.library()  # compile errors and registration mismatches fail here, loudly
    _host_code.launched()  # start from an empty record
    return lib


def clone(kwargs: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _flat(result) -> list:
    if result is None:
        return []
    return [result] if isinstance(result, torch.Tensor) else list(result)


# ---- the source and the registrations ----------------------------------------------------------

def test_source_drops_only_the_metal_sections():
    text = _host_code.source()
    mm = _host_code.MM.read_text()
    assert "#import" in mm and "#import" not in text
    assert "torch_tq_metal_source.h" not in text  # generated on macOS builds only
    assert "TORCH_LIBRARY_IMPL(tq, MPS, m)" in text and "void check_plan(" in text
    for op in OPS:
        assert f'm.impl("{op}", &{op}_mps);' in text


def test_every_op_has_an_mps_kernel_matching_its_schema():
    assert len(OPS) == 12
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tq::{op}", "MPS"), op
        # The CPU kernel is still torch_tq's (loading added MPS kernels only).
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tq::{op}", "CPU"), op


@pytest.mark.parametrize("kind, index, error", [
    (_plans.ARG_INPUT, 0, None), (_plans.ARG_INPUT, 1, "which is undefined"), (_plans.ARG_INPUT, 2, "binds input 2 of 2"),
    (_plans.ARG_INPUT, -1, "binds input -1 of 2"), (_plans.ARG_OUTPUT, 0, None), (_plans.ARG_OUTPUT, 1, "binds output 1 of 1"),
    (_plans.ARG_SCRATCH, 0, None), (_plans.ARG_SCRATCH, 1, "binds scratch 1 of 1"), (_plans.ARG_PARAMS, 0, None),
    (_plans.ARG_CODEBOOK, 0, "binds the codebook of a plan without one"), (_plans.ARG_DUMMY, 0, None),
    (_plans.ARG_CANONICAL_SIGNS, 0, "binds the canonical signs of a plan without them"),
    (7, 0, "unknown binding kind 7"),
])
def test_the_stub_encoder_rejects_bad_bindings(kind, index, error):
    """The checks of the stub encode() are live: one launch with one binding against 2 inputs (the
    second undefined), 1 output, 1 scratch buffer, no codebook and no canonical signs."""
    if error is None:
        torch.ops.tq_host_check.encode_probe(kind, index)
        assert _host_code.launched() == ["probe"]
    else:
        with pytest.raises(RuntimeError, match=error):
            torch.ops.tq_host_check.encode_probe(kind, index)
        assert _host_code.launched() == []


# ---- valid calls: outputs like the CPU op, the simulator's launches ------------------------------

def _strided_q(B=1, Hq=4, Lq=1, D=64, dtype=F32):
    return torch.randn(B, Lq, Hq, D).to(dtype).transpose(1, 2)  # [B, Hq, Lq, D], not contiguous


def _entry(B, T, H, HV, K, V, dtype, l2, initial_state=True, cu_seqlens=None, scale=None, final=True):
    args = entry_inputs(B, T, H, HV, K, V, dtype, l2, seed=0, initial_state=initial_state, cu_seqlens=cu_seqlens)
    return dict(args, scale=scale, output_final_state=final)


# Tensors written in place: bound as the caller's own storage, never a converted copy.
IN_PLACE = {"codes", "norms", "cache", "lse", "sink", "recent"}


def check_bound_inputs(op, args, plan, bound):
    """The inputs encode() got are those the simulator binds (_plans.run): the op's tensor arguments in
    schema order (_plans.OP_TENSORS, the Arg::Input indices of the plans), in the dtype the plan reads
    (plan["input_dtypes"]); the in-place ones are the caller's tensors themselves."""
    if not plan["launches"]:
        assert bound == []  # nothing encoded
        return
    names = _plans.OP_TENSORS[op]
    args = {**_plans.OP_DEFAULTS[op], **args}
    assert len(bound) == len(names), bound
    for i, (name, b) in enumerate(zip(names, bound)):
        t = args[name]
        if t is None:
            assert b is None, name
            continue
        dtype = plan["input_dtypes"][i] if i < len(plan["input_dtypes"]) and plan["input_dtypes"][i] else \
            str(t.dtype).removeprefix("torch.")
        assert b is not None and b[:2] == (dtype, list(t.shape)), (name, b)
        if name in IN_PLACE:
            assert b[2] == t.data_ptr(), f"{name} is bound as a copy"


VALID = [
    ("copy", "kv_cache_copy", copy_args),
    ("copy-ring-f16", "kv_cache_copy",
     lambda: dict(copy_args(T=10, C=8, write_pos=5, is_sliding=True), cache=torch.zeros(1, 2, 8, 64, dtype=F16))),
    ("copy-empty", "kv_cache_copy", lambda: copy_args(T=0)),
    ("quantize", "hadamard_quantize_kv", quantize_args),
    ("quantize-bf16-d128-b3-ring", "hadamard_quantize_kv",
     lambda: quantize_args(D=128, bits=3, T=10, C=8, write_pos=3, is_sliding=True, src_dtype=BF16)),
    ("quantize-strided-src-no-signs", "hadamard_quantize_kv",
     lambda: dict(quantize_args(), src=torch.randn(1, 2, 3, 64).transpose(1, 2), signs=None)),
    ("quantize-empty", "hadamard_quantize_kv", lambda: quantize_args(T=0)),
    ("quantize-offset-correction-windows", "hadamard_quantize_kv",
     lambda: dict(quantize_args(T=3, C=8, write_pos=2), offset=torch.randn(1, 2, 64), norm_correction=True,
                  sink=torch.zeros(1, 2, 4, 64, dtype=BF16), recent=torch.zeros(1, 2, 5, 64, dtype=F16))),
    ("quantize-ring-sink-past-s-no-signs", "hadamard_quantize_kv",
     lambda: dict(quantize_args(T=10, C=8, write_pos=6, is_sliding=True), signs=None,
                  sink=torch.zeros(1, 2, 4, 64), recent=torch.zeros(1, 2, 8, 64))),
    ("dequantize", "dequantize_kv", dequantize_args),
    ("dequantize-rotated-d512-b2", "dequantize_kv", lambda: dict(dequantize_args(D=512, bits=2, start=3), rotated=True)),
    ("dequantize-empty", "dequantize_kv", lambda: dequantize_args(length=0)),
    ("attn", "flash_attn_vec_tq", attention_args),
    ("attn-lse-kv-start-strided-q", "flash_attn_vec_tq",
     lambda: dict(attention_args(B=2, Lq=3, kv_len=6), q=_strided_q(B=2, Lq=3),
                  kv_start=torch.tensor([0, 2]), lse=torch.empty(2, 4, 3))),
    ("attn-f16-d128-b8-window-softcap-no-signs", "flash_attn_vec_tq",
     lambda: dict(attention_args(D=128, bits=8, C=8, kv_len=11, sliding_window=6, softcap=30.0),
                  q=torch.randn(1, 4, 1, 128, dtype=F16), signs=None)),
    ("attn-bf16-lse", "flash_attn_vec_tq",
     lambda: dict(attention_args(), q=torch.randn(1, 4, 1, 64, dtype=BF16), lse=torch.empty(1, 4, 1))),
    ("attn-k8v3-windows-mixed-dtypes", "flash_attn_vec_tq",
     lambda: dict(attention_args(bits=8, kv_len=7), v_codes=torch.zeros(1, 2, 8, 24, dtype=torch.uint8),
                  q=torch.randn(1, 4, 1, 64, dtype=F16), lse=torch.empty(1, 4, 1), v_bits=3,
                  k_sink=torch.randn(1, 2, 2, 64), v_sink=torch.randn(1, 2, 2, 64, dtype=BF16),
                  k_recent=torch.randn(1, 2, 3, 64, dtype=F16), v_recent=torch.randn(1, 2, 3, 64))),
    ("attn-recent-only-v-bits-equal", "flash_attn_vec_tq",
     lambda: dict(attention_args(), v_bits=4, k_recent=torch.randn(1, 2, 8, 64), v_recent=torch.randn(1, 2, 8, 64))),
    ("recurrent", "fused_recurrent_gated_delta_rule", lambda: _entry(2, 3, 2, 4, 64, 64, F32, True)),
    ("recurrent-varlen-bf16-k128-nofinal", "fused_recurrent_gated_delta_rule",
     lambda: _entry(1, 130, 1, 2, 128, 64, BF16, False, cu_seqlens=CU, scale=0.3, final=False)),
    ("recurrent-strided-q-int64-offsets", "fused_recurrent_gated_delta_rule",
     lambda: dict(rule_args(cu_seqlens=[0, 2, 5]), q=torch.randn(1, 2, 5, 64).transpose(1, 2))),
    ("chunk", "chunk_gated_delta_rule", lambda: _entry(1, 70, 2, 4, 64, 64, F32, True)),
    ("chunk-varlen-f16-nol2-scale", "chunk_gated_delta_rule",
     lambda: _entry(1, 130, 1, 2, 64, 128, F16, False, cu_seqlens=CU, scale=0.5)),
    ("chunk-bf16-no-state-nofinal", "chunk_gated_delta_rule",
     lambda: _entry(2, 5, 2, 2, 128, 64, BF16, True, initial_state=False, final=False)),
    ("cumsum", "chunk_local_cumsum", cumsum_args),
    ("cumsum-varlen-reverse-scale-f16", "chunk_local_cumsum",
     lambda: dict(chunk_size=16, reverse=True, scale=1.5, g=-torch.rand(1, 130, 2).half(),
                  cu_seqlens=torch.tensor(CU))),
    ("kkt", "chunk_scaled_dot_kkt", kkt_args),
    ("kkt-varlen-bf16-k", "chunk_scaled_dot_kkt",
     lambda: dict(kkt_args(T=70), k=torch.randn(1, 70, 2, 64, dtype=BF16),
                  cu_seqlens=torch.tensor([0, 66, 66, 70], dtype=torch.int32))),
    ("solve", "solve_tril", solve_args),
    ("solve-varlen", "solve_tril", lambda: dict(solve_args(T=70), cu_seqlens=torch.tensor([0, 66, 66, 70]))),
    ("wu", "recompute_w_u", wu_args),
    ("wu-varlen-f16-kv", "recompute_w_u",
     lambda: dict(wu_args(T=70), k=torch.randn(1, 70, 2, 64).half(), v=torch.randn(1, 70, 4, 64).half(),
                  cu_seqlens=torch.tensor([0, 66, 66, 70]))),
    ("h", "chunk_fwd_h", h_args),
    ("h-varlen-state", "chunk_fwd_h",
     lambda: dict(h_args(T=70), initial_state=torch.randn(3, 4, 64, 64), cu_seqlens=torch.tensor([0, 66, 66, 70]))),
    ("o", "chunk_fwd_o", o_args),
    ("o-varlen-scale-bf16-qk", "chunk_fwd_o",
     lambda: dict(o_args(T=70), q=torch.randn(1, 70, 2, 64, dtype=BF16), k=torch.randn(1, 70, 2, 64, dtype=BF16),
                  h=torch.randn(1, 3, 4, 64, 64), scale=0.25, cu_seqlens=torch.tensor([0, 66, 66, 70]))),
]


def test_valid_cases_cover_every_op():
    assert sorted({op for _, op, _ in VALID}) == OPS


@pytest.mark.parametrize("case_id, op, build", VALID, ids=[c[0] for c in VALID])
def test_mps_kernel_returns_like_the_cpu_op_and_encodes_the_plan(case_id, op, build):
    args = build()
    plan = _plans.plan(op, **args)
    assert plan["error"] == "", plan["error"]
    ref = getattr(torch.ops.tq, op)(**clone(args))
    mps_args = clone(args)
    out = _host_code.call_mps(op, **mps_args)
    launched = _host_code.launched()
    check_bound_inputs(op, mps_args, plan, _host_code.bound_inputs())
    assert (out is None) == (ref is None) and type(out) is type(ref)
    ref, out = _flat(ref), _flat(out)
    assert len(out) == len(ref) == len(plan["outputs"])
    for i, (r, o) in enumerate(zip(ref, out)):
        assert (o.shape, o.dtype, o.device) == (r.shape, r.dtype, r.device), f"output {i}"
        assert o.is_contiguous(), f"output {i}"
    assert launched == [launch["kernel"] for launch in plan["launches"]]


@pytest.mark.parametrize("op", ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"])
def test_empty_batch_returns_the_plan_outputs_and_launches_nothing(op):
    """B = 0 (compared with the plan: the CPU reference does not take B = 0 yet)."""
    args = rule_args(B=0)
    plan = _plans.plan(op, **args)
    out = _host_code.call_mps(op, **args)
    assert [(list(o.shape), o.dtype) for o in out] == plan["outputs"] == [([0, 5, 4, 64], F32), ([0, 4, 64, 64], F32)]
    assert plan["launches"] == [] and _host_code.launched() == []


def test_in_place_outputs_and_lse_are_the_callers_tensors():
    """kv_cache_copy/hadamard_quantize_kv return nothing; flash_attn_vec_tq returns a fresh tensor and binds lse."""
    args = dict(attention_args(), lse=torch.full((1, 4, 1), 7.0))
    lse = args["lse"]
    out = _host_code.call_mps("flash_attn_vec_tq", **args)
    assert out.data_ptr() != lse.data_ptr() and args["lse"] is lse
    assert _host_code.launched() == [launch["kernel"] for launch in _plans.plan("flash_attn_vec_tq", **args)["launches"]]
    assert _host_code.bound_inputs()[7][2] == lse.data_ptr()
    assert _host_code.call_mps("kv_cache_copy", **copy_args()) is None
    assert _host_code.call_mps("hadamard_quantize_kv", **quantize_args()) is None
    _host_code.launched()
    _host_code.bound_inputs()


# ---- bad inputs: the CPU op's ValueError, word for word ------------------------------------------

def _mixed_devices():
    args = quantize_args()
    args["norms"] = args["norms"].to("meta")
    return args


BAD = [(case_id, op, build) for case_id, op, build, _ in [*BAD_INPUTS, *GDR_BAD_INPUTS]] + [
    ("quantize-mixed-devices", "hadamard_quantize_kv", _mixed_devices),
]


def test_bad_inputs_cover_every_op():
    assert sorted({op for _, op, _ in BAD}) == OPS


@pytest.mark.parametrize("case_id, op, build", BAD, ids=[c[0] for c in BAD])
def test_mps_kernel_raises_the_cpu_op_value_error(case_id, op, build):
    args = build()
    with pytest.raises(ValueError) as cpu:
        getattr(torch.ops.tq, op)(**clone(args))
    with pytest.raises(ValueError) as mps:
        _host_code.call_mps(op, **args)
    assert str(mps.value) == str(cpu.value)
    assert _host_code.launched() == []


def test_float64_is_rejected_on_this_device_with_the_plan_text():
    args = rule_args(dtype=torch.float64)
    with pytest.raises(ValueError) as exc:
        _host_code.call_mps("chunk_gated_delta_rule", **args)
    assert str(exc.value) == _plans.plan("chunk_gated_delta_rule", **args)["error"] == (
        "tq.chunk_gated_delta_rule: q must be float32, float16 or bfloat16 on this device (float64 is CPU only), "
        "got torch.float64")


def test_public_wrappers_still_run_the_cpu_reference():
    """The MPS kernels are only reached by MPS tensors (or redispatch): CPU calls are unchanged."""
    args = copy_args()
    torch_tq.kv_cache_copy(**args)
    assert torch.equal(args["cache"][:, :, :3], args["src"].transpose(1, 2))
    assert _host_code.launched() == []
