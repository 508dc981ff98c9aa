"""torch_tq.nn: TurboQuantKVCache and TurboQuantAttention against a full-precision reference."""

from __future__ import annotations

import math

import pytest
import torch

import torch_tq
from torch_tq.layout import quantized_nbytes
from torch_tq.nn import TurboQuantAttention, TurboQuantKVCache, merge_attention, reference_attention

# Relative RMS error of attention outputs over a b-bit cache (TurboQuant MSE ~ 4^-b; generous margins).
ATTN_RATIO = {4: 0.2, 8: 0.02}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _attention_over(q, k, v, kv_len, window=0, kv_start=None, scale=None):
    """Reference decode attention: q [B, Hq, Lq, D] at the last Lq of kv_len positions; k, v [B, Hkv, N, D] for positions [kv_len-N, kv_len)."""
    B, Hq, Lq, D = q.shape
    N = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    group = Hq // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    s = scale * q.double() @ kk.transpose(-1, -2)
    pos_k = torch.arange(kv_len - N, kv_len)
    pos_q = torch.arange(kv_len - Lq, kv_len)[:, None]
    allowed = pos_k[None] <= pos_q
    if window:
        allowed = allowed & (pos_k[None] > pos_q - window)
    allowed = allowed.expand(B, 1, Lq, N)
    if kv_start is not None:
        allowed = allowed & (pos_k[None, None, None] >= kv_start[:, None, None, None])
    s = s.masked_fill(~allowed, -math.inf)
    return torch.softmax(s, -1) @ vv


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("case", ["B2-Hq4-Hkv2-D64", "B1-Hq9-Hkv3-D64", "B1-Hq2-Hkv1-D128"])
def test_turboquant_kv_cache_attend(bits, case):
    B, Hq, Hkv, D = (int(x[len(p):]) for x, p in zip(case.split("-"), ("B", "Hq", "Hkv", "D")))
    cache = TurboQuantKVCache(Hkv, D, capacity=48, bits=bits, batch_size=B)
    k, v = torch.randn(B, 37, Hkv, D) + 2.0, torch.randn(B, 37, Hkv, D)
    cache.append(k[:, :30], v[:, :30])
    cache.append(k[:, 30:], v[:, 30:])
    assert cache.seq_len == 37 and cache.num_valid == 37
    q = torch.randn(B, Hq, 3, D)
    out = cache.attend(q)
    assert out.shape == q.shape and out.dtype == q.dtype
    # Exactly the attention over the dequantized cache (centering keys is softmax-invariant) ...
    kd, vd = cache.dequantize()
    assert kd.shape == (B, Hkv, 37, D)
    exact = _attention_over(q, kd, vd, 37)
    assert _rel(out, exact) < 1e-5
    # ... and close to the attention over the original K/V.
    ref = _attention_over(q, k.transpose(1, 2), v.transpose(1, 2), 37)
    assert _rel(out, ref) < ATTN_RATIO[bits]


def test_turboquant_kv_cache_sliding_ring():
    W, C, D = 8, 12, 64
    cache = TurboQuantKVCache(2, D, capacity=C, bits=8, sliding_window=W)
    k, v = torch.randn(1, 30, 2, D), torch.randn(1, 30, 2, D)
    for start in range(0, 30, 5):
        cache.append(k[:, start : start + 5], v[:, start : start + 5])
    assert cache.seq_len == 30 and cache.num_valid == C
    kd, vd = cache.dequantize()  # positions [18, 30)
    assert _rel(kd, k[:, 18:].transpose(1, 2)) < 0.01
    q = torch.randn(1, 4, 5, D)
    out = cache.attend(q)  # window 8, 5 queries: needs W + Lq - 1 = 12 <= C
    ref = _attention_over(q, k[:, 18:].transpose(1, 2), v[:, 18:].transpose(1, 2), 30, window=W)
    assert _rel(out, ref) < ATTN_RATIO[8]


def test_turboquant_kv_cache_kv_start():
    D = 64
    cache = TurboQuantKVCache(1, D, capacity=16, bits=8, batch_size=2)
    k, v = torch.randn(2, 10, 1, D), torch.randn(2, 10, 1, D)
    cache.append(k, v)
    kv_start = torch.tensor([0, 4])
    q = torch.randn(2, 2, 1, D)
    out = cache.attend(q, kv_start=kv_start)
    ref = _attention_over(q, k.transpose(1, 2), v.transpose(1, 2), 10, kv_start=kv_start)
    assert _rel(out, ref) < ATTN_RATIO[8]


def test_turboquant_kv_cache_buffers_nbytes_reset_grow():
    cache = TurboQuantKVCache(3, 64, capacity=16, bits=4, batch_size=2)
    names = dict(cache.named_buffers())
    assert set(names) == {"k_codes", "k_norms", "v_codes", "v_norms", "signs", "k_mean", "sink_k", "sink_v", "recent_k", "recent_v"}
    assert cache.k_codes.shape == (2, 3, 16, 32) and cache.k_codes.dtype == torch.uint8
    assert cache.k_norms.shape == (2, 3, 16, 1) and cache.k_norms.dtype == torch.float32
    # Signs are always passed, and default to the package's fixed pseudo-random vector.
    assert torch.equal(cache.signs, torch_tq.hadamard_signs(64))
    assert cache.nbytes == 2 * torch_tq.quantized_nbytes(2, 3, 16, 64, 4)
    k, v = torch.randn(2, 10, 3, 64), torch.randn(2, 10, 3, 64)
    cache.append(k, v)
    before = cache.dequantize()
    assert cache.nbytes_used == 2 * torch_tq.quantized_nbytes(2, 3, 10, 64, 4)
    with pytest.raises(ValueError, match="overflow the global cache capacity C=16"):
        cache.append(k, v)
    cache.grow(40)
    assert cache.capacity == 40
    after = cache.dequantize()
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    cache.append(k, v)
    assert cache.seq_len == 20
    cache.index_batch(torch.tensor([1, 0]))
    assert torch.equal(cache.dequantize()[0][0, :, :10], after[0][1])
    cache.reset()
    assert cache.seq_len == 0 and not cache.k_codes.any()


def test_turboquant_kv_cache_errors():
    with pytest.raises(ValueError, match="head_dim must be one of"):
        TurboQuantKVCache(2, 80, capacity=8)
    with pytest.raises(ValueError, match="bits must be one of"):
        TurboQuantKVCache(2, 64, capacity=8, bits=7)
    with pytest.raises(ValueError, match="capacity >= sliding_window"):
        TurboQuantKVCache(2, 64, capacity=8, sliding_window=9)
    cache = TurboQuantKVCache(2, 64, capacity=8, sliding_window=4)
    with pytest.raises(ValueError, match="cannot grow"):
        cache.grow(16)
    cache.append(torch.randn(1, 2, 2, 64), torch.randn(1, 2, 2, 64))
    with pytest.raises(ValueError, match="softcap > 0 needs center_keys=False"):
        cache.attend(torch.randn(1, 2, 1, 64), softcap=30.0)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("window,softcap,sinks,recent", [(0, 0.0, 0, 0), (6, 0.0, 0, 0), (0, 20.0, 0, 0), (0, 0.0, 2, 3),
                                                         (0, 20.0, 2, 3)],
                         ids=["full", "window6", "softcap20", "full-sinks2-recent3", "softcap20-sinks2-recent3"])
def test_turboquant_attention_prefill_then_decode(bits, window, softcap, sinks, recent):
    B, Hq, Hkv, D, T = 2, 4, 2, 64, 20
    q, k, v = torch.randn(B, T, Hq, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    ref = reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softcap=softcap,
                              sliding_window=window).transpose(1, 2)
    attn = TurboQuantAttention(Hq, Hkv, D, capacity=24, bits=bits, batch_size=B, sliding_window=window, softcap=softcap,
                               sink_tokens=sinks, recent_tokens=recent)
    prefill = attn(q[:, :12], k[:, :12], v[:, :12])
    # The prefill is full precision: identical to the reference up to float rounding.
    assert _rel(prefill, ref[:, :12]) < 1e-5
    chunk = attn(q[:, 12:15], k[:, 12:15], v[:, 12:15])
    steps = [attn(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1]) for t in range(15, T)]
    out = torch.cat([chunk] + steps, dim=1)
    assert out.shape == (B, T - 12, Hq, D)
    assert _rel(out, ref[:, 12:]) < ATTN_RATIO[bits]
    assert attn.cache.seq_len == T


def test_turboquant_attention_decode_calls_fused_op(monkeypatch):
    calls = []
    real = torch_tq._ops.flash_attn_vec_tq

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_tq._ops, "flash_attn_vec_tq", spy)
    attn = TurboQuantAttention(4, 2, 64, capacity=16)
    attn(torch.randn(1, 5, 4, 64), torch.randn(1, 5, 2, 64), torch.randn(1, 5, 2, 64))
    assert calls == []  # prefill: SDPA on the fresh full-precision K/V
    attn(torch.randn(1, 1, 4, 64), torch.randn(1, 1, 2, 64), torch.randn(1, 1, 2, 64))
    assert calls == [(1, 4, 1, 64)]


def test_merge_attention_equals_attention_over_the_union():
    """Two attentions over disjoint key sets, merged by their log-sum-exp, equal the attention over all keys."""
    B, H, L, N, D = 2, 3, 4, 11, 16
    q, k, v = torch.randn(B, H, L, D, dtype=torch.float64), torch.randn(B, H, N, D, dtype=torch.float64), torch.randn(B, H, N, D, dtype=torch.float64)
    s = q @ k.transpose(-1, -2)
    part = torch.zeros(N, dtype=torch.bool)
    part[[0, 3, 4, 9]] = True

    def attend(mask):
        sm = s.masked_fill(~mask, -math.inf)
        return (torch.softmax(sm, -1) @ v).nan_to_num(0.0), torch.logsumexp(sm, -1)

    out_a, lse_a = attend(part)
    out_b, lse_b = attend(~part)
    merged = merge_attention(out_a, lse_a.float(), out_b, lse_b.float())
    torch.testing.assert_close(merged.double(), torch.softmax(s, -1) @ v, rtol=1e-5, atol=1e-6)
    # A part without keys (lse = -inf) is ignored; no keys at all gives zeros.
    empty = torch.full_like(lse_a, -math.inf).float()
    torch.testing.assert_close(merge_attention(out_a, lse_a.float(), torch.zeros_like(out_b), empty), out_a.float())
    assert torch.equal(merge_attention(out_a * 0, empty, out_b * 0, empty), torch.zeros(B, H, L, D))


@pytest.mark.parametrize("recent", [0, 5])
@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("case", ["decode", "multi-query", "kv-start", "window", "fewer-tokens-than-sinks", "long-chunk",
                                  "long-chunk-window", "sliding-wrapped", "k8v3"])
def test_full_precision_sinks_and_recent_tokens_attend_exactly(case, sinks, recent):
    """Sink and recent positions are attended in full precision, the rest from the codes, in one exact softmax.

    "long-chunk": the last call adds 12 tokens (> recent), so some of its own queries read older neighbours
    from the codes; "sliding-wrapped": a ring-buffer cache that has wrapped keeps its recent window."""
    B, Hq, Hkv, D = 2, 4, 2, 64
    N = 3 if case == "fewer-tokens-than-sinks" else 45 if case == "sliding-wrapped" else 29
    Lq = {"multi-query": 3, "kv-start": 3, "fewer-tokens-than-sinks": 3, "long-chunk": 12, "long-chunk-window": 12,
          "sliding-wrapped": 2}.get(case, 1)
    kv_start = torch.tensor([0, 2]) if case == "kv-start" else None
    window = 10 if case in ("window", "long-chunk-window") else 0
    sliding = 12 if case == "sliding-wrapped" else 0
    v_bits = 3 if case == "k8v3" else None
    cache = TurboQuantKVCache(Hkv, D, capacity=32 if not sliding else 16, bits=8 if v_bits else 4, batch_size=B,
                              sliding_window=sliding, sink_tokens=sinks, recent_tokens=recent, v_bits=v_bits)
    k, v = torch.randn(B, N, Hkv, D) + 1.0, torch.randn(B, N, Hkv, D)
    for lo, hi in ((0, 2), (2, max(2, N - Lq)), (max(2, N - Lq), N)):  # chunks, the queries' own tokens last
        cache.append(k[:, lo:hi], v[:, lo:hi])
    assert cache.num_recent == min(N, recent) and cache.num_sinks == min(N, sinks)
    q = torch.randn(B, Hq, Lq, D)
    out = cache.attend(q, sliding_window=window or None, kv_start=kv_start)
    kd, vd = cache.dequantize()
    lo = N - kd.shape[2]
    positions = torch.arange(lo, N)
    # dequantize() shows what attend uses: full precision at the sink and recent positions ...
    full = (positions < sinks) | (positions >= N - recent)
    ks, vs = k.transpose(1, 2)[:, :, lo:], v.transpose(1, 2)[:, :, lo:]
    torch.testing.assert_close(kd[:, :, full], ks[:, :, full])
    torch.testing.assert_close(vd[:, :, full], vs[:, :, full])
    # ... codes elsewhere (the quantization error is far above float rounding) ...
    assert full.all() or (kd[:, :, ~full] - ks[:, :, ~full]).abs().max() > 1e-3
    # ... and attend equals attention over exactly those K/V.
    exact = _attention_over(q, kd, vd, N, window=window or sliding, kv_start=kv_start)
    assert _rel(out, exact) < 1e-5
    held = kd.shape[2]
    codes = quantized_nbytes(B, Hkv, held, D, cache.bits) + quantized_nbytes(B, Hkv, held, D, cache.v_bits)
    assert cache.nbytes_used == codes + 2 * B * Hkv * D * 4 * (min(sinks, N) + min(recent, N))


def test_recent_tokens_truncate_and_dequantize_range():
    cache = TurboQuantKVCache(1, 64, capacity=32, bits=8, sink_tokens=2, recent_tokens=4)
    k, v = torch.randn(1, 20, 1, 64), torch.randn(1, 20, 1, 64)
    for t in range(0, 20, 3):
        cache.append(k[:, t : t + 3], v[:, t : t + 3])
    assert (cache.seq_len, cache.num_recent) == (20, 4)
    kd, _ = cache.dequantize_range(10, 8)  # codes 10..15, then full precision 16..17
    torch.testing.assert_close(kd[0, 0, 6:], k[0, 16:18, 0])
    assert 1e-4 < (kd[0, 0, :6] - k[0, 10:16, 0]).abs().max() < 0.05  # 8-bit codes
    # Cutting 2 tokens: positions 14, 15 come back into the window, but their ring slots held 18, 19:
    # they are refilled from the codes, so the cache attends to exactly what dequantize() shows.
    cache.truncate(18)
    kd, vd = cache.dequantize()
    torch.testing.assert_close(kd[0, 0, 16:18], k[0, 16:18, 0])
    assert 1e-4 < (kd[0, 0, 14:16] - k[0, 14:16, 0]).abs().max() < 0.05
    q = torch.randn(1, 2, 1, 64)
    assert _rel(cache.attend(q), _attention_over(q, kd, vd, 18)) < 1e-5
    cache.truncate(9)
    cache.append(k[:, 9:12], v[:, 9:12])
    assert cache.seq_len == 12
    kd, _ = cache.dequantize()
    torch.testing.assert_close(kd[0, 0, 9:12], k[0, 9:12, 0])
    # One long prefill: every token is quantized, and the windows keep only their fixed sizes.
    cache.reset()
    cache.append(k, v)
    assert (cache.seq_len, cache.num_recent, cache.recent_k.shape[2]) == (20, 4, 4)


def test_window_rules():
    with pytest.raises(ValueError, match="sink_tokens must be >= 0"):
        TurboQuantKVCache(2, 64, capacity=8, sink_tokens=-1)
    with pytest.raises(ValueError, match="recent_tokens must be >= 0"):
        TurboQuantKVCache(2, 64, capacity=8, recent_tokens=-3)
    with pytest.raises(ValueError, match="recent_tokens=9 exceeds the capacity C=8"):
        TurboQuantKVCache(2, 64, capacity=8, recent_tokens=9)
    with pytest.raises(ValueError, match="v_bits must be one of"):
        TurboQuantKVCache(2, 64, capacity=8, v_bits=7)


@pytest.mark.parametrize("window_dtype, stored", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                  ("auto", torch.bfloat16), ("model", torch.float32)])
def test_window_dtype_of_a_float32_cache(window_dtype, stored):
    """Windows stored in a dtype other than the K/V's: they hold the rotated, centred K/V rounded to that
    dtype (checked against the float64 oracle), attend reads them as they are (equal to the attention
    over dequantize()), and the bytes count their real size."""
    from _oracle import rotate64

    B, Hq, Hkv, D, N, S, W = 2, 6, 3, 64, 29, 4, 8
    cache = TurboQuantKVCache(Hkv, D, capacity=40, bits=4, batch_size=B, sink_tokens=S, recent_tokens=W,
                              window_dtype=window_dtype)
    k, v = torch.randn(B, N, Hkv, D) + 1.0, torch.randn(B, N, Hkv, D)
    cache.append(k[:, :20], v[:, :20])
    for t in range(20, N):
        cache.append(k[:, t : t + 1], v[:, t : t + 1])
    assert {t.dtype for t in (cache.sink_k, cache.sink_v, cache.recent_k, cache.recent_v)} == {stored}
    expect_k = rotate64(k - cache.k_mean[:, None], cache.signs).transpose(1, 2)  # [B, Hkv, N, D]
    expect_v = rotate64(v, cache.signs).transpose(1, 2)
    newest = torch.arange(N - W, N)
    for got, want in ((cache.sink_k, expect_k[:, :, :S]), (cache.sink_v, expect_v[:, :, :S]),
                      (cache.recent_k[:, :, newest % W], expect_k[:, :, newest]),
                      (cache.recent_v[:, :, newest % W], expect_v[:, :, newest])):
        # Rounded once to the stored dtype (at most one unit in the last place away from the exact values).
        torch.testing.assert_close(got.double(), want, rtol=torch.finfo(stored).eps, atol=1e-5)
    q = torch.randn(B, Hq, 1, D)
    out = cache.attend(q)
    assert out.dtype == q.dtype
    kd, vd = cache.dequantize()
    assert _rel(out, _attention_over(q, kd, vd, N)) < 1e-5
    codes = quantized_nbytes(B, Hkv, N, D, 4) * 2
    assert cache.nbytes_used == codes + 2 * B * Hkv * D * stored.itemsize * (S + W)


def test_window_dtype_auto_keeps_16_bit_models_and_rejects_others():
    for kv_dtype in (torch.float16, torch.bfloat16):
        cache = TurboQuantKVCache(1, 64, capacity=8, sink_tokens=2, recent_tokens=2, window_dtype="auto")
        cache.append(torch.randn(1, 3, 1, 64, dtype=kv_dtype), torch.randn(1, 3, 1, 64, dtype=kv_dtype))
        assert cache.recent_k.dtype == kv_dtype and cache.sink_v.dtype == kv_dtype
    attn = TurboQuantAttention(2, 1, 64, capacity=8, recent_tokens=4, window_dtype=torch.bfloat16)
    assert attn.cache.recent_k.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="window_dtype must be one of"):
        TurboQuantKVCache(1, 64, capacity=8, window_dtype=torch.float64)
    with pytest.raises(ValueError, match="window_dtype must be one of"):
        TurboQuantKVCache(1, 64, capacity=8, window_dtype="bf16")
