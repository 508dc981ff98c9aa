"""flash_attn_vec_tq on CPU against float64 attention over the oracle-decoded cache."""

import pytest
import torch

import torch_tq
from _oracle import attention64, decode_rotated64, unpack_bits, unrotate64
from _utils import assert_close

OUT_RATIO = {torch.float32: 2e-5, torch.float16: 1.5e-3, torch.bfloat16: 1e-2}


def build_cache(B, Hkv, D, C, bits, kv_len, sliding, signs, chunk=5):
    """Write kv_len random tokens in chunks (wrapping a sliding cache); return (k_codes, k_norms, v_codes, v_norms)."""
    k = torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits)
    v = torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits)
    pos = 0
    while pos < kv_len:
        T = min(chunk, kv_len - pos)
        torch_tq.hadamard_quantize_kv(torch.randn(B, T, Hkv, D) * 2, *k, pos, sliding, bits, signs)
        torch_tq.hadamard_quantize_kv(torch.randn(B, T, Hkv, D), *v, pos, sliding, bits, signs)
        pos += T
    return (*k, *v)


def decoded_window(codes, norms, kv_len, bits, signs):
    """Oracle decode of the valid positions max(0, kv_len - C) … kv_len-1, original domain, float64."""
    C = codes.shape[2]
    slots = [p % C for p in range(max(0, kv_len - C), kv_len)]
    return unrotate64(decode_rotated64(unpack_bits(codes[:, :, slots], bits), norms[:, :, slots], bits), signs)


CASES = [
    # name, B, Hq, Hkv, Lq, D, C, kv_len, bits, sliding_window, softcap, kv_start, dtype
    ("single_query", 1, 4, 4, 1, 64, 32, 17, 4, 0, 0.0, None, torch.float32),
    ("gqa_batch", 2, 9, 3, 1, 64, 40, 33, 4, 0, 0.0, None, torch.float32),
    ("gqa_4to1_d128_3bit", 1, 8, 2, 1, 128, 24, 24, 3, 0, 0.0, None, torch.float16),
    ("multi_query_causal", 2, 6, 2, 5, 128, 32, 20, 4, 0, 0.0, None, torch.float32),
    ("sliding_no_wrap", 1, 4, 2, 1, 64, 32, 30, 4, 8, 0.0, None, torch.float32),
    ("sliding_wrapped_ring", 2, 4, 2, 1, 64, 16, 45, 5, 16, 0.0, None, torch.float32),
    ("sliding_wrapped_multi_query", 1, 4, 1, 3, 256, 12, 31, 2, 10, 0.0, None, torch.bfloat16),
    ("softcap", 1, 4, 2, 2, 64, 32, 25, 4, 0, 5.0, None, torch.float32),
    ("kv_start_left_padding", 3, 4, 2, 2, 64, 32, 21, 4, 0, 0.0, [0, 7, 20], torch.float32),
    ("d512_6bit", 1, 2, 1, 1, 512, 8, 8, 6, 0, 0.0, None, torch.float16),
    ("bf16_8bit_all_features", 2, 8, 4, 2, 128, 16, 37, 8, 12, 30.0, [3, 25], torch.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_flash_attn_vec_tq_matches_oracle(case):
    _, B, Hq, Hkv, Lq, D, C, kv_len, bits, window, softcap, kv_start, dtype = case
    signs = torch_tq.hadamard_signs(D)
    k_codes, k_norms, v_codes, v_norms = build_cache(B, Hkv, D, C, bits, kv_len, kv_len > C or window > 0, signs)
    q = torch.randn(B, Hq, Lq, D).to(dtype)
    start = None if kv_start is None else torch.tensor(kv_start, dtype=torch.int64)
    scale = D**-0.5

    lse = torch.full((B, Hq, Lq), float("nan"))
    out = torch_tq.flash_attn_vec_tq(q, k_codes, k_norms, v_codes, v_norms, kv_len, scale, bits, window, softcap, start,
                                     signs, lse=lse)

    k = decoded_window(k_codes, k_norms, kv_len, bits, signs)
    v = decoded_window(v_codes, v_norms, kv_len, bits, signs)
    ref, ref_lse = attention64(q.double(), k, v, kv_len, C, scale, window, softcap, start, return_lse=True)
    assert out.dtype == dtype and out.shape == (B, Hq, Lq, D)
    assert_close("flash_attn_vec_tq", ref, out, OUT_RATIO[dtype])
    # Scores are float32 in the op (q's values are the same in both): absolute error ~1e-6 per unit of score.
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def test_fully_masked_row_is_zero():
    D, C = 64, 8
    signs = torch_tq.hadamard_signs(D)
    cache = build_cache(1, 1, D, C, 4, 6, False, signs)
    q = torch.randn(1, 2, 2, D)
    out = torch_tq.flash_attn_vec_tq(q, *cache, 6, 0.125, 4, kv_start=torch.tensor([5]), signs=signs)
    assert torch.equal(out[0, :, 0], torch.zeros(2, D)), "query at position 4 sees nothing at or after kv_start=5"
    assert out[0, :, 1].abs().sum() > 0


def test_close_to_full_precision_attention_at_8_bits():
    """End to end: 8-bit TurboQuant attention is close to SDPA over the unquantized K/V."""
    B, Hq, Hkv, D, N = 1, 8, 2, 128, 64
    k, v = torch.randn(B, N, Hkv, D), torch.randn(B, N, Hkv, D)
    signs = torch_tq.hadamard_signs(D)
    kc, vc = torch_tq.allocate_quantized_kv(B, Hkv, N, D, 8), torch_tq.allocate_quantized_kv(B, Hkv, N, D, 8)
    torch_tq.hadamard_quantize_kv(k, *kc, 0, bits=8, signs=signs)
    torch_tq.hadamard_quantize_kv(v, *vc, 0, bits=8, signs=signs)
    q = torch.randn(B, Hq, 1, D)
    out = torch_tq.flash_attn_vec_tq(q, *kc, *vc, N, D**-0.5, 8, signs=signs)
    kf = k.transpose(1, 2).repeat_interleave(Hq // Hkv, 1)
    vf = v.transpose(1, 2).repeat_interleave(Hq // Hkv, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kf, vf)
    assert_close("tq8 vs sdpa", ref, out, 0.02)
