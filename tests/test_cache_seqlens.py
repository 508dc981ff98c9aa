"""Per-sequence lengths read on the device (``cache_seqlens``): each sequence of a batch behaves exactly
like an ordinary call with its own ``write_pos`` / ``kv_len``; bad lengths get clear errors."""

import math

import pytest
import torch

import torch_tq

B, HQ, HKV, D, C, S, W = 3, 4, 2, 64, 40, 4, 6


def _caches(bits=4, v_bits=3, window_dtype=torch.float32):
    k = torch_tq.allocate_quantized_kv(B, HKV, C, D, bits)
    v = torch_tq.allocate_quantized_kv(B, HKV, C, D, v_bits)
    poison = lambda n: torch.full((B, HKV, n, D), math.nan, dtype=window_dtype)  # noqa: E731
    return [*k, *v, poison(S), poison(S), poison(W), poison(W)]


def _fill(cache, lengths, sliding=False, bits=4, v_bits=3):
    """Each sequence b gets lengths[b] random tokens through ordinary calls (write_pos per sequence)."""
    kc, kn, vc, vn, k_sink, v_sink, k_recent, v_recent = cache
    for b, n in enumerate(lengths):
        row = lambda t: t[b : b + 1]  # noqa: E731
        k, v = torch.randn(1, n, HKV, D) * 2, torch.randn(1, n, HKV, D)
        torch_tq.hadamard_quantize_kv(k, row(kc), row(kn), 0, sliding, bits, None, None, True, row(k_sink), row(k_recent))
        torch_tq.hadamard_quantize_kv(v, row(vc), row(vn), 0, sliding, v_bits, None, None, True, row(v_sink),
                                      row(v_recent))


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("sliding", [False, True])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_quantize_writes_each_sequence_at_its_own_position(T, sliding, dtype):
    lengths = [0, 7, 33] if not sliding else [0, 38, 77]
    src = torch.randn(B, T, HKV, D)
    offset = torch.randn(B, HKV, D)
    got, want = _caches(), _caches()
    torch_tq.hadamard_quantize_kv(src, got[0], got[1], 0, sliding, 4, None, offset, True, got[4], got[6],
                                  cache_seqlens=torch.tensor(lengths, dtype=dtype))
    for b, n in enumerate(lengths):
        row = lambda t: t[b : b + 1]  # noqa: E731
        torch_tq.hadamard_quantize_kv(row(src), row(want[0]), row(want[1]), n, sliding, 4, None, row(offset), True,
                                      row(want[4]), row(want[6]))
    for name, g, w in zip(("codes", "norms", "sink", "recent"), (got[0], got[1], got[4], got[6]),
                          (want[0], want[1], want[4], want[6])):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize("Lq", [1, 3])
@pytest.mark.parametrize("sliding_window", [0, 9])
def test_attention_reads_each_sequence_with_its_own_length(Lq, sliding_window):
    lengths = [Lq, 11, 40]
    cache = _caches()
    _fill(cache, lengths)
    q = torch.randn(B, HQ, Lq, D)
    lse = torch.full((B, HQ, Lq), math.nan)
    kv_start = torch.tensor([0, 2, 5])
    out = torch_tq.flash_attn_vec_tq(q, *cache[:4], C, D**-0.5, 4, sliding_window, 0.0, kv_start, None, lse, 3,
                                     *cache[4:], cache_seqlens=torch.tensor(lengths, dtype=torch.int32))
    for b, n in enumerate(lengths):
        row = lambda t: t[b : b + 1]  # noqa: E731
        row_lse = torch.full((1, HQ, Lq), math.nan)
        want = torch_tq.flash_attn_vec_tq(row(q), *(row(t) for t in cache[:4]), n, D**-0.5, 4, sliding_window, 0.0,
                                          row(kv_start), None, row_lse, 3, *(row(t) for t in cache[4:]))
        torch.testing.assert_close(out[b : b + 1], want, rtol=0, atol=0)
        torch.testing.assert_close(lse[b : b + 1], row_lse, rtol=0, atol=0)


def test_a_decode_step_with_device_lengths_equals_the_host_length_step():
    """The static-cache pattern: write at cache_seqlens, then attend with cache_seqlens + 1, kv_len = C."""
    cache = _caches(bits=4, v_bits=4)
    _fill(cache, [9, 9, 9], bits=4, v_bits=4)
    host = [t.clone() for t in cache]
    k, v, q = torch.randn(B, 1, HKV, D), torch.randn(B, 1, HKV, D), torch.randn(B, HQ, 1, D)
    lens = torch.full((B,), 9, dtype=torch.int32)
    for src, (codes, norms, sink, recent) in ((k, (0, 1, 4, 6)), (v, (2, 3, 5, 7))):
        torch_tq.hadamard_quantize_kv(src, cache[codes], cache[norms], 0, bits=4, sink=cache[sink],
                                      recent=cache[recent], cache_seqlens=lens)
        torch_tq.hadamard_quantize_kv(src, host[codes], host[norms], 9, bits=4, sink=host[sink], recent=host[recent])
    out = torch_tq.flash_attn_vec_tq(q, *cache[:4], C, D**-0.5, k_sink=cache[4], v_sink=cache[5],
                                     k_recent=cache[6], v_recent=cache[7], cache_seqlens=lens + 1)
    want = torch_tq.flash_attn_vec_tq(q, *host[:4], 10, D**-0.5, k_sink=host[4], v_sink=host[5], k_recent=host[6],
                                      v_recent=host[7])
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def _quantize(**kw):
    k = torch_tq.allocate_quantized_kv(B, HKV, C, D, 4)
    args = dict(src=torch.randn(B, 2, HKV, D), codes=k[0], norms=k[1], write_pos=0)
    args.update(kw)
    torch_tq.hadamard_quantize_kv(**args)


def _attend(**kw):
    k = torch_tq.allocate_quantized_kv(B, HKV, C, D, 4)
    args = dict(q=torch.randn(B, HQ, 1, D), k_codes=k[0], k_norms=k[1], v_codes=k[0], v_norms=k[1], kv_len=C,
                scale=0.125)
    args.update(kw)
    return torch_tq.flash_attn_vec_tq(**args)


@pytest.mark.parametrize("call, kw, message", [
    (_quantize, dict(cache_seqlens=torch.zeros(2, dtype=torch.int32)), r"cache_seqlens must have shape \[B\] = \[3\], got \[2\]"),
    (_quantize, dict(cache_seqlens=torch.zeros(3)), "cache_seqlens must be int32 or int64, got torch.float32"),
    (_quantize, dict(cache_seqlens=torch.zeros(3, dtype=torch.int32, device="meta")),
     "cache_seqlens is on meta but src is on cpu"),
    (_quantize, dict(cache_seqlens=torch.zeros(3, dtype=torch.int32), write_pos=4),
     "write_pos must be 0 when cache_seqlens gives each sequence's write position, got 4"),
    (_quantize, dict(cache_seqlens=torch.tensor([0, -1, 0])), r"cache_seqlens\[1\] must be >= 0, got -1"),
    (_quantize, dict(cache_seqlens=torch.tensor([0, 39, 0])),
     "write of T=2 tokens at write_pos=39 overflows the global cache capacity C=40"),
    (_attend, dict(cache_seqlens=torch.tensor([1, 41, 1]), kv_len=40), r"cache_seqlens\[1\]=41 exceeds kv_len=40"),
    (_attend, dict(cache_seqlens=torch.tensor([1, 0, 1])), r"cache_seqlens\[1\] must be >= 1 \(Lq\), got 0"),
    (_attend, dict(cache_seqlens=torch.zeros(3, 1, dtype=torch.int32)), r"cache_seqlens must have shape \[B\] = \[3\]"),
])
def test_bad_lengths_are_rejected(call, kw, message):
    with pytest.raises(ValueError, match=message):
        call(**kw)
