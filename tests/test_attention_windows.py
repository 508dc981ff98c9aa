"""The decode path's op semantics: full-precision sink/recent windows inside flash_attn_vec_tq, separate
value bit widths, and the quantize op's offset, norm correction and window writes, against float64 oracles."""

import math

import pytest
import torch

import torch_tq
from _oracle import attention64, block_of, decode_rotated64, encode64, rotate64, union_kv64, unpack_bits
from _utils import assert_close

OUT_RATIO = {torch.float32: 2e-5, torch.float16: 1.5e-3, torch.bfloat16: 1e-2}
# A full-precision window stores rotated vectors in its own dtype: one rounding of the rotated value.
WINDOW_TOL = {torch.float32: dict(rtol=1e-5, atol=2e-6), torch.float16: dict(rtol=1e-3, atol=1e-4),
              torch.bfloat16: dict(rtol=8e-3, atol=1e-3)}


def write_tokens(B, Hkv, D, C, bits, v_bits, kv_len, sliding, signs, sinks, recent, window_dtype, chunks, offset):
    """Append kv_len random tokens in the given chunk sizes through hadamard_quantize_kv with every decode-path
    option; return (cache tensors, the K/V written [B, kv_len, Hkv, D])."""
    k = torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits)
    v = torch_tq.allocate_quantized_kv(B, Hkv, C, D, v_bits)
    new = lambda n: torch.full((B, Hkv, n, D), float("nan"), dtype=window_dtype)  # poisoned: unwritten shows
    k_sink, v_sink = (new(sinks), new(sinks)) if sinks is not None else (None, None)
    k_recent, v_recent = (new(recent), new(recent)) if recent is not None else (None, None)
    ks, vs = torch.randn(B, kv_len, Hkv, D) * 2 + 0.5, torch.randn(B, kv_len, Hkv, D)
    pos, i = 0, 0
    while pos < kv_len:
        T = min(chunks[i % len(chunks)], kv_len - pos)
        torch_tq.hadamard_quantize_kv(ks[:, pos : pos + T], *k, pos, sliding, bits, signs, offset, True, k_sink, k_recent)
        torch_tq.hadamard_quantize_kv(vs[:, pos : pos + T], *v, pos, sliding, v_bits, signs, None, True, v_sink, v_recent)
        pos, i = pos + T, i + 1
    return (*k, *v, k_sink, v_sink, k_recent, v_recent), ks, vs


CASES = [
    # name, B, Hq, Hkv, Lq, D, C, kv_len, bits, v_bits, window, softcap, kv_start, sinks, recent, q dtype, window dtype, chunks
    ("decode_sinks_recent", 1, 9, 3, 1, 64, 64, 50, 4, 4, 0, 0.0, None, 4, 8, torch.float32, torch.float32, [20, 1]),
    ("k8v4_gqa_batch", 2, 8, 2, 1, 128, 40, 33, 8, 4, 0, 0.0, None, 4, 16, torch.float32, torch.float32, [7]),
    ("k4v2_multi_query", 1, 6, 2, 5, 64, 48, 40, 4, 2, 0, 0.0, None, 2, 6, torch.float16, torch.float16, [30, 5, 1]),
    ("k3v2_recent_only", 1, 4, 2, 3, 128, 32, 29, 3, 2, 0, 0.0, None, None, 5, torch.float32, torch.float32, [3]),
    ("sinks_only_lse", 2, 4, 4, 2, 64, 32, 21, 5, 6, 0, 0.0, None, 4, None, torch.float32, torch.float32, [9, 2]),
    ("short_sequence_overlap", 1, 4, 2, 2, 64, 16, 3, 4, 4, 0, 0.0, None, 4, 8, torch.float32, torch.float32, [2, 1]),
    ("lq_longer_than_ring", 1, 4, 2, 9, 64, 32, 30, 4, 3, 0, 0.0, None, 4, 4, torch.float32, torch.float32, [12, 9]),
    ("sliding_wrapped", 2, 4, 2, 2, 64, 16, 45, 4, 4, 12, 0.0, None, 4, 6, torch.float32, torch.float32, [10, 1]),
    ("window_global", 1, 4, 2, 3, 64, 64, 40, 4, 2, 10, 0.0, None, 4, 8, torch.float32, torch.float32, [16]),
    ("softcap", 1, 4, 2, 2, 64, 32, 25, 4, 4, 0, 5.0, None, 4, 8, torch.float32, torch.float32, [5]),
    ("kv_start_left_padding", 3, 4, 2, 2, 64, 32, 21, 4, 4, 0, 0.0, [0, 3, 19], 4, 8, torch.float32, torch.float32, [21]),
    ("bf16_windows_d256", 1, 4, 1, 2, 256, 24, 20, 4, 3, 0, 0.0, None, 4, 8, torch.bfloat16, torch.bfloat16, [4]),
    ("d512_mixed_dtypes", 1, 2, 1, 1, 512, 12, 12, 6, 8, 0, 0.0, None, 2, 4, torch.float16, torch.float32, [5]),
    # A float32 model with bfloat16 windows (TurboQuantCache(window_dtype="auto")): the query stays float32.
    ("f32_query_bf16_windows", 1, 9, 3, 1, 64, 64, 50, 4, 4, 0, 0.0, None, 4, 8, torch.float32, torch.bfloat16,
     [20, 1]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_flash_attn_vec_tq_with_windows_matches_union_oracle(case, one_thread):
    (_, B, Hq, Hkv, Lq, D, C, kv_len, bits, v_bits, window, softcap, kv_start, sinks, recent, dtype, window_dtype,
     chunks) = case
    signs = torch_tq.hadamard_signs(D)
    offset = torch.randn(B, Hkv, D)
    cache, _, _ = write_tokens(B, Hkv, D, C, bits, v_bits, kv_len, kv_len > C or window > 0 and C < 64, signs, sinks,
                               recent, window_dtype, chunks, offset)
    q = torch.randn(B, Hq, Lq, D).to(dtype)
    start = None if kv_start is None else torch.tensor(kv_start, dtype=torch.int64)
    scale = D**-0.5
    lse = torch.full((B, Hq, Lq), float("nan"))
    out = torch_tq.flash_attn_vec_tq(q, *cache[:4], kv_len, scale, bits, window, softcap, start, signs, lse, v_bits,
                                     *cache[4:])
    k, v = union_kv64(*cache[:4], kv_len, bits, v_bits, signs, *cache[4:])
    ref, ref_lse = attention64(q.double(), k, v, kv_len, C, scale, window, softcap, start, return_lse=True)
    assert out.dtype == dtype and out.shape == (B, Hq, Lq, D)
    assert_close("flash_attn_vec_tq with windows", ref, out, OUT_RATIO[dtype])
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def test_windows_change_the_result():
    """The windows are read: attention with them differs from attention over the codes alone (and equals the
    codes-only call when the windows hold the decoded codes)."""
    B, Hq, Hkv, D, C, kv_len, bits = 1, 4, 2, 64, 32, 20, 2
    signs = torch_tq.hadamard_signs(D)
    cache, _, _ = write_tokens(B, Hkv, D, C, bits, bits, kv_len, False, signs, 4, 8, torch.float32, [20], None)
    q = torch.randn(B, Hq, 1, D)
    codes_only = torch_tq.flash_attn_vec_tq(q, *cache[:4], kv_len, D**-0.5, bits, signs=signs)
    with_windows = torch_tq.flash_attn_vec_tq(q, *cache[:4], kv_len, D**-0.5, bits, signs=signs, k_sink=cache[4],
                                              v_sink=cache[5], k_recent=cache[6], v_recent=cache[7])
    assert (codes_only - with_windows).abs().max() > 1e-2
    decoded = [torch_tq.dequantize_kv(c, n, 0, kv_len, bits, rotated=True) for c, n in (cache[0:2], cache[2:4])]
    ring = [torch.stack([d[:, :, p] for p in range(kv_len - 8, kv_len)], 2)[:, :, [(i - kv_len) % 8 for i in range(8)]]
            for d in decoded]
    ring = [torch.empty_like(r).index_copy_(2, torch.arange(kv_len - 8, kv_len) % 8, d[:, :, kv_len - 8 :])
            for r, d in zip(ring, decoded)]
    same = torch_tq.flash_attn_vec_tq(q, *cache[:4], kv_len, D**-0.5, bits, signs=signs, k_sink=decoded[0][:, :, :4].contiguous(),
                                      v_sink=decoded[1][:, :, :4].contiguous(), k_recent=ring[0], v_recent=ring[1])
    torch.testing.assert_close(same, codes_only, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sliding", [False, True])
def test_quantize_writes_the_rotated_centred_windows(window_dtype, sliding):
    B, Hkv, D, C, bits, S, W, kv_len = 2, 2, 128, 24, 4, 5, 7, 40 if sliding else 23
    signs = torch_tq.hadamard_signs(D)
    offset = torch.randn(B, Hkv, D)
    cache, ks, vs = write_tokens(B, Hkv, D, C, bits, bits, kv_len, sliding, signs, S, W, window_dtype, [3, 9, 1], offset)
    k_sink, v_sink, k_recent, v_recent = cache[4:]
    expect_k = rotate64(ks - offset[:, None], signs).transpose(1, 2)  # [B, Hkv, T, D]
    expect_v = rotate64(vs, signs).transpose(1, 2)
    tol = WINDOW_TOL[window_dtype]
    torch.testing.assert_close(k_sink.double(), expect_k[:, :, :S], **tol)
    torch.testing.assert_close(v_sink.double(), expect_v[:, :, :S], **tol)
    newest = torch.arange(kv_len - W, kv_len)
    torch.testing.assert_close(k_recent[:, :, newest % W].double(), expect_k[:, :, newest], **tol)
    torch.testing.assert_close(v_recent[:, :, newest % W].double(), expect_v[:, :, newest], **tol)


def test_one_long_write_keeps_the_last_positions_of_the_ring():
    B, Hkv, D, C, W, T = 1, 1, 64, 64, 8, 30
    codes, norms = torch_tq.allocate_quantized_kv(B, Hkv, C, D, 4)
    ring = torch.full((B, Hkv, W, D), float("nan"))
    sink = torch.full((B, Hkv, 4, D), float("nan"))
    src = torch.randn(B, T, Hkv, D)
    torch_tq.hadamard_quantize_kv(src, codes, norms, 3, False, 4, None, sink=sink, recent=ring)
    y = rotate64(src, None).transpose(1, 2)
    assert torch.isnan(sink[:, :, :3]).all(), "positions 0..2 were not written"
    torch.testing.assert_close(sink[:, :, 3].double(), y[:, :, 0], **WINDOW_TOL[torch.float32])
    newest = torch.arange(3 + T - W, 3 + T)
    torch.testing.assert_close(ring[:, :, newest % W].double(), y[:, :, newest - 3], **WINDOW_TOL[torch.float32])


@pytest.mark.parametrize("D", [64, 512])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_norm_correction_makes_decoded_norms_exact_and_keeps_codes(D, bits):
    B, T, Hkv, C = 2, 9, 2, 16
    signs = torch_tq.hadamard_signs(D)
    src = torch.randn(B, T, Hkv, D) * 3
    offset = torch.randn(B, Hkv, D)
    src[0, 0, 0] = offset[0, 0]  # a vector equal to the offset is zero after centring: it keeps norm 0
    plain = torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits)
    fixed = torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits)
    torch_tq.hadamard_quantize_kv(src, *plain, 2, False, bits, signs, offset)
    torch_tq.hadamard_quantize_kv(src, *fixed, 2, False, bits, signs, offset, norm_correction=True)
    assert torch.equal(plain.codes, fixed.codes)
    codes, true_norms, _ = encode64(src - offset[:, None], bits, signs)
    oracle_codes = unpack_bits(fixed.codes[:, :, 2 : 2 + T], bits).transpose(1, 2)
    # Stored norm n * sqrt(R) / ||c[code]||: the decoded block has norm n (the oracle's exact norm).
    decoded = decode_rotated64(oracle_codes, fixed.norms[:, :, 2 : 2 + T].transpose(1, 2), bits)
    R = block_of(D)
    decoded_norms = decoded.reshape(B, T, Hkv, D // R, R).norm(dim=-1)
    torch.testing.assert_close(decoded_norms, true_norms, rtol=2e-6, atol=1e-6)
    assert fixed.norms[0, 0, 2].eq(0).all()
    assert not torch.equal(plain.norms, fixed.norms)


def test_offset_is_subtracted_before_rotation():
    B, T, Hkv, D, C, bits = 1, 5, 2, 128, 8, 4
    signs = torch_tq.hadamard_signs(D)
    src, offset = torch.randn(B, T, Hkv, D), torch.randn(B, Hkv, D)
    a = torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits)
    b = torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits)
    torch_tq.hadamard_quantize_kv(src, *a, 0, False, bits, signs, offset)
    torch_tq.hadamard_quantize_kv(src - offset[:, None], *b, 0, False, bits, signs)
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.norms, b.norms, rtol=1e-6, atol=0)
