"""hadamard_quantize_kv / dequantize_kv / kv_cache_copy on CPU against the float64 oracle and a list model."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_tq
from _oracle import decode_rotated64, encode64, pack_bits, unpack_bits, unrotate64
from _utils import assert_close
from torch_tq.codebooks import decision_boundaries
from torch_tq.layout import allocate_quantized_kv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_codes_match(oracle_codes, oracle_u, packed, bits):
    """Codes equal the oracle's except where float32 rounding can flip a near-tie (|u - boundary| < 1e-4)."""
    codes = unpack_bits(packed, bits)
    differ = codes != oracle_codes
    if differ.any():
        boundaries = decision_boundaries(bits, torch.float64)
        gap = (oracle_u[differ][:, None] - boundaries).abs().min(dim=1).values
        assert (gap < 1e-4).all(), f"codes differ away from a decision boundary (gap {gap.max():.2e})"
        assert ((codes[differ] - oracle_codes[differ]).abs() == 1).all(), "a near-tie may only move to a neighbour"
        assert differ.float().mean() < 1e-3


CASES = [
    # (B, T, Hkv, D, C, bits, write_pos, is_sliding, dtype)
    (1, 1, 1, 64, 4, 4, 0, False, torch.float32),
    (2, 7, 3, 64, 9, 3, 2, False, torch.float16),
    (1, 5, 2, 128, 16, 2, 11, False, torch.bfloat16),
    (2, 3, 2, 256, 8, 5, 6, True, torch.float32),
    (1, 2, 1, 512, 4, 6, 1, False, torch.float32),
    (1, 4, 2, 128, 8, 8, 0, False, torch.float16),
    (2, 11, 1, 64, 4, 4, 5, True, torch.float32),  # T > C on a sliding cache
]


def _case_id(case):
    B, T, Hkv, D, C, bits, pos, sliding, dtype = case
    return f"B{B}-T{T}-Hkv{Hkv}-D{D}-C{C}-b{bits}-p{pos}-{'ring' if sliding else 'global'}-{str(dtype)[6:]}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("signs_kind", ["default", "canonical", "plain"])
def test_hadamard_quantize_kv_matches_oracle(case, signs_kind):
    """``signs``: None (the oracle reads it as the canonical signs), the canonical signs given, all ones."""
    B, T, Hkv, D, C, bits, write_pos, is_sliding, dtype = case
    src = (torch.randn(B, T, Hkv, D) * 3).to(dtype)
    signs = {"default": None, "canonical": torch_tq.hadamard_signs(D), "plain": torch.ones(D)}[signs_kind]
    codes = torch.randint(0, 256, (B, Hkv, C, D * bits // 8), dtype=torch.uint8)
    norms = torch.full((B, Hkv, C, max(1, D // 256)), math.nan)
    before_codes = codes.clone()

    torch_tq.hadamard_quantize_kv(src, codes, norms, write_pos, is_sliding, bits, signs)

    kept = min(T, C)
    positions = list(range(write_pos + T - kept, write_pos + T))
    slots = [p % C for p in positions]
    x = src[:, T - kept:].transpose(1, 2).double()  # [B, Hkv, kept, D]
    oracle_codes, oracle_norms, oracle_u = encode64(x, bits, signs)
    assert_codes_match(oracle_codes, oracle_u, codes[:, :, slots], bits)
    torch.testing.assert_close(norms[:, :, slots], oracle_norms.float(), rtol=2e-6, atol=1e-6)
    untouched = [s for s in range(C) if s not in slots]
    assert torch.equal(codes[:, :, untouched], before_codes[:, :, untouched])
    assert norms[:, :, untouched].isnan().all()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_nearest_code_ties_go_to_lower_index(bits):
    from torch_tq.backends.cpu.turboquant import nearest_code

    boundaries = decision_boundaries(bits)  # float32 midpoints, as every backend compares them
    below = torch.nextafter(boundaries, torch.full_like(boundaries, -math.inf))
    above = torch.nextafter(boundaries, torch.full_like(boundaries, math.inf))
    index = torch.arange(boundaries.numel())
    assert torch.equal(nearest_code(boundaries, bits), index)
    assert torch.equal(nearest_code(below, bits), index)
    assert torch.equal(nearest_code(above, bits), index + 1)


def test_zero_vector_stores_zero_norm_and_decodes_to_zero():
    src = torch.randn(1, 2, 1, 128)
    src[0, 1] = 0
    codes, norms = torch_tq.allocate_quantized_kv(1, 1, 2, 128, 4)
    torch_tq.hadamard_quantize_kv(src, codes, norms, 0, bits=4)
    assert norms[0, 0, 1].item() == 0
    assert torch.equal(torch_tq.dequantize_kv(codes, norms, 1, 1)[0, 0, 0], torch.zeros(128))


@pytest.mark.parametrize("D, bits", [(64, 2), (128, 3), (128, 4), (256, 5), (512, 6), (64, 8)])
@pytest.mark.parametrize("rotated", [True, False], ids=["rotated", "original"])
def test_dequantize_kv_matches_oracle(D, bits, rotated):
    B, Hkv, C = 2, 3, 6
    signs = torch_tq.hadamard_signs(D)
    codes_int = torch.randint(0, 2**bits, (B, Hkv, C, D))
    codes = pack_bits(codes_int, bits)
    norms = torch.rand(B, Hkv, C, max(1, D // 256)) * 5 + 0.1
    start, length = 4, 5  # positions 4..8 → slots 4, 5, 0, 1, 2
    out = torch_tq.dequantize_kv(codes, norms, start, length, bits, rotated, signs)
    slots = [p % C for p in range(start, start + length)]
    ref = decode_rotated64(codes_int[:, :, slots], norms[:, :, slots], bits)
    if not rotated:
        ref = unrotate64(ref, signs)
    assert out.dtype == torch.float32 and out.shape == (B, Hkv, length, D)
    assert_close("dequantize_kv", ref, out, 1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_dequantize_round_trip_error(bits):
    """Relative reconstruction error of Gaussian K/V is the codebook distortion (sanity of the whole path)."""
    from torch_tq.codebooks import expected_mse

    src = torch.randn(1, 64, 4, 256)
    codes, norms = torch_tq.allocate_quantized_kv(1, 4, 64, 256, bits)
    signs = torch_tq.hadamard_signs(256)
    torch_tq.hadamard_quantize_kv(src, codes, norms, 0, bits=bits, signs=signs)
    x_hat = torch_tq.dequantize_kv(codes, norms, 0, 64, bits, signs=signs)
    x = src.transpose(1, 2)
    rel = ((x_hat - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean().item()
    assert rel == pytest.approx(expected_mse(bits), rel=0.1)


@pytest.mark.parametrize("src_dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("cache_dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_kv_cache_copy_every_dtype_pair(src_dtype, cache_dtype):
    B, T, Hkv, D, C = 2, 5, 3, 64, 8
    src = torch.randn(B, T, Hkv, D).to(src_dtype)
    cache = torch.full((B, Hkv, C, D), math.nan, dtype=cache_dtype)
    torch_tq.kv_cache_copy(src, cache, 2)
    assert torch.equal(cache[:, :, 2:7], src.transpose(1, 2).to(cache_dtype))
    assert cache[:, :, [0, 1, 7]].isnan().all()


@settings(max_examples=40, deadline=None)
@given(capacity=st.integers(1, 9), writes=st.lists(st.integers(1, 12), min_size=1, max_size=6), data=st.data())
def test_ring_buffer_matches_list_model(capacity, writes, data):
    """Random write sequences into a sliding cache: every slot holds the newest token mapped to it."""
    D, bits = 64, 3
    model = {}  # slot -> (write index, token index)
    cache = torch.full((1, 1, capacity, D), math.nan)
    codes, norms = torch_tq.allocate_quantized_kv(1, 1, capacity, D, bits)
    signs = torch_tq.hadamard_signs(D)
    sources, pos = [], 0
    for w, T in enumerate(writes):
        src = torch.randn(1, T, 1, D)
        sources.append(src)
        torch_tq.kv_cache_copy(src, cache, pos, is_sliding=True)
        torch_tq.hadamard_quantize_kv(src, codes, norms, pos, True, bits, signs)
        for t in range(T):
            model[(pos + t) % capacity] = (w, t)
        pos += T
    filled = sorted(model)
    expected = torch.stack([sources[w][0, t, 0] for w, t in (model[s] for s in filled)])
    assert torch.equal(cache[0, 0, filled], expected)
    if len(filled) < capacity:
        assert cache[0, 0, [s for s in range(capacity) if s not in filled]].isnan().all()
    # The quantized ring holds exactly what a one-shot quantization of the expected tokens gives.
    ref_codes, ref_norms = torch_tq.allocate_quantized_kv(1, 1, len(filled), D, bits)
    torch_tq.hadamard_quantize_kv(expected[None, :, None], ref_codes, ref_norms, 0, False, bits, signs)
    assert torch.equal(codes[0, 0, filled], ref_codes[0, 0])
    assert torch.equal(norms[0, 0, filled], ref_norms[0, 0])


@pytest.mark.parametrize("D", [64, 512])
def test_signs_none_means_the_canonical_signs_on_every_op(D):
    """A cache written with ``hadamard_signs(D)`` reads the same without ``signs`` (and vice versa);
    the plain Walsh-Hadamard transform (all ones) is a different encoding."""
    bits, C, T = 4, 8, 5
    src = torch.randn(1, T, 2, D) * 2
    written = {}
    for kind, signs in [("given", torch_tq.hadamard_signs(D)), ("default", None), ("plain", torch.ones(D))]:
        codes, norms = allocate_quantized_kv(1, 2, C, D, bits)
        torch_tq.hadamard_quantize_kv(src, codes, norms, 0, bits=bits, signs=signs)
        written[kind] = (codes, norms)
    assert torch.equal(written["given"][0], written["default"][0])
    assert not torch.equal(written["given"][0], written["plain"][0])

    codes, norms = written["given"]
    decoded = torch_tq.dequantize_kv(codes, norms, 0, T, bits)
    torch.testing.assert_close(decoded, torch_tq.dequantize_kv(codes, norms, 0, T, bits, signs=torch_tq.hadamard_signs(D)),
                               rtol=0, atol=0)
    # 4-bit TurboQuant keeps ~10% relative error; a decode with the wrong signs is ~100% off.
    rel = (decoded - src.transpose(1, 2)).norm() / src.norm()
    assert rel < 0.2, rel

    q = torch.randn(1, 4, 1, D)
    out_default = torch_tq.flash_attn_vec_tq(q, codes, norms, codes, norms, T, D ** -0.5, bits)
    out_given = torch_tq.flash_attn_vec_tq(q, codes, norms, codes, norms, T, D ** -0.5, bits,
                                           signs=torch_tq.hadamard_signs(D))
    torch.testing.assert_close(out_default, out_given, rtol=0, atol=0)
