"""The CUDA backend's Triton kernels, run on CPU tensors in the Triton interpreter, against the CPU reference
and the float64 oracles, over the case grid of the Metal simulator tests (tests/mps_sim/).

Codes compare exactly, except near ties: the kernels rotate with two dense ±1 passes (H_R = H_{R/16} ⊗ H_16)
instead of the reference's butterflies, and sum the block norm in another order, so u may differ by an ulp
or two; a differing code must then be adjacent to the reference's, with the reference's u within 1e-5 of
the boundary between the two. Every buffer the launchers allocate is filled with NaN first (and so is every
output the caller passes), so an element a kernel leaves unwritten fails the comparison.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import torch_tq
from _bad_inputs import BAD_INPUTS
from _oracle import attention64, decode_rotated64, encode64, pack_bits, union_kv64
from _triton_interpreter import interpreted_kernels
from _utils import assert_close
from test_attention_windows import CASES as WINDOW_CASES
from test_attention_windows import write_tokens
from torch_tq.backends.cpu.turboquant import rotate
from torch_tq.codebooks import decision_boundaries, lloyd_max_codebook
from torch_tq.layout import rotation_block, unpack_codes

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")

POISON = 0xA5
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPE_CYCLE = (F32, F16, BF16)
DIMS = (64, 128, 256, 512)
BITS = (2, 3, 4, 5, 6, 8)
OUT_RATIO = {F32: 2e-5, F16: 1.5e-3, BF16: 1e-2}
# The kernel multiplies half-precision queries in float16 (float32 accumulation and softmax, as SDPA does), the
# reference in float32 throughout: log-sum-exp tolerance per q dtype.
LSE_TOL = {F32: dict(rtol=1e-5, atol=1e-5), F16: dict(rtol=0, atol=3e-3), BF16: dict(rtol=0, atol=3e-3)}
# A window entry is the rotated vector rounded to the buffer's dtype; the kernel's rotation sums in another
# order, so a value next to a rounding boundary may round one ulp the other way.
WINDOW_TOL = {F32: dict(rtol=1e-5, atol=2e-6), F16: dict(rtol=2**-10, atol=1e-5), BF16: dict(rtol=2**-7, atol=1e-4)}


@pytest.fixture(scope="module")
def kernels():
    with interpreted_kernels() as modules:
        yield modules


@pytest.fixture
def tq(kernels, monkeypatch):
    """The TurboQuant kernel module, with every buffer its launchers allocate poisoned (NaN / 0xA5)."""
    module = kernels[0]
    real = module._empty

    def poisoned(shape, dtype, device):
        t = real(shape, dtype, device)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(POISON)

    monkeypatch.setattr(module, "_empty", poisoned)
    # The quantize grids run the dot kernel at every size (by default a call of fewer than v1_below rotation blocks,
    # a decode step, runs v1: test_hadamard_quantize_kv_tiles covers v1 by name).
    monkeypatch.setattr(module, "DEFAULT_QUANT_CONFIG", module.QuantConfig(v1_below=0))
    return module


# Every attention test runs each launch path: the default (v2, fused split merge: one launch with fold_q), the
# separate merge launch, and v3 (transposed dots, pair LUT, fused merge) with its q-rotation launch (its default)
# and with the folded rotation.
ATTN_PATHS = {"v2-fused": dict(), "v2-merge-launch": dict(fused_merge=False), "v3": dict(variant="v3"),
              "v3-fold-q": dict(variant="v3", fold_q=True)}


@pytest.fixture(params=list(ATTN_PATHS))
def attn_path(request, tq, monkeypatch):
    """Replaces the kernel module's default attention config by one of ATTN_PATHS (tests use ``tq`` as before)."""
    monkeypatch.setattr(tq, "DEFAULT_ATTN_CONFIG", tq.AttnConfig(**ATTN_PATHS[request.param]))
    return request.param


@pytest.fixture
def copy_kernel(kernels):
    return kernels[1]


def reference_u(x, signs):
    """The reference's normalised rotated coordinates u, float32 ``[..., D]``."""
    D = x.shape[-1]
    R = rotation_block(D)
    y = rotate(x, signs).reshape(*x.shape[:-1], D // R, R)
    norms = torch.linalg.vector_norm(y, dim=-1)
    inv = torch.where(norms > 0, math.sqrt(R) / norms, torch.zeros_like(norms))
    return (y * inv.unsqueeze(-1)).reshape(x.shape)


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


def assert_decoded_close(name, out, ref):
    """Equal up to a few float32 ulps of the largest |value| (the rotation sums in another order)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if out.numel():
        torch.testing.assert_close(out, ref, rtol=0, atol=4e-6 * float(ref.abs().max()), msg=lambda m: f"{name}: {m}")


# ---- hadamard_quantize_kv -------------------------------------------------------------------------------------------

# Every (D, bits) pair once, with the source dtype, sign vector and ring geometry varying along.
QUANTIZE_CASES = []
for _i, (_D, _bits) in enumerate(itertools.product(DIMS, BITS)):
    _dtype = DTYPE_CYCLE[_i % 3]
    # id, B, T, Hkv, D, C, write_pos, is_sliding, bits, dtype, signs ("canonical", "ones" or None)
    if _i % 2 == 1:
        QUANTIZE_CASES.append((f"D{_D}-b{_bits}-{str(_dtype)[6:]}-ring", 2, 7, 2, _D, 5, 3, True, _bits, _dtype,
                               "ones" if _i % 4 == 1 else "canonical"))
    else:
        QUANTIZE_CASES.append((f"D{_D}-b{_bits}-{str(_dtype)[6:]}-global", 1, 3, 3, _D, 6, 2, False, _bits, _dtype,
                               "ones" if _i % 4 == 2 else "canonical"))


def make_signs(kind, D):
    return {"canonical": torch_tq.hadamard_signs(D), "ones": torch.ones(D), None: None}[kind]


@pytest.mark.parametrize("case", QUANTIZE_CASES, ids=lambda c: c[0])
def test_hadamard_quantize_kv(tq, case):
    name, B, T, Hkv, D, C, write_pos, is_sliding, bits, dtype, sign_kind = case
    signs = make_signs(sign_kind, D)
    src = (torch.randn(B, T, Hkv, D) * 2).to(dtype)
    src[0, -1, 0] = 0  # a zero vector stores norm 0 and u = 0
    codes, norms = torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits)
    codes.fill_(POISON)
    norms.fill_(float("nan"))
    ref_codes, ref_norms = codes.clone(), norms.clone()
    torch.ops.tq.hadamard_quantize_kv(src, ref_codes, ref_norms, write_pos, is_sliding, bits, signs)
    tq.hadamard_quantize_kv(src, codes, norms, write_pos, is_sliding, bits, signs)

    first = max(0, T - C) if is_sliding else 0
    slots = torch.arange(write_pos + first, write_pos + T) % C
    untouched = torch.ones(C, dtype=torch.bool)
    untouched[slots] = False
    assert (codes[:, :, untouched] == POISON).all() and norms[:, :, untouched].isnan().all(), "wrote outside the new slots"
    assert not norms[:, :, slots].isnan().any(), "unwritten norms"
    torch.testing.assert_close(norms[:, :, slots], ref_norms[:, :, slots], rtol=2e-6, atol=0)
    u = reference_u(src[:, first:].transpose(1, 2), signs)
    assert_codes_match(name, codes[:, :, slots], ref_codes[:, :, slots], u, bits)
    # The zero vector is an exact tie (u = 0 = the middle boundary): lower index, norm 0, exactly.
    zero_slot = (write_pos + T - 1) % C
    assert (norms[0, 0, zero_slot] == 0).all()
    assert (unpack_codes(codes[0, 0, zero_slot], bits) == (1 << bits) // 2 - 1).all()


@pytest.mark.parametrize("D,bits", [(64, 3), (128, 4), (512, 6)])
def test_hadamard_quantize_kv_matches_the_float64_oracle(tq, D, bits):
    """Codes (bit by bit packed) and norms against the independent float64 encoder."""
    signs = torch_tq.hadamard_signs(D)
    src = torch.randn(2, 5, 2, D)
    codes, norms = torch_tq.allocate_quantized_kv(2, 2, 5, D, bits)
    tq.hadamard_quantize_kv(src, codes, norms, 0, False, bits, signs)
    want_codes, want_norms, u = encode64(src.transpose(1, 2), bits, signs)
    packed = pack_bits(want_codes, bits)
    diff = unpack_codes(codes, bits) != want_codes
    boundary = decision_boundaries(bits, torch.float64)[torch.minimum(unpack_codes(codes, bits), want_codes)[diff]]
    assert ((u[diff] - boundary).abs() <= 1e-5).all(), "codes differ from the oracle away from a tie"
    if not diff.any():
        assert torch.equal(codes, packed)
    torch.testing.assert_close(norms.double(), want_norms, rtol=1e-6, atol=0)


def test_hadamard_quantize_kv_strided_src(tq):
    src = torch.randn(2, 2, 4, 128).transpose(1, 2)  # [B, T=4, Hkv=2, D], non-contiguous
    codes, norms = torch_tq.allocate_quantized_kv(2, 2, 4, 128, 4)
    ref_codes, ref_norms = codes.clone(), norms.clone()
    signs = torch.ones(128)
    torch.ops.tq.hadamard_quantize_kv(src, ref_codes, ref_norms, 0, False, 4, signs)
    tq.hadamard_quantize_kv(src, codes, norms, 0, False, 4, signs)
    torch.testing.assert_close(norms, ref_norms, rtol=2e-6, atol=0)
    assert_codes_match("strided", codes, ref_codes, reference_u(src.transpose(1, 2), signs), 4)


def test_signs_none_means_the_canonical_signs(tq):
    """Every launcher resolves ``signs=None`` in one place to ``torch_tq.hadamard_signs(D)``."""
    D, bits = 128, 4
    src = torch.randn(1, 3, 2, D)
    signs = torch_tq.hadamard_signs(D)
    outs = []
    for s in (None, signs):
        codes, norms = torch_tq.allocate_quantized_kv(1, 2, 4, D, bits)
        tq.hadamard_quantize_kv(src, codes, norms, 0, False, bits, s)
        outs.append((codes, norms, tq.dequantize_kv(codes, norms, 0, 3, bits, False, s)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert torch.equal(outs[0][2], outs[1][2])
    q = torch.randn(1, 4, 1, D)
    a, b = (tq.flash_attn_vec_tq(q, *outs[0][:2], *outs[0][:2], 3, D**-0.5, bits, signs=s) for s in (None, signs))
    assert torch.equal(a, b)


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
]
# Every (D, bits) pair with every option on, dtypes and ring geometry varying along.
for _i, (_D, _bits) in enumerate(itertools.product(DIMS, BITS)):
    _T, _ring = 3 + _i % 5, _i % 2 == 1
    DECODE_PATH_CASES.append((f"all-options-D{_D}-b{_bits}", 1, _T, 2, _D, 8, _i % 11 if _ring else min(_i % 11, 8 - _T),
                              _ring, _bits, DTYPE_CYCLE[_i % 3], True, True, 4, 1 + _i % 8, DTYPE_CYCLE[(_i + 1) % 3],
                              DTYPE_CYCLE[(_i + 2) % 3]))


@pytest.mark.parametrize("case", DECODE_PATH_CASES, ids=lambda c: c[0])
def test_hadamard_quantize_kv_decode_path_options(tq, case):
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
    tq.hadamard_quantize_kv(src, codes, norms, write_pos, is_sliding, bits, signs, offset, norm_correction, sink,
                            recent)

    first = max(0, T - C) if is_sliding else 0
    slots = torch.arange(write_pos + first, write_pos + T) % C
    untouched = torch.ones(C, dtype=torch.bool)
    untouched[slots] = False
    assert (codes[:, :, untouched] == POISON).all() and norms[:, :, untouched].isnan().all(), "wrote outside the new slots"
    x = src.float() - offset.unsqueeze(1) if use_offset else src
    assert_codes_match(name, codes[:, :, slots], ref[0][:, :, slots], reference_u(x[:, first:].transpose(1, 2), signs),
                       bits)
    R = rotation_block(D)
    if norm_correction:
        # n * sqrt(R) / ||c[code]|| with the kernel's own codes (a near-tie code changes ||c[code]||).
        values = lloyd_max_codebook(bits).double()[unpack_codes(codes[:, :, slots], bits)]
        unit = values.reshape(*values.shape[:-1], D // R, R).norm(dim=-1)
        expect = plain_norms[:, :, slots].double() * math.sqrt(R) / unit
        torch.testing.assert_close(norms[:, :, slots].double(), expect, rtol=4e-6, atol=0)
    else:
        torch.testing.assert_close(norms[:, :, slots], ref[1][:, :, slots], rtol=2e-6, atol=0)
    zero_slot = (write_pos + T - 1) % C
    assert (norms[0, 0, zero_slot] == 0).all()
    # The windows hold the rotated (centred) vectors in their dtype; nothing else was written (NaN stays).
    for what, out, expect in (("sink", sink, ref[2]), ("recent", recent, ref[3])):
        if out is not None:
            torch.testing.assert_close(out, expect, equal_nan=True, msg=lambda m: f"{name}: {what}: {m}",
                                       **WINDOW_TOL[out.dtype])
    if W is not None:
        newest = torch.arange(write_pos + max(0, T - W), write_pos + T)  # this call's positions the ring keeps
        assert not recent[:, :, newest % W].isnan().any()
        assert (recent[0, 0, (write_pos + T - 1) % W] == 0).all()


# The dot kernel over several tiles and programs (16-block tiles, 2 persistent programs that loop, a ragged last
# tile) and v1 (which QuantConfig.v1_below can route a decode step to): id, variant, D, bits, src dtype, offset,
# signs ("canonical", or "random": float32 values that are not ±1, the dot kernel's split path), ring.
TILED_CASES = [
    ("dot-D64-b2-bf16-ring", "dot", 64, 2, BF16, False, "canonical", True),
    ("dot-D64-b5-f16-offset", "dot", 64, 5, F16, True, "canonical", False),
    ("dot-D128-b4-bf16", "dot", 128, 4, BF16, False, "canonical", False),
    ("dot-D128-b3-f32-ring", "dot", 128, 3, F32, False, "canonical", True),
    ("dot-D128-b4-f16-random-signs", "dot", 128, 4, F16, False, "random", False),
    ("dot-D256-b8-bf16-offset-ring", "dot", 256, 8, BF16, True, "canonical", True),
    ("dot-D256-b6-f16", "dot", 256, 6, F16, False, "canonical", False),
    ("dot-D512-b4-bf16-ring", "dot", 512, 4, BF16, False, "canonical", True),
    ("dot-D512-b3-f32-random-signs", "dot", 512, 3, F32, True, "random", False),
    ("v1-D128-b4-bf16-ring", "v1", 128, 4, BF16, False, "canonical", True),
    ("v1-D512-b5-f16-offset", "v1", 512, 5, F16, True, "canonical", False),
]


@pytest.mark.parametrize("case", TILED_CASES, ids=lambda c: c[0])
def test_hadamard_quantize_kv_tiles(tq, case):
    name, variant, D, bits, dtype, use_offset, sign_kind, is_sliding = case
    B, T, Hkv, C, S, W = 2, 13, 3, 16, 3, 5  # 78 rows: 5 tiles of 16 (D512: 10), the last ragged
    write_pos = 9 if is_sliding else 2
    signs = torch_tq.hadamard_signs(D) if sign_kind == "canonical" else torch.randn(D)
    src = (torch.randn(B, T, Hkv, D) * 2 + 0.5).to(dtype)
    offset = torch.randn(B, Hkv, D) if use_offset else None
    bufs = [*torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits), torch.full((B, Hkv, S, D), float("nan"), dtype=dtype),
            torch.full((B, Hkv, W, D), float("nan"), dtype=F32)]
    bufs[0].fill_(POISON)
    bufs[1].fill_(float("nan"))
    ref = [t.clone() for t in bufs]
    plain_norms = bufs[1].clone()
    torch.ops.tq.hadamard_quantize_kv(src, ref[0], ref[1], write_pos, is_sliding, bits, signs, offset, True, ref[2],
                                      ref[3])
    torch.ops.tq.hadamard_quantize_kv(src, ref[0].clone(), plain_norms, write_pos, is_sliding, bits, signs, offset)
    config = tq.QuantConfig(variant=variant, rows=16, programs_per_sm=2, v1_below=0)
    tq.hadamard_quantize_kv(src, *bufs[:2], write_pos, is_sliding, bits, signs, offset, True, *bufs[2:], config=config)

    first = max(0, T - C) if is_sliding else 0
    slots = torch.arange(write_pos + first, write_pos + T) % C
    assert torch.equal(bufs[0] == POISON, ref[0] == POISON), "wrote other slots than the reference"
    x = src.float() - offset.unsqueeze(1) if use_offset else src
    assert_codes_match(name, bufs[0][:, :, slots], ref[0][:, :, slots],
                       reference_u(x[:, first:].transpose(1, 2), signs), bits)
    R = rotation_block(D)
    values = lloyd_max_codebook(bits).double()[unpack_codes(bufs[0][:, :, slots], bits)]
    unit = values.reshape(*values.shape[:-1], D // R, R).norm(dim=-1)
    expect = plain_norms[:, :, slots].double() * math.sqrt(R) / unit
    torch.testing.assert_close(bufs[1][:, :, slots].double(), expect, rtol=4e-6, atol=0)
    for what, out, want in (("sink", bufs[2], ref[2]), ("recent", bufs[3], ref[3])):
        torch.testing.assert_close(out, want, equal_nan=True, msg=lambda m: f"{name}: {what}: {m}",
                                   **WINDOW_TOL[out.dtype])


def test_pm1_signs_check_follows_in_place_changes(tq):
    """The dot kernel's choice of path rests on a cached ±1 check; an in-place change of the signs redoes it."""
    signs = torch_tq.hadamard_signs(64)
    assert tq._signs_are_pm1(signs)
    signs.mul_(1.5)
    assert not tq._signs_are_pm1(signs)
    assert tq._signs_are_pm1(torch.ones(64)) and not tq._signs_are_pm1(torch.full((64,), 0.5))


# ---- dequantize_kv --------------------------------------------------------------------------------------------------

# id, B, Hkv, D, C, bits, start, length, rotated, signs
DEQUANTIZE_CASES = [
    ("D64-b3-wrap-rotated", 2, 2, 64, 8, 3, 6, 5, True, "canonical"),
    ("D64-b3-wrap", 2, 2, 64, 8, 3, 6, 5, False, "canonical"),
    ("D128-b5-ones", 1, 3, 128, 6, 5, 0, 6, False, "ones"),
    ("D128-b4", 2, 1, 128, 5, 4, 2, 5, False, "canonical"),
    ("D256-b6", 1, 1, 256, 4, 6, 9, 3, False, "canonical"),
    ("D512-b2", 1, 2, 512, 3, 2, 1, 3, False, "canonical"),
    ("D512-b8-rotated", 1, 1, 512, 3, 8, 0, 2, True, "ones"),
    ("D128-b4-empty", 1, 1, 128, 4, 4, 0, 0, False, "canonical"),
]


@pytest.mark.parametrize("case", DEQUANTIZE_CASES, ids=lambda c: c[0])
def test_dequantize_kv(tq, case):
    name, B, Hkv, D, C, bits, start, length, rotated, sign_kind = case
    signs = make_signs(sign_kind, D)
    codes = torch.randint(0, 256, (B, Hkv, C, D * bits // 8), dtype=torch.uint8)
    norms = torch.rand(B, Hkv, C, D // rotation_block(D)) * 20
    ref = torch.ops.tq.dequantize_kv(codes, norms, start, length, bits, rotated, signs)
    out = tq.dequantize_kv(codes, norms, start, length, bits, rotated, signs)
    assert out.dtype == torch.float32
    assert_decoded_close(name, out, ref)


@pytest.mark.parametrize("bits", BITS)
def test_dequantize_kv_matches_the_float64_oracle(tq, bits):
    D = 128
    codes = torch.randint(0, 256, (1, 2, 3, D * bits // 8), dtype=torch.uint8)
    norms = torch.rand(1, 2, 3, 1) * 5
    from _oracle import unpack_bits

    want = decode_rotated64(unpack_bits(codes, bits), norms, bits)
    out = tq.dequantize_kv(codes, norms, 0, 3, bits, True, None)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-7)


def test_quantize_then_dequantize_round_trip(tq):
    D, bits, C = 128, 4, 8
    signs = torch_tq.hadamard_signs(D)
    src = torch.randn(1, 6, 2, D)
    codes, norms = torch_tq.allocate_quantized_kv(1, 2, C, D, bits)
    tq.hadamard_quantize_kv(src, codes, norms, 5, True, bits, signs)
    out = tq.dequantize_kv(codes, norms, 5, 6, bits, False, signs)
    assert_decoded_close("round trip", out, torch.ops.tq.dequantize_kv(codes, norms, 5, 6, bits, False, signs))
    err = (out - src.transpose(1, 2)).pow(2).sum(-1) / src.transpose(1, 2).pow(2).sum(-1)
    assert err.mean() < 0.02


# ---- flash_attn_vec_tq ----------------------------------------------------------------------------------------------


def build_cache(B, Hkv, D, C, bits, kv_len, sliding, signs, chunk=7):
    """Write kv_len random tokens with the CPU reference encoder (wrapping a sliding cache)."""
    k = torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits)
    v = torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits)
    pos = 0
    while pos < kv_len:
        T = min(chunk, kv_len - pos)
        torch.ops.tq.hadamard_quantize_kv(torch.randn(B, T, Hkv, D) * 2, *k, pos, sliding, bits, signs)
        torch.ops.tq.hadamard_quantize_kv(torch.randn(B, T, Hkv, D), *v, pos, sliding, bits, signs)
        pos += T
    return (*k, *v)


def run_both(tq, q, cache, kv_len, bits, v_bits=None, window=0, softcap=0.0, kv_start=None, signs=None):
    """The CPU op and the Triton op on the same inputs; returns (ref, out, ref_lse, lse)."""
    B, Hq, Lq, D = q.shape
    cache = list(cache) + [None] * (8 - len(cache))
    args = dict(kv_len=kv_len, scale=D**-0.5, bits=bits, sliding_window=window, softcap=softcap, kv_start=kv_start,
                signs=signs, v_bits=v_bits, k_sink=cache[4], v_sink=cache[5], k_recent=cache[6], v_recent=cache[7])
    ref_lse, lse = (torch.full((B, Hq, Lq), float("nan")) for _ in range(2))
    ref = torch.ops.tq.flash_attn_vec_tq(q, *cache[:4], **args, lse=ref_lse)
    out = tq.flash_attn_vec_tq(q, *cache[:4], **args, lse=lse)
    return ref, out, ref_lse, lse


CASES = [
    # id, B, Hq, Hkv, Lq, D, C, kv_len, bits, sliding_window, softcap, kv_start, dtype, signs, num_splits
    ("decode-D128-b4-gqa4", 1, 8, 2, 1, 128, 64, 50, 4, 0, 0.0, None, F32, "canonical", None),
    ("D64-b3-gqa3-lq3-kvstart", 2, 9, 3, 3, 64, 40, 33, 3, 0, 0.0, [0, 5], F16, "canonical", 3),
    ("D256-b2-sliding-wrap", 1, 4, 2, 1, 256, 16, 37, 2, 16, 0.0, None, BF16, "canonical", None),
    ("D512-b5-softcap-lq2", 1, 2, 1, 2, 512, 24, 20, 5, 0, 30.0, None, F32, "ones", 2),
    ("D128-b6-window-lq4-wrap-kvstart", 2, 4, 4, 4, 128, 20, 45, 6, 12, 0.0, [3, 42], F16, "canonical", None),
    ("D64-b8-row-without-keys", 2, 2, 1, 1, 64, 8, 6, 8, 0, 0.0, [0, 7], F32, "canonical", None),
    ("D128-b4-splits", 1, 4, 1, 1, 128, 1024, 1000, 4, 0, 0.0, None, F16, "canonical", 5),
    ("D64-b4-gqa8-row-tiles", 1, 16, 2, 2, 64, 32, 30, 4, 0, 0.0, None, F32, "canonical", None),
    ("D512-b3-window-wrap-bf16", 1, 4, 2, 3, 512, 10, 23, 3, 8, 20.0, None, BF16, "canonical", None),
    ("prefill-lq-eq-kvlen", 1, 2, 1, 9, 64, 9, 9, 4, 0, 0.0, None, F32, "canonical", None),
    ("B3-kvstart-window", 3, 6, 2, 2, 128, 16, 16, 5, 5, 0.0, [0, 2, 13], F32, "canonical", 4),
    ("splits-past-kv-start", 2, 4, 2, 1, 64, 300, 300, 4, 0, 0.0, [250, 0], F32, "canonical", 6),
]

# Every (D, bits) pair once at a small size, dtypes and signs varying along.
SWEEP = [
    (f"sweep-D{D}-b{b}", 1, 2, 1, 1, D, 12, 10, b, 0, 0.0, None, DTYPE_CYCLE[i % 3], "canonical" if i % 2 else "ones",
     None)
    for i, (D, b) in enumerate(itertools.product(DIMS, BITS))
]


@pytest.mark.parametrize("case", CASES + SWEEP, ids=lambda c: c[0])
def test_flash_attn_vec_tq(tq, attn_path, monkeypatch, case):
    name, B, Hq, Hkv, Lq, D, C, kv_len, bits, window, softcap, kv_start, dtype, sign_kind, splits = case
    if splits is not None:
        monkeypatch.setattr(tq, "choose_num_splits", lambda *a: splits)
    signs = make_signs(sign_kind, D)
    cache = build_cache(B, Hkv, D, C, bits, kv_len, kv_len > C, signs)
    q = torch.randn(B, Hq, Lq, D).to(dtype)
    start = torch.tensor(kv_start, dtype=torch.int64) if kv_start is not None else None
    ref, out, ref_lse, lse = run_both(tq, q, cache, kv_len, bits, window=window, softcap=softcap, kv_start=start,
                                      signs=signs)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(name, ref.float(), out.float(), OUT_RATIO[dtype])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL[q.dtype])
    if kv_start is not None and max(kv_start) >= kv_len:
        assert torch.equal(out[1].float().abs().sum(), torch.tensor(0.0)), "a row without keys must be zeros"


# id, B, Hq, Hkv, Lq, D, C, kv_len, bits, sliding_window, kv_start, dtype
ROW_TILE_CASES = [
    ("prefill-gqa2-lq40", 1, 4, 2, 40, 64, 48, 48, 4, 0, None, F32),
    ("prefill-window-kvstart", 2, 6, 2, 13, 128, 64, 50, 3, 9, [0, 20], F16),
    ("prefill-wrapped-ring", 1, 2, 1, 17, 64, 24, 70, 2, 8, None, F32),
]


@pytest.mark.parametrize("case", ROW_TILE_CASES, ids=lambda c: c[0])
def test_flash_attn_vec_tq_query_row_tiles(tq, attn_path, monkeypatch, case):
    """G*Lq query rows beyond one tile (a prefill): several row tiles per KV head, each cutting the positions
    it streams to what its queries can see (causal end, window start)."""
    name, B, Hq, Hkv, Lq, D, C, kv_len, bits, window, kv_start, dtype = case
    monkeypatch.setattr(tq, "_MAX_BLOCK_M", {D: 16})
    monkeypatch.setattr(tq, "choose_num_splits", lambda *a: 3)
    signs = torch_tq.hadamard_signs(D)
    cache = build_cache(B, Hkv, D, C, bits, kv_len, kv_len > C, signs)
    q = torch.randn(B, Hq, Lq, D).to(dtype)
    start = torch.tensor(kv_start, dtype=torch.int64) if kv_start is not None else None
    ref, out, ref_lse, lse = run_both(tq, q, cache, kv_len, bits, window=window, kv_start=start, signs=signs)
    assert_close(name, ref.float(), out.float(), OUT_RATIO[dtype])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL[q.dtype])


def test_flash_attn_vec_tq_strided_q(tq, attn_path):
    D, bits = 64, 4
    signs = torch.ones(D)
    cache = build_cache(1, 2, D, 16, bits, 9, False, signs)
    q = torch.randn(1, 3, 4, D).transpose(1, 2)  # [B, Hq=4, Lq=3, D], non-contiguous
    ref = torch.ops.tq.flash_attn_vec_tq(q, *cache, 9, 0.125, bits, signs=signs)
    out = tq.flash_attn_vec_tq(q, *cache, 9, 0.125, bits, signs=signs)
    assert_close("strided-q", ref, out, OUT_RATIO[F32])


def test_num_splits_fill_the_gpu_and_stay_long():
    from torch_tq.backends.cuda import turboquant

    turboquant._SM_COUNT[99] = 132
    gpu = torch.device("cuda", 99)
    # B1 Hkv8 at 128k: 4 programs per SM; B8 at 32k: 64 groups already give 2 splits' worth each.
    assert turboquant.choose_num_splits(131072, 8, gpu, 64) == 66
    assert turboquant.choose_num_splits(32768, 64, gpu, 64) == 9
    # Short contexts: no split shorter than 256 positions.
    assert turboquant.choose_num_splits(4096, 8, gpu, 64) == 16
    assert turboquant.choose_num_splits(10, 8, gpu, 64) == 1


def poison_window_held_slots(cache, kv_len, sinks, recent):
    """NaN norms and 0xFF codes at the cache slots of positions the windows hold: they must never be read."""
    k_codes, k_norms, v_codes, v_norms = cache[:4]
    C = k_codes.shape[2]
    held = [j for j in range(max(0, kv_len - C), kv_len)
            if (sinks is not None and j < sinks) or (recent is not None and j >= kv_len - recent)]
    slots = torch.tensor([j % C for j in held], dtype=torch.long)
    for codes, norms in ((k_codes, k_norms), (v_codes, v_norms)):
        codes[:, :, slots] = 0xFF
        norms[:, :, slots] = float("nan")
    return len(held)


@pytest.mark.parametrize("case", WINDOW_CASES, ids=[c[0] for c in WINDOW_CASES])
def test_flash_attn_vec_tq_windows_and_v_bits(tq, attn_path, monkeypatch, case):
    """tests/test_attention_windows.py's grid (sinks, ring, k8v4/k4v2/k3v2, Lq > 1, GQA, wrapped sliding ring,
    kv_start, softcap, lse, window dtypes, D 64..512): the Triton op against the CPU op and the float64 oracle."""
    (name, B, Hq, Hkv, Lq, D, C, kv_len, bits, v_bits, window, softcap, kv_start, sinks, recent, dtype, window_dtype,
     chunks) = case
    monkeypatch.setattr(tq, "choose_num_splits", lambda *a: 3)
    signs = torch_tq.hadamard_signs(D)
    offset = torch.randn(B, Hkv, D)
    cache, _, _ = write_tokens(B, Hkv, D, C, bits, v_bits, kv_len, kv_len > C or window > 0 and C < 64, signs, sinks,
                               recent, window_dtype, chunks, offset)
    poison_window_held_slots(cache, kv_len, sinks, recent)
    q = torch.randn(B, Hq, Lq, D).to(dtype)
    start = None if kv_start is None else torch.tensor(kv_start, dtype=torch.int64)
    ref, out, ref_lse, lse = run_both(tq, q, cache, kv_len, bits, v_bits, window, softcap, start, signs)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(ref.float()).all()
    assert_close(name, ref.float(), out.float(), OUT_RATIO[dtype])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL[q.dtype])
    # The oracle decodes the codes independently (a poisoned slot it reads would make it NaN).
    k, v = union_kv64(*cache[:4], kv_len, bits, v_bits, signs, *cache[4:])
    want, want_lse = attention64(q.double(), k, v, kv_len, C, D**-0.5, window, softcap, start, return_lse=True)
    assert_close(f"{name} vs oracle", want, out, OUT_RATIO[dtype])
    torch.testing.assert_close(lse.double(), want_lse, **LSE_TOL[q.dtype])


def _random_cache(B, Hkv, D, C, bits, v_bits):
    k_codes = torch.randint(0, 256, (B, Hkv, C, D * bits // 8), dtype=torch.uint8)
    v_codes = torch.randint(0, 256, (B, Hkv, C, D * v_bits // 8), dtype=torch.uint8)
    nb = D // min(D, 256)
    return k_codes, torch.rand(B, Hkv, C, nb) * 10 + 1, v_codes, torch.rand(B, Hkv, C, nb) * 10 + 1


# Every (bits, v_bits) pair once, D, q dtype, window dtypes (one per buffer) and windows on/off varying along.
V_BITS_SWEEP = [
    (f"k{kb}v{vb}-D{D}", kb, vb, D, q_dtype, wd, i % 3 != 2)
    for i, (kb, vb) in enumerate(itertools.product(BITS, BITS))
    for D in [DIMS[i % 4]]
    for q_dtype in [DTYPE_CYCLE[i % 3]]
    for wd in [[DTYPE_CYCLE[(i + j) % 3] for j in range(4)]]
]


@pytest.mark.parametrize("case", V_BITS_SWEEP, ids=lambda c: c[0])
def test_flash_attn_vec_tq_every_bits_pair(tq, attn_path, case):
    """Every key width with every value width, with window buffers of four different dtypes at once."""
    name, bits, v_bits, D, dtype, window_dtypes, windows = case
    B, Hq, Hkv, Lq, C, kv_len, S, W = 1, 4, 2, 2, 16, 14, 3, 4
    cache = list(_random_cache(B, Hkv, D, C, bits, v_bits))
    if windows:
        cache += [torch.randn(B, Hkv, n, D).to(dt) for n, dt in zip((S, S, W, W), window_dtypes)]
    q = torch.randn(B, Hq, Lq, D).to(dtype)
    ref, out, ref_lse, lse = run_both(tq, q, cache, kv_len, bits, v_bits, signs=torch_tq.hadamard_signs(D))
    assert_close(name, ref.float(), out.float(), OUT_RATIO[dtype])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL[q.dtype])


def test_windows_longer_than_the_visible_range(tq, attn_path):
    """kv_len < W (the ring still filling) and kv_len < S: every position comes from a window, none from the codes."""
    B, Hq, Hkv, D, C, bits = 1, 2, 1, 64, 16, 3
    cache = list(_random_cache(B, Hkv, D, C, bits, bits))
    cache[1].fill_(float("nan"))
    cache[3].fill_(float("nan"))
    cache += [torch.randn(B, Hkv, 4, D), torch.randn(B, Hkv, 4, D), torch.randn(B, Hkv, 8, D), torch.randn(B, Hkv, 8, D)]
    for kv_len, Lq in ((3, 1), (6, 2)):
        q = torch.randn(B, Hq, Lq, D)
        ref, out, ref_lse, lse = run_both(tq, q, cache, kv_len, bits, signs=torch.ones(D))
        assert torch.isfinite(ref).all()
        assert_close(f"kv_len={kv_len}", ref, out, OUT_RATIO[F32])
        torch.testing.assert_close(lse, ref_lse, **LSE_TOL[q.dtype])


# ---- kv_cache_copy --------------------------------------------------------------------------------------------------

# id, B, T, Hkv, D, C, write_pos, is_sliding, src dtype, cache dtype, transposed src
COPY_CASES = [
    ("global-f32", 2, 3, 2, 64, 8, 4, False, F32, F32, False),
    ("ring-wrap-bf16-cache", 1, 5, 3, 128, 4, 6, True, F32, BF16, False),
    ("ring-longer-than-capacity-f16", 2, 11, 2, 96, 8, 5, True, BF16, F16, True),
    ("decode-step-odd-D", 1, 1, 1, 7, 3, 2, False, F16, BF16, False),
]


@pytest.mark.parametrize("case", COPY_CASES, ids=lambda c: c[0])
def test_kv_cache_copy(copy_kernel, case):
    name, B, T, Hkv, D, C, write_pos, is_sliding, src_dtype, cache_dtype, transposed = case
    base = torch.randn(B, Hkv, T, D) if transposed else torch.randn(B, T, Hkv, D)
    base.view(-1)[-3:] = torch.tensor([float("inf"), -float("inf"), float("nan")])  # the last token: kept
    src = (base.transpose(1, 2) if transposed else base).to(src_dtype)
    ref = torch.full((B, Hkv, C, D), float("nan"), dtype=cache_dtype)
    out = ref.clone()
    torch.ops.tq.kv_cache_copy(src, ref, write_pos, is_sliding)
    copy_kernel.kv_cache_copy(src, out, write_pos, is_sliding)
    # Exactly (rounding to nearest even, infinities), NaN where the reference has NaN (NaN payloads may differ).
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")


# ---- the shared bad-input table -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id, op, build, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gives_the_reference_message_before_any_write(kernels, case_id, op, build, message):
    module = kernels[1] if op == "kv_cache_copy" else kernels[0]
    kwargs = build()
    before = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError) as info:
        getattr(module, op)(**kwargs)
    assert str(info.value) == message
    for k, v in before.items():
        assert torch.equal(kwargs[k], v) or (v.is_floating_point() and torch.equal(kwargs[k].isnan(), v.isnan()))


# ---- cache_seqlens: per-sequence lengths read on the device -----------------------------------------------------------


@pytest.mark.parametrize("T,sliding,dtype", [(1, False, torch.int32), (5, True, torch.int64), (3, False, torch.int64)])
def test_hadamard_quantize_kv_cache_seqlens(tq, T, sliding, dtype):
    """Each sequence written at its own device position equals the reference's per-sequence composition."""
    B, Hkv, D, C, S, W, bits = 3, 2, 64, 40, 4, 6, 4
    lengths = [0, 38, 77] if sliding else [0, 7, 33]
    signs = torch_tq.hadamard_signs(D)
    src = torch.randn(B, T, Hkv, D)
    offset = torch.randn(B, Hkv, D)
    bufs = [*torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits), torch.full((B, Hkv, S, D), float("nan")),
            torch.full((B, Hkv, W, D), float("nan"))]
    bufs[0].fill_(POISON)
    bufs[1].fill_(float("nan"))
    ref = [t.clone() for t in bufs]
    seqlens = torch.tensor(lengths, dtype=dtype)
    torch.ops.tq.hadamard_quantize_kv(src, ref[0], ref[1], 0, sliding, bits, signs, offset, True, ref[2], ref[3],
                                      seqlens)
    tq.hadamard_quantize_kv(src, bufs[0], bufs[1], 0, sliding, bits, signs, offset, True, bufs[2], bufs[3], seqlens)
    for b, n in enumerate(lengths):
        first = max(0, T - C) if sliding else 0
        slots = torch.arange(n + first, n + T) % C
        u = reference_u((src[b : b + 1].float() - offset[b : b + 1].unsqueeze(1))[:, first:].transpose(1, 2), signs)
        assert_codes_match(f"b{b}", bufs[0][b : b + 1, :, slots], ref[0][b : b + 1, :, slots], u, bits)
    assert torch.equal(bufs[0] == POISON, ref[0] == POISON), "wrote other slots than the reference"
    torch.testing.assert_close(bufs[1], ref[1], rtol=4e-6, atol=0, equal_nan=True)
    for g, r in zip(bufs[2:], ref[2:]):
        torch.testing.assert_close(g, r, equal_nan=True, **WINDOW_TOL[F32])


@pytest.mark.parametrize("Lq,window,sliding", [(1, 0, False), (3, 9, False), (2, 8, True)])
def test_flash_attn_vec_tq_cache_seqlens(tq, attn_path, monkeypatch, Lq, window, sliding):
    """kv_len is an upper bound (the launch size); each sequence attends over its own device length."""
    monkeypatch.setattr(tq, "choose_num_splits", lambda *a: 4)
    B, Hq, Hkv, D, C, S, W, bits, v_bits = 3, 4, 2, 64, 40, 4, 6, 4, 3
    lengths = [Lq, 11, 40] if not sliding else [Lq + 3, 45, 70]
    kv_len = C if not sliding else max(lengths) + 2  # an upper bound: the capacity, or beyond it on a ring
    signs = torch_tq.hadamard_signs(D)
    k = torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits)
    v = torch_tq.allocate_quantized_kv(B, Hkv, C, D, v_bits)
    win = [torch.full((B, Hkv, n, D), float("nan")) for n in (S, S, W, W)]
    for b, n in enumerate(lengths):
        row = lambda t: t[b : b + 1]  # noqa: E731
        torch.ops.tq.hadamard_quantize_kv(torch.randn(1, n, Hkv, D) * 2, row(k[0]), row(k[1]), 0, sliding, bits, signs,
                                          None, True, row(win[0]), row(win[2]))
        torch.ops.tq.hadamard_quantize_kv(torch.randn(1, n, Hkv, D), row(v[0]), row(v[1]), 0, sliding, v_bits, signs,
                                          None, True, row(win[1]), row(win[3]))
    cache = [*k, *v, *win]
    q = torch.randn(B, Hq, Lq, D)
    kv_start = torch.tensor([0, 2, 5])
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    ref_lse, lse = (torch.full((B, Hq, Lq), float("nan")) for _ in range(2))
    args = (kv_len, D**-0.5, bits, window, 0.0, kv_start, signs)
    ref = torch.ops.tq.flash_attn_vec_tq(q, *cache[:4], *args, ref_lse, v_bits, *cache[4:], seqlens)
    out = tq.flash_attn_vec_tq(q, *cache[:4], *args, lse, v_bits, *cache[4:], seqlens)
    assert_close("cache_seqlens", ref, out, OUT_RATIO[F32])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL[F32])


@pytest.mark.parametrize("Lq,max_block_m", [(1, None), (9, 16)])
def test_flash_attn_vec_tq_fused_merge_twice(tq, attn_path, monkeypatch, Lq, max_block_m):
    """Several splits merged in the kernel by the last program of each (KV head, row tile), called twice in a row:
    the merging programs put their ticket counters back to zero, so the second call (as a CUDA-graph replay would)
    merges correctly, and the counters are all zero between calls. (The interpreter runs the programs one after
    another: this checks the logic, not the race, which the acq_rel ticket orders on a GPU.)"""
    monkeypatch.setattr(tq, "choose_num_splits", lambda *a: 5)
    if max_block_m is not None:
        monkeypatch.setattr(tq, "_MAX_BLOCK_M", {64: max_block_m})  # G*Lq = 18 rows: two row tiles per KV head
    B, Hq, Hkv, D, C, kv_len, bits = 2, 4, 2, 64, 96, 90, 4
    signs = torch_tq.hadamard_signs(D)
    cache = build_cache(B, Hkv, D, C, bits, kv_len, False, signs, chunk=30)
    for call in range(2):
        q = torch.randn(B, Hq, Lq, D)
        ref, out, ref_lse, lse = run_both(tq, q, cache, kv_len, bits, signs=signs)
        assert_close(f"call {call}", ref, out, OUT_RATIO[F32])
        torch.testing.assert_close(lse, ref_lse, **LSE_TOL[F32])
        for counters in tq._TICKETS.values():
            assert not counters.any(), "a ticket counter was left non-zero"
