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
from torch_tq.codebooks import decision_boundaries
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
