"""The MPS launch plans on their own: same error text as the Python validation, Apple limits respected."""

import itertools

import pytest
import torch

import torch_tq
from _bad_inputs import BAD_INPUTS, attention_args, copy_args, dequantize_args, quantize_args
import _plans


@pytest.mark.parametrize("case_id, op, build, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_plan_rejects_bad_input_with_the_validation_message(case_id, op, build, message):
    p = _plans.plan(op, **build())
    assert p["error"] == message
    assert p["launches"] == []


def test_plan_rejects_mixed_devices_like_the_validation():
    kwargs = quantize_args()
    kwargs["norms"] = kwargs["norms"].to("meta")
    with pytest.raises(ValueError) as exc:
        torch_tq.hadamard_quantize_kv(**kwargs)
    assert _plans.plan("hadamard_quantize_kv", **kwargs)["error"] == str(exc.value)


@pytest.mark.parametrize("softcap", [-1.0, -0.5, -1e-05, -1e16, -123.25])
def test_plan_formats_floats_like_python(softcap):
    p = _plans.plan("flash_attn_vec_tq", **attention_args(softcap=softcap))
    assert p["error"] == f"tq.flash_attn_vec_tq: softcap must be >= 0 (0 = off), got {softcap}"


def _check_limits(p):
    assert p["error"] == ""
    for launch in p["launches"]:
        threads = launch["threads"][0] * launch["threads"][1] * launch["threads"][2]
        assert 0 < threads <= 1024 and threads % 32 == 0, launch["kernel"]
        assert launch["threadgroup_memory"] <= 28 * 1024, launch["kernel"]
        assert len(launch["params"]) <= 4096, launch["kernel"]
        assert all(g >= 1 for g in launch["grid"]), launch["kernel"]
    for bits in (p["codebook_bits"], p["second_codebook_bits"]):
        if bits:
            assert _plans.codebook_tensor(bits).numel() * 4 <= 4096


@pytest.mark.parametrize("D, bits", list(itertools.product((64, 128, 256, 512), (2, 3, 4, 5, 6, 8))))
def test_plan_respects_apple_limits(D, bits):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        p = _plans.plan("hadamard_quantize_kv", **quantize_args(D=D, bits=bits, src_dtype=dtype))
        _check_limits(p)
        assert p["launches"][0]["kernel"] == f"hadamard_quantize_kv_{str(dtype)[6:]}_d{D}_b{bits}"
        args = attention_args(Hq=32, Hkv=4, Lq=3, D=D, C=64, kv_len=60, bits=bits)
        args["q"] = args["q"].to(dtype)
        p = _plans.plan("flash_attn_vec_tq", **args)
        _check_limits(p)
        assert [l["kernel"] for l in p["launches"]] == [f"flash_attn_vec_tq_{str(dtype)[6:]}_d{D}_b{bits}",
                                                         f"flash_attn_vec_tq_reduce_{str(dtype)[6:]}_d{D}"]
    _check_limits(_plans.plan("dequantize_kv", **dequantize_args(D=D, bits=bits)))


@pytest.mark.parametrize("D", (64, 128, 256, 512))
def test_value_width_and_windows_are_runtime_parameters(D):
    """k8v2 with float32/float16/bfloat16 windows runs the keys' 8-bit kernel: neither the values' width nor the
    window dtypes multiply the instantiations; the values' codebook is the second codebook binding."""
    args = attention_args(Hq=32, Hkv=4, Lq=3, D=D, C=64, kv_len=60, bits=8)
    args["q"] = args["q"].half()
    args.update(v_bits=2, v_codes=torch.zeros(1, 4, 64, D * 2 // 8, dtype=torch.uint8), v_norms=args["v_norms"],
                k_sink=torch.zeros(1, 4, 4, D), v_sink=torch.zeros(1, 4, 4, D, dtype=torch.bfloat16),
                k_recent=torch.zeros(1, 4, 32, D, dtype=torch.float16), v_recent=torch.zeros(1, 4, 32, D))
    p = _plans.plan("flash_attn_vec_tq", **args)
    _check_limits(p)
    assert [l["kernel"] for l in p["launches"]] == [f"flash_attn_vec_tq_float16_d{D}_b8", f"flash_attn_vec_tq_reduce_float16_d{D}"]
    assert (p["codebook_bits"], p["second_codebook_bits"]) == (8, 2)
    assert p["launches"][0]["bindings"][11] == (_plans.ARG_CODEBOOK, 1)
    assert [b for b in p["launches"][0]["bindings"][12:]] == [(_plans.ARG_INPUT, i) for i in (8, 9, 10, 11)]
    q = _plans.plan("hadamard_quantize_kv", **dict(quantize_args(D=D, bits=2, src_dtype=torch.bfloat16),
                                                   offset=torch.zeros(1, 2, D), norm_correction=True,
                                                   sink=torch.zeros(1, 2, 4, D), recent=torch.zeros(1, 2, 8, D, dtype=torch.float16)))
    _check_limits(q)
    assert [l["kernel"] for l in q["launches"]] == [f"hadamard_quantize_kv_bfloat16_d{D}_b2"]
    assert q["launches"][0]["bindings"][6:] == [(_plans.ARG_INPUT, i) for i in (4, 5, 6)]


def test_plan_names_only_instantiated_kernels():
    """Every host name a plan can produce is instantiated by a .metal file (names follow the templates)."""
    text = "".join(p.read_text() for p in _plans.KERNELS.glob("*.metal"))
    for prefix in ("hadamard_quantize_kv_", "dequantize_kv_float32_d", "flash_attn_vec_tq_", "flash_attn_vec_tq_reduce_",
                   "kv_cache_copy_"):
        assert f'"{prefix}' in text


def test_empty_calls_launch_nothing():
    assert _plans.plan("kv_cache_copy", **copy_args(T=0))["launches"] == []
    assert _plans.plan("hadamard_quantize_kv", **quantize_args(T=0))["launches"] == []
    assert _plans.plan("dequantize_kv", **dequantize_args(length=0))["launches"] == []


def test_decode_attention_split_count_targets_the_bytes_budget():
    """B=1, Hq=32, Hkv=8, D=128: 8 splits of 512 keys (partials stay a few % of the KV bytes)."""
    args = attention_args(B=1, Hq=32, Hkv=8, Lq=1, D=128, C=4096, kv_len=4096, bits=4)
    p = _plans.plan("flash_attn_vec_tq", **args)
    assert p["launches"][0]["grid"] == (8, 8, 1)


@pytest.mark.parametrize("D, group, tiles", [(64, 8, 1), (128, 8, 1), (128, 9, 2), (256, 4, 1), (512, 2, 1), (512, 4, 2)])
def test_gqa_group_reads_its_kv_head_once(D, group, tiles):
    """All query heads of a GQA group (up to 8 for D <= 128) share one pass over their KV head."""
    args = attention_args(B=1, Hq=2 * group, Hkv=2, Lq=1, D=D, C=512, kv_len=512, bits=4)
    grid = _plans.plan("flash_attn_vec_tq", **args)["launches"][0]["grid"]
    assert grid[1] == 2 * tiles


def test_per_sequence_device_lengths_are_refused_with_a_clear_error():
    """cache_seqlens (CUDA graphs) is not implemented by the Metal kernels: the plans say so."""
    k_codes, k_norms = torch_tq.allocate_quantized_kv(2, 2, 16, 64, 4)
    lens = torch.zeros(2, dtype=torch.int32)
    p = _plans.plan("hadamard_quantize_kv", src=torch.randn(2, 1, 2, 64), codes=k_codes, norms=k_norms, write_pos=0,
                    cache_seqlens=lens)
    assert p["error"].startswith("tq.hadamard_quantize_kv: cache_seqlens (per-sequence lengths read on the device) "
                                 "is not supported by the Metal kernels yet"), p["error"]
    p = _plans.plan("flash_attn_vec_tq", q=torch.randn(2, 4, 1, 64), k_codes=k_codes, k_norms=k_norms, v_codes=k_codes,
                    v_norms=k_norms, kv_len=16, scale=0.125, cache_seqlens=lens)
    assert "cache_seqlens (per-sequence lengths read on the device) is not supported by the Metal kernels" in p["error"]
