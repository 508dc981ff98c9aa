"""torch_tq.nn: TurboQuantKVCache and TurboQuantAttention against a full-precision reference."""

from __future__ import annotations

import math

import pytest
import torch

import torch_tq
from torch_tq.nn import TurboQuantAttention, TurboQuantKVCache, reference_attention

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
    assert set(names) == {"k_codes", "k_norms", "v_codes", "v_norms", "signs", "k_mean"}
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
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (6, 0.0), (0, 20.0)], ids=["full", "window6", "softcap20"])
def test_turboquant_attention_prefill_then_decode(bits, window, softcap):
    B, Hq, Hkv, D, T = 2, 4, 2, 64, 20
    q, k, v = torch.randn(B, T, Hq, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    ref = reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softcap=softcap,
                              sliding_window=window).transpose(1, 2)
    attn = TurboQuantAttention(Hq, Hkv, D, capacity=24, bits=bits, batch_size=B, sliding_window=window, softcap=softcap)
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
