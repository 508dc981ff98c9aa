"""flash_attn_vec_tq through its plan (main + reduce kernels) and the MSL simulator, against the CPU reference."""

import pytest
import torch

import torch_tq
from _utils import assert_close
import _plans

OUT_RATIO = {torch.float32: 2e-5, torch.float16: 1.5e-3, torch.bfloat16: 1e-2}


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


CASES = [
    # id, B, Hq, Hkv, Lq, D, C, kv_len, bits, sliding_window, softcap, kv_start, dtype, signs
    ("decode-D128-b4-gqa4", 1, 8, 2, 1, 128, 64, 50, 4, 0, 0.0, None, torch.float32, True),
    ("D64-b3-gqa3-lq3-kvstart", 2, 9, 3, 3, 64, 40, 33, 3, 0, 0.0, [0, 5], torch.float16, True),
    ("D256-b2-sliding-wrap", 1, 4, 2, 1, 256, 16, 37, 2, 16, 0.0, None, torch.bfloat16, True),
    ("D512-b5-softcap-lq2", 1, 2, 1, 2, 512, 24, 20, 5, 0, 30.0, None, torch.float32, False),
    ("D128-b6-window-lq4-wrap-kvstart", 2, 4, 4, 4, 128, 20, 45, 6, 12, 0.0, [3, 42], torch.float16, True),
    ("D64-b8-row-without-keys", 2, 2, 1, 1, 64, 8, 6, 8, 0, 0.0, [0, 7], torch.float32, True),
    ("D128-b4-splits", 1, 4, 1, 1, 128, 1024, 1000, 4, 0, 0.0, None, torch.float16, True),
    ("D64-b4-gqa8-row-tiles", 1, 16, 2, 2, 64, 32, 30, 4, 0, 0.0, None, torch.float32, True),
    ("D512-b3-window-wrap-bf16", 1, 4, 2, 3, 512, 10, 23, 3, 8, 20.0, None, torch.bfloat16, True),
    ("prefill-lq-eq-kvlen", 1, 2, 1, 9, 64, 9, 9, 4, 0, 0.0, None, torch.float32, True),
    ("B3-kvstart-window", 3, 6, 2, 2, 128, 16, 16, 5, 5, 0.0, [0, 2, 13], torch.float32, True),
]

# Every (D, bits) pair once at a small size, dtypes and signs varying along.
SWEEP = [
    (f"sweep-D{D}-b{b}", 1, 2, 1, 1, D, 12, 10, b, 0, 0.0, None, (torch.float32, torch.float16, torch.bfloat16)[i % 3],
     i % 2 == 0)
    for i, (D, b) in enumerate((D, b) for D in (64, 128, 256, 512) for b in (2, 3, 4, 5, 6, 8))
]


@pytest.mark.parametrize("case", CASES + SWEEP, ids=lambda c: c[0])
def test_flash_attn_vec_tq(case):
    name, B, Hq, Hkv, Lq, D, C, kv_len, bits, window, softcap, kv_start, dtype, use_signs = case
    signs = torch_tq.hadamard_signs(D) if use_signs else None
    cache = build_cache(B, Hkv, D, C, bits, kv_len, kv_len > C, signs)
    q = torch.randn(B, Hq, Lq, D).to(dtype)
    start = torch.tensor(kv_start, dtype=torch.int64) if kv_start is not None else None
    args = dict(kv_len=kv_len, scale=D**-0.5, bits=bits, sliding_window=window, softcap=softcap, kv_start=start,
                signs=signs)
    ref_lse, lse = (torch.full((B, Hq, Lq), float("nan")) for _ in range(2))
    ref = torch.ops.tq.flash_attn_vec_tq(q, *cache, **args, lse=ref_lse)
    out = _plans.run("flash_attn_vec_tq", q=q, k_codes=cache[0], k_norms=cache[1], v_codes=cache[2],
                     v_norms=cache[3], **args, lse=lse)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(name, ref.float(), out.float(), OUT_RATIO[dtype])
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    if kv_start is not None and max(kv_start) >= kv_len:
        assert torch.equal(out[1].float().abs().sum(), torch.tensor(0.0)), "a row without keys must be zeros"


def test_flash_attn_vec_tq_strided_q():
    D, bits = 64, 4
    cache = build_cache(1, 2, D, 16, bits, 9, False, None)
    q = torch.randn(1, 3, 4, D).transpose(1, 2)  # [B, Hq=4, Lq=3, D], non-contiguous
    ref = torch.ops.tq.flash_attn_vec_tq(q, *cache, 9, 0.125, bits)
    out = _plans.run("flash_attn_vec_tq", q=q, k_codes=cache[0], k_norms=cache[1], v_codes=cache[2],
                     v_norms=cache[3], kv_len=9, scale=0.125, bits=bits)
    assert_close("strided-q", ref, out, OUT_RATIO[torch.float32])


def test_flash_attn_vec_tq_decode_bytes_moved():
    """Decode at kv_len 4096 (B=1, Hq=32, Hkv=8, D=128, 4 bits) moves <= 1.1x the minimum device bytes.

    Minimum: every packed K/V byte and norm read once, q read once, the output written once. The
    excess is the split-KV partials (written and re-read), q and the signs read once per split.
    """
    B, Hq, Hkv, D, C, kv_len, bits = 1, 32, 8, 128, 4096, 4096, 4
    k_codes = torch.randint(0, 256, (B, Hkv, C, D * bits // 8), dtype=torch.uint8)
    v_codes = torch.randint(0, 256, (B, Hkv, C, D * bits // 8), dtype=torch.uint8)
    k_norms = torch.rand(B, Hkv, C, 1) * 10 + 1
    v_norms = torch.rand(B, Hkv, C, 1) * 10 + 1
    q = torch.randn(B, Hq, 1, D, dtype=torch.float16)
    signs = torch_tq.hadamard_signs(D)
    stats = []
    out = _plans.run("flash_attn_vec_tq", q=q, k_codes=k_codes, k_norms=k_norms, v_codes=v_codes, v_norms=v_norms,
                     kv_len=kv_len, scale=D**-0.5, bits=bits, signs=signs, stats=stats)
    ref = torch.ops.tq.flash_attn_vec_tq(q, k_codes, k_norms, v_codes, v_norms, kv_len, D**-0.5, bits, signs=signs)
    assert_close("decode-4096", ref.float(), out.float(), OUT_RATIO[torch.float16])
    minimum = (k_codes.numel() + v_codes.numel() + 4 * (k_norms.numel() + v_norms.numel())
               + 2 * q.numel() * q.element_size())
    ratio = _plans.device_bytes(stats) / minimum
    print(f"decode attention bytes moved / minimum = {ratio:.4f}")
    assert ratio <= 1.1


# ---- full-precision windows and separate value widths (DESIGN §8) ----------------------------------

from test_attention_windows import CASES as WINDOW_CASES  # noqa: E402  (the CPU op's case grid)
from test_attention_windows import write_tokens  # noqa: E402


def run_both(q, cache, kv_len, bits, v_bits, window=0, softcap=0.0, kv_start=None, signs=None, stats=None):
    """The CPU op and the simulated MPS op on the same inputs; returns (ref, out, ref_lse, lse)."""
    B, Hq, Lq, D = q.shape
    k_codes, k_norms, v_codes, v_norms, k_sink, v_sink, k_recent, v_recent = cache
    args = dict(kv_len=kv_len, scale=D**-0.5, bits=bits, sliding_window=window, softcap=softcap, kv_start=kv_start,
                signs=signs, v_bits=v_bits, k_sink=k_sink, v_sink=v_sink, k_recent=k_recent, v_recent=v_recent)
    ref_lse, lse = (torch.full((B, Hq, Lq), float("nan")) for _ in range(2))
    ref = torch.ops.tq.flash_attn_vec_tq(q, k_codes, k_norms, v_codes, v_norms, **args, lse=ref_lse)
    out = _plans.run("flash_attn_vec_tq", q=q, k_codes=k_codes, k_norms=k_norms, v_codes=v_codes, v_norms=v_norms,
                     **args, lse=lse, stats=stats)
    return ref, out, ref_lse, lse


def poison_window_held_slots(cache, kv_len, sinks, recent):
    """NaN norms and 0xFF codes at the cache slots of positions the windows hold: they must never be read
    (the CPU op overwrites them with the window entries, so its result is unchanged)."""
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
def test_flash_attn_vec_tq_windows_and_v_bits(case):
    """tests/test_attention_windows.py's grid (sinks, ring, k8v4/k4v2/k3v2, Lq > 1, GQA, wrapped sliding ring,
    kv_start, softcap, lse, window dtypes, D 64..512): the simulated kernels against the CPU op."""
    (name, B, Hq, Hkv, Lq, D, C, kv_len, bits, v_bits, window, softcap, kv_start, sinks, recent, dtype, window_dtype,
     chunks) = case
    signs = torch_tq.hadamard_signs(D)
    offset = torch.randn(B, Hkv, D)
    cache, _, _ = write_tokens(B, Hkv, D, C, bits, v_bits, kv_len, kv_len > C or window > 0 and C < 64, signs, sinks,
                               recent, window_dtype, chunks, offset)
    poison_window_held_slots(cache, kv_len, sinks, recent)
    q = torch.randn(B, Hq, Lq, D).to(dtype)
    start = None if kv_start is None else torch.tensor(kv_start, dtype=torch.int64)
    ref, out, ref_lse, lse = run_both(q, cache, kv_len, bits, v_bits, window, softcap, start, signs)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(ref.float()).all()
    assert_close(name, ref.float(), out.float(), OUT_RATIO[dtype])
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def _random_cache(B, Hkv, D, C, bits, v_bits):
    k_codes = torch.randint(0, 256, (B, Hkv, C, D * bits // 8), dtype=torch.uint8)
    v_codes = torch.randint(0, 256, (B, Hkv, C, D * v_bits // 8), dtype=torch.uint8)
    nb = D // min(D, 256)
    return k_codes, torch.rand(B, Hkv, C, nb) * 10 + 1, v_codes, torch.rand(B, Hkv, C, nb) * 10 + 1


# Every (bits, v_bits) pair once, D, q dtype, window dtypes (one per buffer) and windows on/off varying along.
V_BITS_SWEEP = [
    (f"k{kb}v{vb}-D{D}", kb, vb, D, q_dtype, wd, i % 3 != 2)
    for i, (kb, vb) in enumerate((kb, vb) for kb in (2, 3, 4, 5, 6, 8) for vb in (2, 3, 4, 5, 6, 8))
    for D in [(64, 128, 256, 512)[i % 4]]
    for q_dtype in [(torch.float32, torch.float16, torch.bfloat16)[i % 3]]
    for wd in [[(torch.float32, torch.float16, torch.bfloat16)[(i + j) % 3] for j in range(4)]]
]


@pytest.mark.parametrize("case", V_BITS_SWEEP, ids=lambda c: c[0])
def test_flash_attn_vec_tq_every_bits_pair(case):
    """Every key width with every value width (the values' width is a runtime parameter of the kernel), with
    window buffers of four different dtypes at once (each buffer's dtype is its own runtime parameter)."""
    name, bits, v_bits, D, dtype, window_dtypes, windows = case
    B, Hq, Hkv, Lq, C, kv_len, S, W = 1, 4, 2, 2, 16, 14, 3, 4
    cache = list(_random_cache(B, Hkv, D, C, bits, v_bits))
    if windows:
        cache += [torch.randn(B, Hkv, n, D).to(dt) for n, dt in zip((S, S, W, W), window_dtypes)]
    else:
        cache += [None] * 4
    q = torch.randn(B, Hq, Lq, D).to(dtype)
    ref, out, ref_lse, lse = run_both(q, cache, kv_len, bits, v_bits, signs=torch_tq.hadamard_signs(D))
    assert_close(name, ref.float(), out.float(), OUT_RATIO[dtype])
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_windows_replace_the_codes_and_are_read_once():
    """Device bytes of one decode call with windows: each code position's packed bytes and norms once, each
    window entry once, nothing of the positions the windows hold (their codes are poisoned)."""
    B, Hq, Hkv, D, C, kv_len, bits, v_bits, S, W = 1, 8, 2, 128, 256, 200, 4, 2, 4, 16
    cache = list(_random_cache(B, Hkv, D, C, bits, v_bits))
    cache += [torch.randn(B, Hkv, n, D).to(dt) for n, dt in
              zip((S, S, W, W), (torch.float16, torch.bfloat16, torch.float32, torch.float16))]
    held = poison_window_held_slots(cache, kv_len, S, W)
    assert held == S + W
    q = torch.randn(B, Hq, 1, D, dtype=torch.float16)
    stats = []
    ref, out, _, _ = run_both(q, cache, kv_len, bits, v_bits, signs=torch_tq.hadamard_signs(D), stats=stats)
    assert_close("windows-bytes", ref.float(), out.float(), OUT_RATIO[torch.float16])
    main = stats[0]
    assert main["kernel"] == f"flash_attn_vec_tq_float16_d{D}_b{bits}"
    read = {index: main["report"].bytes_read.get(n, 0) for n, (kind, index) in enumerate(main["bindings"])
            if kind == _plans.ARG_INPUT}
    coded = kv_len - S - W
    names = _plans.OP_TENSORS["flash_attn_vec_tq"]
    expect = dict(k_codes=B * Hkv * coded * D * bits // 8, v_codes=B * Hkv * coded * D * v_bits // 8,
                  k_norms=B * Hkv * coded * 4, v_norms=B * Hkv * coded * 4)
    expect.update({n: t.numel() * t.element_size() for n, t in zip(("k_sink", "v_sink", "k_recent", "v_recent"),
                                                                    cache[4:])})
    got = {names[i]: b for i, b in read.items() if names[i] in expect}
    assert got == expect


def test_windows_longer_than_the_visible_range():
    """kv_len < W (the ring still filling) and kv_len < S: every position comes from a window, none from the codes."""
    B, Hq, Hkv, D, C, bits = 1, 2, 1, 64, 16, 3
    cache = list(_random_cache(B, Hkv, D, C, bits, bits))
    cache[1].fill_(float("nan"))
    cache[3].fill_(float("nan"))
    cache += [torch.randn(B, Hkv, 4, D), torch.randn(B, Hkv, 4, D), torch.randn(B, Hkv, 8, D), torch.randn(B, Hkv, 8, D)]
    for kv_len, Lq in ((3, 1), (6, 2)):
        q = torch.randn(B, Hq, Lq, D)
        ref, out, ref_lse, lse = run_both(q, cache, kv_len, bits, None)
        assert torch.isfinite(ref).all()
        assert_close(f"kv_len={kv_len}", ref, out, OUT_RATIO[torch.float32])
        torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
