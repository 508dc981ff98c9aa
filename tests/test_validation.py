"""Bad inputs get one clear ValueError naming the argument, and nothing is written; opcheck on every op."""

import re

import pytest
import torch

import torch_tq
from _bad_inputs import BAD_INPUTS, attention_args, copy_args, dequantize_args, quantize_args

MUTATED = {"hadamard_quantize_kv": ("codes", "norms", "sink", "recent"), "kv_cache_copy": ("cache",)}


@pytest.mark.parametrize("case_id, op, build, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
@pytest.mark.parametrize("entry", ["wrapper", "torch.ops", "fake"])
def test_bad_input_is_rejected_before_any_write(case_id, op, build, message, entry):
    kwargs = build()
    before = {name: kwargs[name].clone() for name in MUTATED.get(op, ())
              if kwargs.get(name) is not None and kwargs[name].is_contiguous()}
    if entry == "wrapper":
        fn = getattr(torch_tq, op)
    elif entry == "torch.ops":
        fn = getattr(torch.ops.tq, op)
    else:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode()
        kwargs = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        before = {}

        def fn(**kw):
            with mode:
                return getattr(torch.ops.tq, op)(**kw)

    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        fn(**kwargs)
    for name, value in before.items():
        assert torch.equal(kwargs[name], value), f"{name} was modified although validation failed"


def test_mixed_devices_are_rejected():
    kwargs = quantize_args()
    kwargs["norms"] = kwargs["norms"].to("meta")
    with pytest.raises(ValueError, match=r"^tq.hadamard_quantize_kv: norms is on meta but src is on cpu"):
        torch_tq.hadamard_quantize_kv(**kwargs)


def test_unavailable_backend_error_names_the_reason():
    from torch_tq.backends import registered_backend_error

    reason = registered_backend_error("flash_attn_vec_tq", torch.device("cuda"))
    assert reason.startswith("tq.flash_attn_vec_tq: no implementation for device 'cuda': ")


def test_mps_warmup_without_mps_warns_why_and_compiles_nothing():
    from torch_tq.backends import mps

    available, reason = mps.status()
    if available:
        pytest.skip("MPS is available here: warmup() compiles the Metal kernels")
    with pytest.warns(RuntimeWarning, match=r"^torch_tq.backends.mps.warmup\(\): nothing to compile: ") as record:
        assert mps.warmup() == []
    assert reason in str(record[0].message)


def _valid_samples():
    q = quantize_args(B=2, T=3, Hkv=2, D=128, C=8, bits=3, write_pos=6, is_sliding=True, src_dtype=torch.float16)
    a = attention_args(B=2, Hq=4, Hkv=2, Lq=2, D=64, C=8, kv_len=11, bits=4, sliding_window=6, softcap=10.0)
    a["kv_start"] = torch.tensor([0, 4])
    # The decode path's options: offset, norm correction and full-precision windows; v_bits and windows.
    qw = quantize_args(B=2, T=3, Hkv=2, D=64, C=8, bits=4, write_pos=2)
    qw.update(offset=torch.randn(2, 2, 64), norm_correction=True, sink=torch.randn(2, 2, 4, 64),
              recent=torch.randn(2, 2, 4, 64).half())
    aw = attention_args(B=2, Hq=4, Hkv=2, Lq=2, D=64, C=8, kv_len=7, bits=4)
    aw["v_codes"], aw["v_norms"] = torch_tq.allocate_quantized_kv(2, 2, 8, 64, 2)
    aw["v_norms"].uniform_(0.5, 2)
    aw.update(v_bits=2, k_sink=torch.randn(2, 2, 2, 64), v_sink=torch.randn(2, 2, 2, 64),
              k_recent=torch.randn(2, 2, 3, 64).bfloat16(), v_recent=torch.randn(2, 2, 3, 64).bfloat16())
    return [
        ("hadamard_quantize_kv", q),
        ("hadamard_quantize_kv_windows", qw),
        ("flash_attn_vec_tq_windows", aw),
        ("dequantize_kv", dequantize_args(B=2, D=256, bits=5, start=5, length=7)),
        ("flash_attn_vec_tq", a),
        ("kv_cache_copy", copy_args(T=10, C=8, write_pos=3, is_sliding=True)),
    ]


@pytest.mark.parametrize("op, kwargs", _valid_samples(), ids=[s[0] for s in _valid_samples()])
def test_opcheck(op, kwargs):
    # Mutated caches start from real data so opcheck's before/after comparisons see the writes.
    for name in (n for n in MUTATED.get(op.removesuffix("_windows"), ()) if kwargs.get(n) is not None):
        kwargs[name] = torch.rand_like(kwargs[name].float()).mul(200).to(kwargs[name].dtype)
    torch.library.opcheck(getattr(torch.ops.tq, op.removesuffix("_windows")).default, args=(), kwargs=kwargs)
