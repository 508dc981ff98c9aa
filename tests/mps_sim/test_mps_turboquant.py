"""hadamard_quantize_kv and dequantize_kv through their plans and the MSL simulator, against the CPU reference.

Codes compare exactly, except near ties: the kernel's block norm sums in a different order than
torch.linalg.vector_norm, so u may differ by an ulp or two; a differing code must then be adjacent
to the reference's and the reference's u must lie within 1e-5 of the boundary between the two.
Decoding runs the reference's butterflies and scalings in the same order; it matches to a few ulps
of the row's largest value, not bit for bit: each decoded value (centroid x norm) feeds the first
butterfly add, which Apple's compiler, like TQ_SIM_FP_CONTRACT=fast here, may fuse into one fma.
"""

import itertools
import math

import pytest
import torch

import torch_tq
from torch_tq.backends.cpu.turboquant import rotate
from torch_tq.codebooks import decision_boundaries, lloyd_max_codebook
from torch_tq.layout import rotation_block, unpack_codes
import _plans

POISON = 0xA5
DTYPE_CYCLE = (torch.float32, torch.float16, torch.bfloat16)
DIMS = (64, 128, 256, 512)
BITS = (2, 3, 4, 5, 6, 8)

# Every (D, bits) pair once, with the source dtype, sign vector and ring geometry varying along.
QUANTIZE_CASES = []
for i, (D, bits) in enumerate(itertools.product(DIMS, BITS)):
    dtype = DTYPE_CYCLE[i % 3]
    sliding = i % 2 == 1
    # id, B, T, Hkv, D, C, write_pos, is_sliding, bits, dtype, use_signs
    if sliding:
        case = (f"D{D}-b{bits}-{str(dtype)[6:]}-ring", 2, 7, 2, D, 5, 3, True, bits, dtype, i % 4 != 1)
    else:
        case = (f"D{D}-b{bits}-{str(dtype)[6:]}-global", 1, 3, 3, D, 6, 2, False, bits, dtype, i % 4 != 2)
    QUANTIZE_CASES.append(case)


def reference_u(src, first, bits, signs):
    """The reference's normalised rotated coordinates u, float32 [B, Hkv, T', D]."""
    x = src[:, first:].transpose(1, 2)
    D = x.shape[-1]
    R = rotation_block(D)
    y = rotate(x, signs).reshape(*x.shape[:-1], D // R, R)
    norms = torch.linalg.vector_norm(y, dim=-1)
    inv = torch.where(norms > 0, math.sqrt(R) / norms, torch.zeros_like(norms))
    return (y * inv.unsqueeze(-1)).reshape(x.shape)


def assert_decoded_close(name, out, ref):
    """Equal up to ~16 float32 ulps of the largest |value|: a fused first butterfly stage (fma)
    rounds each product once less (mps_ops/sim/README.md, "Floating point"); any wrong code,
    sign, norm or butterfly is off by far more."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if out.numel():
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-6 * float(ref.abs().max()), msg=lambda m: f"{name}: {m}")


def assert_codes_match(name, out_codes, ref_codes, u, bits):
    """Exact, or adjacent at a documented near tie (|u - boundary| <= 1e-5)."""
    out = unpack_codes(out_codes, bits)
    ref = unpack_codes(ref_codes, bits)
    diff = out != ref
    if not diff.any():
        return
    assert ((out - ref).abs()[diff] == 1).all(), f"{name}: non-adjacent code mismatch"
    boundary = decision_boundaries(bits)[torch.minimum(out, ref)[diff]]
    gap = (u[diff] - boundary).abs()
    assert (gap <= 1e-5).all(), f"{name}: codes differ {int(diff.sum())}x away from a tie (gap {gap.max():.3e})"


@pytest.mark.parametrize("case", QUANTIZE_CASES, ids=lambda c: c[0])
def test_hadamard_quantize_kv(case):
    name, B, T, Hkv, D, C, write_pos, is_sliding, bits, dtype, use_signs = case
    signs = torch_tq.hadamard_signs(D) if use_signs else None
    src = (torch.randn(B, T, Hkv, D) * 2).to(dtype)
    src[0, -1, 0] = 0  # a zero vector stores norm 0 and u = 0
    codes, norms = torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits)
    codes.fill_(POISON)
    norms.fill_(float("nan"))
    ref_codes, ref_norms = codes.clone(), norms.clone()
    torch.ops.tq.hadamard_quantize_kv(src, ref_codes, ref_norms, write_pos, is_sliding, bits, signs)
    _plans.run("hadamard_quantize_kv", src=src, codes=codes, norms=norms, write_pos=write_pos,
               is_sliding=is_sliding, bits=bits, signs=signs)

    first = max(0, T - C) if is_sliding else 0
    slots = torch.arange(write_pos + first, write_pos + T) % C
    untouched = torch.ones(C, dtype=torch.bool)
    untouched[slots] = False
    assert (codes[:, :, untouched] == POISON).all() and norms[:, :, untouched].isnan().all(), "wrote outside the new slots"
    assert not norms[:, :, slots].isnan().any(), "unwritten norms"
    torch.testing.assert_close(norms[:, :, slots], ref_norms[:, :, slots], rtol=1e-6, atol=0)
    u = reference_u(src, first, bits, signs)
    assert_codes_match(name, codes[:, :, slots], ref_codes[:, :, slots], u, bits)
    # The zero vector is an exact tie (u = 0 = the middle boundary): lower index, norm 0, exactly.
    zero_slot = (write_pos + T - 1) % C
    assert (norms[0, 0, zero_slot] == 0).all()
    assert (unpack_codes(codes[0, 0, zero_slot], bits) == (1 << bits) // 2 - 1).all()


def test_hadamard_quantize_kv_strided_src():
    src = torch.randn(2, 2, 4, 128).transpose(1, 2)  # [B, T=4, Hkv=2, D], non-contiguous
    codes, norms = torch_tq.allocate_quantized_kv(2, 2, 4, 128, 4)
    ref_codes, ref_norms = codes.clone(), norms.clone()
    torch.ops.tq.hadamard_quantize_kv(src, ref_codes, ref_norms, 0, False, 4, None)
    _plans.run("hadamard_quantize_kv", src=src, codes=codes, norms=norms, write_pos=0, bits=4)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-6, atol=0)
    assert_codes_match("strided", codes, ref_codes, reference_u(src, 0, 4, None), 4)


# id, B, Hkv, D, C, bits, start, length, rotated, use_signs
DEQUANTIZE_CASES = [
    ("D64-b3-wrap-rotated", 2, 2, 64, 8, 3, 6, 5, True, True),
    ("D64-b3-wrap", 2, 2, 64, 8, 3, 6, 5, False, True),
    ("D128-b5-nosigns", 1, 3, 128, 6, 5, 0, 6, False, False),
    ("D256-b6", 1, 1, 256, 4, 6, 9, 3, False, True),
    ("D512-b2", 1, 2, 512, 3, 2, 1, 3, False, True),
    ("D512-b8-rotated", 1, 1, 512, 3, 8, 0, 2, True, False),
    ("D128-b4-empty", 1, 1, 128, 4, 4, 0, 0, False, True),
]


@pytest.mark.parametrize("case", DEQUANTIZE_CASES, ids=lambda c: c[0])
def test_dequantize_kv(case):
    name, B, Hkv, D, C, bits, start, length, rotated, use_signs = case
    signs = torch_tq.hadamard_signs(D) if use_signs else None
    codes = torch.randint(0, 256, (B, Hkv, C, D * bits // 8), dtype=torch.uint8)
    norms = torch.rand(B, Hkv, C, D // rotation_block(D)) * 20
    ref = torch.ops.tq.dequantize_kv(codes, norms, start, length, bits, rotated, signs)
    out = _plans.run("dequantize_kv", codes=codes, norms=norms, start=start, length=length, bits=bits,
                     rotated=rotated, signs=signs)
    assert out.dtype == torch.float32
    assert_decoded_close(name, out, ref)


def test_quantize_then_dequantize_round_trip():
    """Kernel-encoded cache decodes (in the kernel) to the reference decode of the reference encoding."""
    D, bits, C = 128, 4, 8
    signs = torch_tq.hadamard_signs(D)
    src = torch.randn(1, 6, 2, D)
    codes, norms = torch_tq.allocate_quantized_kv(1, 2, C, D, bits)
    _plans.run("hadamard_quantize_kv", src=src, codes=codes, norms=norms, write_pos=5, is_sliding=True, bits=bits,
               signs=signs)
    out = _plans.run("dequantize_kv", codes=codes, norms=norms, start=5, length=6, bits=bits, signs=signs)
    ref = torch.ops.tq.dequantize_kv(codes, norms, 5, 6, bits, False, signs)
    assert_decoded_close("round trip", out, ref)
    # and the round trip is a faithful 4-bit reconstruction
    err = (out - src.transpose(1, 2)).pow(2).sum(-1) / src.transpose(1, 2).pow(2).sum(-1)
    assert err.mean() < 0.02


# ---- the decode-path options: key centring, norm correction, full-precision windows (DESIGN §8) -----

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# id, B, T, Hkv, D, C, write_pos, is_sliding, bits, src dtype, offset, norm_correction, S, W, sink dtype,
# recent dtype (S/W None = no buffer)
DECODE_PATH_CASES = [
    ("decode-step-global", 2, 1, 2, 128, 16, 5, False, 4, F16, True, True, 4, 8, F16, F16),
    ("decode-step-into-the-sinks", 1, 1, 2, 64, 16, 2, False, 3, F32, True, True, 4, 8, F32, BF16),
    ("decode-step-ring-wrapped", 1, 1, 3, 256, 8, 29, True, 2, BF16, False, True, 4, 6, BF16, F32),
    ("prefill-longer-than-the-ring", 1, 12, 2, 64, 16, 0, False, 4, BF16, True, False, 4, 5, BF16, F32),
    # A ring write of T > C drops its first tokens from the codes but they still fill the sinks.
    ("ring-prefill-drops-sink-tokens", 2, 20, 2, 128, 8, 0, True, 5, F32, True, True, 4, 6, F32, F16),
    ("ring-prefill-d512-drops-sink-tokens", 1, 11, 1, 512, 6, 1, True, 3, BF16, True, True, 4, 5, F16, BF16),
    ("ring-write-straddles-the-sinks", 1, 5, 2, 64, 8, 2, True, 6, F16, True, True, 4, 8, F16, F16),
    ("write-past-the-sinks", 1, 3, 2, 64, 8, 10, True, 8, F32, True, True, 4, 3, F32, F32),
    ("sinks-only-d512", 1, 4, 1, 512, 6, 1, False, 4, F32, True, True, 3, None, F16, None),
    ("recent-only-d512", 1, 7, 1, 512, 8, 0, False, 3, F16, False, False, None, 4, None, BF16),
    ("empty-sink-buffer", 1, 2, 2, 64, 8, 0, False, 4, F32, False, True, 0, 1, F32, F32),
    ("offset-only", 2, 3, 2, 256, 6, 1, False, 4, F32, True, False, None, None, None, None),
    ("norm-correction-only", 1, 3, 3, 128, 6, 2, False, 2, BF16, False, True, None, None, None, None),
    # 226 row blocks of 16 rows: 3 blocks per threadgroup (the last threadgroup 1, its block partial);
    # a lane's head (and offset) and batch row change between the blocks it walks.
    ("prefill-several-blocks-per-threadgroup", 2, 601, 3, 64, 640, 0, False, 4, F16, True, True, 4, 8, F16, BF16),
]
# Every (D, bits) pair with every option on, dtypes and ring geometry varying along.
for _i, (_D, _bits) in enumerate(itertools.product(DIMS, BITS)):
    _T, _ring, _dt = 3 + _i % 5, _i % 2 == 1, DTYPE_CYCLE
    DECODE_PATH_CASES.append((f"all-options-D{_D}-b{_bits}", 1, _T, 2, _D, 8, _i % 11 if _ring else min(_i % 11, 8 - _T),
                              _ring, _bits, _dt[_i % 3], True, True, 4, 1 + _i % 8, _dt[(_i + 1) % 3],
                              _dt[(_i + 2) % 3]))


def reference_u_centred(src, first, signs, offset):
    """reference_u of the centred vectors (float32 subtraction first, as the op does)."""
    x = src.float()
    if offset is not None:
        x = x - offset.unsqueeze(1)
    return reference_u(x, first, 0, signs)


@pytest.mark.parametrize("case", DECODE_PATH_CASES, ids=lambda c: c[0])
def test_hadamard_quantize_kv_decode_path_options(case):
    (name, B, T, Hkv, D, C, write_pos, is_sliding, bits, dtype, use_offset, norm_correction, S, W, sink_dtype,
     recent_dtype) = case
    signs = torch_tq.hadamard_signs(D)
    src = (torch.randn(B, T, Hkv, D) * 2 + 0.5).to(dtype)
    offset = torch.randn(B, Hkv, D) if use_offset else None
    # The last token of (0, head 0) is zero after centring: norm 0 (also corrected), a zero window entry.
    src[0, -1, 0] = offset[0, 0].to(dtype) if use_offset else 0
    if use_offset:
        offset[0, 0] = src[0, -1, 0].float()
    codes, norms = torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits)
    codes.fill_(POISON)
    norms.fill_(float("nan"))
    sink = None if S is None else torch.full((B, Hkv, S, D), float("nan"), dtype=sink_dtype)
    recent = None if W is None else torch.full((B, Hkv, W, D), float("nan"), dtype=recent_dtype)
    clone = lambda t: None if t is None else t.clone()  # noqa: E731
    ref = [clone(t) for t in (codes, norms, sink, recent)]
    plain_norms = norms.clone()
    torch.ops.tq.hadamard_quantize_kv(src, ref[0], ref[1], write_pos, is_sliding, bits, signs, offset,
                                      norm_correction, ref[2], ref[3])
    torch.ops.tq.hadamard_quantize_kv(src, codes.clone(), plain_norms, write_pos, is_sliding, bits, signs, offset)
    _plans.run("hadamard_quantize_kv", src=src, codes=codes, norms=norms, write_pos=write_pos, is_sliding=is_sliding,
               bits=bits, signs=signs, offset=offset, norm_correction=norm_correction, sink=sink, recent=recent)

    first = max(0, T - C) if is_sliding else 0
    slots = torch.arange(write_pos + first, write_pos + T) % C
    untouched = torch.ones(C, dtype=torch.bool)
    untouched[slots] = False
    assert (codes[:, :, untouched] == POISON).all() and norms[:, :, untouched].isnan().all(), "wrote outside the new slots"
    assert_codes_match(name, codes[:, :, slots], ref[0][:, :, slots], reference_u_centred(src, first, signs, offset), bits)
    R = rotation_block(D)
    if norm_correction:
        # n * sqrt(R) / ||c[code]|| with the kernel's own codes (a near-tie code changes ||c[code]||).
        values = lloyd_max_codebook(bits).double()[unpack_codes(codes[:, :, slots], bits)]
        unit = values.reshape(*values.shape[:-1], D // R, R).norm(dim=-1)
        expect = plain_norms[:, :, slots].double() * math.sqrt(R) / unit
        torch.testing.assert_close(norms[:, :, slots].double(), expect, rtol=2e-6, atol=0)
    else:
        torch.testing.assert_close(norms[:, :, slots], ref[1][:, :, slots], rtol=1e-6, atol=0)
    zero_slot = (write_pos + T - 1) % C
    assert (norms[0, 0, zero_slot] == 0).all()
    # The windows hold the rotated (centred) vectors, bit for bit, and nothing else was written (NaN stays).
    for what, out, expect in (("sink", sink, ref[2]), ("recent", recent, ref[3])):
        if out is not None:
            torch.testing.assert_close(out, expect, rtol=0, atol=0, equal_nan=True, msg=f"{name}: {what}")
    if W is not None:
        newest = torch.arange(write_pos + max(0, T - W), write_pos + T)  # this call's positions the ring keeps
        assert not recent[:, :, newest % W].isnan().any()
        assert (recent[0, 0, (write_pos + T - 1) % W] == 0).all()


def test_quantize_with_windows_and_no_tokens_launches_nothing():
    args = dict(_plans.OP_DEFAULTS["hadamard_quantize_kv"], src=torch.randn(1, 0, 2, 64),
                codes=torch.zeros(1, 2, 8, 32, dtype=torch.uint8), norms=torch.zeros(1, 2, 8, 1), write_pos=0,
                sink=torch.zeros(1, 2, 4, 64), recent=torch.zeros(1, 2, 4, 64), norm_correction=True,
                offset=torch.zeros(1, 2, 64))
    assert _plans.plan("hadamard_quantize_kv", **args)["launches"] == []


@pytest.mark.parametrize("T, Hkv, D, grid", [(1, 8, 128, 1), (256, 8, 128, 64), (601 * 2, 3, 64, 76), (8192, 8, 128, 512)],
                         ids=["decode", "T256", "T1202-Hkv3", "T8192"])
def test_quantize_grid_walks_several_blocks_per_threadgroup(T, Hkv, D, grid):
    """The sign vector is staged once per threadgroup: blocks / 64 row blocks per threadgroup (1 .. 16)."""
    codes, norms = torch_tq.allocate_quantized_kv(1, Hkv, T, D, 4)
    p = _plans.plan("hadamard_quantize_kv", **dict(_plans.OP_DEFAULTS["hadamard_quantize_kv"], src=torch.randn(1, T, Hkv, D),
                                                   codes=codes, norms=norms, write_pos=0, bits=4,
                                                   signs=torch_tq.hadamard_signs(D)))
    assert p["error"] == ""
    assert p["launches"][0]["grid"] == (grid, 1, 1)
