"""The native C++ CPU kernels against the pure-PyTorch reference (torch_tq.reference) and the float64 oracle.

Case grids as for the other backends (tests/mps_sim): every (D, bits) pair, source/query/window dtypes, rings,
offsets, norm correction, windows, GQA, Lq > 1, kv_start, softcap, lse, v_bits. Outputs are poisoned before
each call. Codes compare exactly except at near-ties: the kernel sums the block norm in another order than
torch.linalg.vector_norm, so u may differ by an ulp; a differing code must then be adjacent to the reference's
and the reference's u within 1e-5 of the boundary between them. The rotation and the decode run the reference's
float32 operations in the same order, so decoded vectors and window entries are bit-identical.

Also: the shared bad-input table (same messages through the native path), the build/cache/fallback machinery
(no compiler -> one line and the reference; a cached build loads without a compiler; the cache key), and the
``torch-tq info`` line.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch_tq
from _oracle import attention64, decode_rotated64, unpack_bits, union_kv64, unrotate64
from _utils import assert_close
from torch_tq import reference
from torch_tq.backends import cpu_native
from torch_tq.backends.cpu.turboquant import rotate
from torch_tq.codebooks import decision_boundaries
from torch_tq.layout import resolve_signs, rotation_block, unpack_codes

REPO = Path(__file__).resolve().parent.parent
POISON = 0xA5
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DIMS = (64, 128, 256, 512)
BITS = (2, 3, 4, 5, 6, 8)
OUT_RATIO = {torch.float32: 2e-5, torch.float16: 1.5e-3, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module", autouse=True)
def native_kernels():
    """These tests need the native kernels: skipped only where they were switched off on purpose."""
    if os.environ.get(cpu_native.ENV_IMPLEMENTATION, "").lower() == "reference":
        pytest.skip("TQ_CPU_KERNELS=reference: the native CPU kernels are switched off")
    native, description = cpu_native.status()
    assert native, f"the native CPU kernels did not build or load: {description}"


def _short(dtype):
    return str(dtype)[6:]


SIGN_KINDS = ("explicit", "none", "ones")


def signs_of(kind: str, D: int):
    """The signs argument: the canonical vector passed explicitly, None (= canonical), or the plain WHT's ones."""
    return {"explicit": torch_tq.hadamard_signs(D), "none": None, "ones": torch.ones(D)}[kind]


# ---- hadamard_quantize_kv ------------------------------------------------------------------------------

def reference_u(y: torch.Tensor) -> torch.Tensor:
    """The reference's normalised coordinates u of rotated vectors ``y [..., D]`` (float32)."""
    D = y.shape[-1]
    R = rotation_block(D)
    blocks = y.reshape(*y.shape[:-1], D // R, R)
    norms = torch.linalg.vector_norm(blocks, dim=-1)
    inv = torch.where(norms > 0, math.sqrt(R) / norms, torch.zeros_like(norms))
    return (blocks * inv.unsqueeze(-1)).reshape(y.shape)


def assert_codes_match(name, out_codes, ref_codes, u, bits):
    """Exact, or adjacent at a near tie (|u - boundary| <= 1e-5), and rare."""
    out, ref = unpack_codes(out_codes, bits), unpack_codes(ref_codes, bits)
    diff = out != ref
    if not diff.any():
        return
    assert ((out - ref).abs()[diff] == 1).all(), f"{name}: non-adjacent code mismatch"
    gap = (u[diff] - decision_boundaries(bits)[torch.minimum(out, ref)[diff]]).abs()
    assert (gap <= 1e-5).all(), f"{name}: codes differ {int(diff.sum())}x away from a tie (gap {gap.max():.3e})"
    assert diff.float().mean() < 1e-3, f"{name}: too many near-tie flips"


# Every (D, bits) pair once; the source dtype, the ring geometry, signs, offset, norm correction and the
# window buffers' dtypes vary along.
QUANTIZE_CASES = []
for n, (D, bits) in enumerate(itertools.product(DIMS, BITS)):
    dtype, window_dtype = DTYPES[n % 3], DTYPES[(n + 1) % 3]
    sliding = n % 2 == 1
    # id, B, T, Hkv, D, C, write_pos, is_sliding, bits, src dtype, signs, offset, norm_correction, S, W, window dtype
    if sliding:
        case = (f"D{D}-b{bits}-{_short(dtype)}-ring", 2, 7, 2, D, 5, 3, True, bits, dtype, SIGN_KINDS[n % 3],
                n % 3 == 0, n % 4 < 2, 4, 3, window_dtype)
    else:
        case = (f"D{D}-b{bits}-{_short(dtype)}-global", 1, 3, 3, D, 6, 2, False, bits, dtype, SIGN_KINDS[n % 3],
                n % 3 != 0, n % 4 >= 2, 3 + n % 2, 2, window_dtype)
    QUANTIZE_CASES.append(case)


@pytest.mark.parametrize("case", QUANTIZE_CASES, ids=lambda c: c[0])
def test_hadamard_quantize_kv_native_matches_reference(case, one_thread):
    (name, B, T, Hkv, D, C, write_pos, is_sliding, bits, dtype, sign_kind, use_offset, norm_correction, S, W,
     window_dtype) = case
    signs = signs_of(sign_kind, D)
    offset = torch.randn(B, Hkv, D) if use_offset else None
    src = (torch.randn(B, T, Hkv, D) * 2).to(dtype)
    src[0, -1, 0] = 0  # a zero vector stores norm 0 and u = 0
    codes, norms = torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits)
    codes.fill_(POISON)
    norms.fill_(float("nan"))
    sink = torch.full((B, Hkv, S, D), float("nan"), dtype=window_dtype)
    recent = torch.full((B, Hkv, W, D), float("nan"), dtype=window_dtype)
    ref = [t.clone() for t in (codes, norms, sink, recent)]
    torch.ops.tq.hadamard_quantize_kv(src, codes, norms, write_pos, is_sliding, bits, signs, offset, norm_correction,
                                      sink, recent)
    reference.hadamard_quantize_kv(src, ref[0], ref[1], write_pos, is_sliding, bits, signs, offset, norm_correction,
                                   ref[2], ref[3])

    first = max(0, T - C) if is_sliding else 0
    slots = torch.arange(write_pos + first, write_pos + T) % C
    untouched = torch.ones(C, dtype=torch.bool)
    untouched[slots] = False
    assert (codes[:, :, untouched] == POISON).all() and norms[:, :, untouched].isnan().all(), "wrote outside the new slots"
    torch.testing.assert_close(norms, ref[1], rtol=1e-6, atol=0, equal_nan=True)
    x = src.float() - (0 if offset is None else offset[:, None])
    y = rotate(x[:, first:].transpose(1, 2), resolve_signs(signs, D, "cpu"))
    assert_codes_match(name, codes[:, :, slots], ref[0][:, :, slots], reference_u(y), bits)
    # The windows hold the rotated vectors, cast once: bit-identical (NaN where not written).
    assert torch.equal(sink.nan_to_num(7.0), ref[2].nan_to_num(7.0))
    assert torch.equal(recent.nan_to_num(7.0), ref[3].nan_to_num(7.0))
    if offset is None:
        zero_slot = (write_pos + T - 1) % C
        assert (norms[0, 0, zero_slot] == 0).all()
        assert (unpack_codes(codes[0, 0, zero_slot], bits) == (1 << bits) // 2 - 1).all()


def test_hadamard_quantize_kv_native_strided_src_and_long_ring_write():
    src = torch.randn(2, 2, 40, 128).transpose(1, 2)  # [B, T=40, Hkv=2, D], non-contiguous
    codes, norms = torch_tq.allocate_quantized_kv(2, 2, 16, 128, 4)
    ring = torch.full((2, 2, 8, 128), float("nan"))
    ref = [codes.clone(), norms.clone(), ring.clone()]
    torch.ops.tq.hadamard_quantize_kv(src, codes, norms, 5, True, 4, None, recent=ring)
    reference.hadamard_quantize_kv(src, ref[0], ref[1], 5, True, 4, None, recent=ref[2])
    torch.testing.assert_close(norms, ref[1], rtol=1e-6, atol=0)
    slots = torch.arange(5 + 24, 5 + 40) % 16  # a ring write of T=40 > C=16 keeps tokens 24..39
    u = reference_u(rotate(src[:, 24:].transpose(1, 2), torch_tq.hadamard_signs(128)))
    assert_codes_match("strided", codes[:, :, slots], ref[0][:, :, slots], u, 4)
    assert torch.equal(ring, ref[2])


# ---- dequantize_kv --------------------------------------------------------------------------------------

DEQUANTIZE_CASES = [
    (f"D{D}-b{bits}-{'rotated' if n % 2 else 'original'}-{SIGN_KINDS[n % 3]}", D, bits, n % 2 == 1, SIGN_KINDS[n % 3])
    for n, (D, bits) in enumerate(itertools.product(DIMS, BITS))
]


@pytest.mark.parametrize("case", DEQUANTIZE_CASES, ids=lambda c: c[0])
def test_dequantize_kv_native_is_bit_identical_to_reference(case, one_thread):
    name, D, bits, rotated, sign_kind = case
    B, Hkv, C, start, length = 2, 2, 6, 4, 5  # positions 4..8 -> slots 4, 5, 0, 1, 2
    signs = signs_of(sign_kind, D)
    codes_int = torch.randint(0, 2**bits, (B, Hkv, C, D))
    codes = torch_tq.layout.pack_codes(codes_int, bits)
    norms = torch.rand(B, Hkv, C, D // rotation_block(D)) * 20
    out = torch.ops.tq.dequantize_kv(codes, norms, start, length, bits, rotated, signs)
    assert torch.equal(out, reference.dequantize_kv(codes, norms, start, length, bits, rotated, signs))
    slots = [p % C for p in range(start, start + length)]
    oracle = decode_rotated64(codes_int[:, :, slots], norms[:, :, slots], bits)
    assert_close(name, oracle if rotated else unrotate64(oracle, signs), out, 1e-6)


def test_dequantize_kv_native_empty():
    codes, norms = torch_tq.allocate_quantized_kv(1, 2, 4, 128, 4)
    assert torch.ops.tq.dequantize_kv(codes, norms, 0, 0, 4).shape == (1, 2, 0, 128)


# ---- kv_cache_copy -------------------------------------------------------------------------------------

@pytest.mark.parametrize("src_dtype", DTYPES, ids=_short)
@pytest.mark.parametrize("cache_dtype", DTYPES, ids=_short)
@pytest.mark.parametrize("sliding", [False, True], ids=["global", "ring"])
def test_kv_cache_copy_native_matches_reference(src_dtype, cache_dtype, sliding):
    B, T, Hkv, D, C, pos = 2, (11 if sliding else 5), 3, 64, 8, (6 if sliding else 2)
    src = torch.randn(B, Hkv, T, D).to(src_dtype).transpose(1, 2)  # strided
    cache = torch.full((B, Hkv, C, D), float("nan"), dtype=cache_dtype)
    ref = cache.clone()
    torch.ops.tq.kv_cache_copy(src, cache, pos, sliding)
    reference.kv_cache_copy(src, ref, pos, sliding)
    assert torch.equal(cache.nan_to_num(7.0), ref.nan_to_num(7.0))


# ---- flash_attn_vec_tq --------------------------------------------------------------------------------

def build_cache(B, Hkv, D, C, bits, v_bits, kv_len, sliding, signs, chunk=7):
    k = torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits)
    v = torch_tq.allocate_quantized_kv(B, Hkv, C, D, v_bits)
    pos = 0
    while pos < kv_len:
        T = min(chunk, kv_len - pos)
        reference.hadamard_quantize_kv(torch.randn(B, T, Hkv, D) * 2, *k, pos, sliding, bits, signs)
        reference.hadamard_quantize_kv(torch.randn(B, T, Hkv, D), *v, pos, sliding, v_bits, signs)
        pos += T
    return (*k, *v)


def run_both(q, cache, kv_len, bits, v_bits=None, window=0, softcap=0.0, kv_start=None, signs=None, windows=()):
    """torch.ops.tq (native) and the reference on the same inputs, lse poisoned; returns (out, ref, lse, ref_lse)."""
    B, Hq, Lq, D = q.shape
    args = dict(kv_len=kv_len, scale=D**-0.5, bits=bits, sliding_window=window, softcap=softcap, kv_start=kv_start,
                signs=signs, v_bits=v_bits)
    if windows:
        args.update(zip(("k_sink", "v_sink", "k_recent", "v_recent"), windows))
    lse, ref_lse = (torch.full((B, Hq, Lq), float("nan")) for _ in range(2))
    out = torch.ops.tq.flash_attn_vec_tq(q, *cache, **args, lse=lse)
    ref = reference.flash_attn_vec_tq(q, *cache, **args, lse=ref_lse)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    return out, ref, lse, ref_lse


CASES = [
    # id, B, Hq, Hkv, Lq, D, C, kv_len, bits, sliding_window, softcap, kv_start, dtype, signs
    ("decode-D128-b4-gqa4", 1, 8, 2, 1, 128, 64, 50, 4, 0, 0.0, None, torch.float32, True),
    ("D64-b3-gqa3-lq3-kvstart", 2, 9, 3, 3, 64, 40, 33, 3, 0, 0.0, [0, 5], torch.float16, True),
    ("D256-b2-sliding-wrap", 1, 4, 2, 1, 256, 16, 37, 2, 16, 0.0, None, torch.bfloat16, True),
    ("D512-b5-softcap-lq2", 1, 2, 1, 2, 512, 24, 20, 5, 0, 30.0, None, torch.float32, False),
    ("D128-b6-window-lq4-wrap-kvstart", 2, 4, 4, 4, 128, 20, 45, 6, 12, 0.0, [3, 42], torch.float16, True),
    ("D64-b8-row-without-keys", 2, 2, 1, 1, 64, 8, 6, 8, 0, 0.0, [0, 7], torch.float32, True),
    ("D128-b4-long-splits", 1, 4, 1, 1, 128, 3000, 2999, 4, 0, 0.0, None, torch.float16, True),
    ("D64-b4-long-splits-gqa3-lq2", 2, 9, 3, 2, 64, 1100, 1100, 4, 0, 0.0, [0, 700], torch.float32, True),
    ("D64-b4-long-window-wrap", 1, 9, 3, 1, 64, 700, 2000, 4, 600, 0.0, None, torch.bfloat16, True),
    ("D64-b4-gqa8-rows", 1, 16, 2, 2, 64, 32, 30, 4, 0, 0.0, None, torch.float32, True),
    ("D512-b3-window-wrap-bf16", 1, 4, 2, 3, 512, 10, 23, 3, 8, 20.0, None, torch.bfloat16, True),
    ("prefill-lq-eq-kvlen", 1, 2, 1, 9, 64, 9, 9, 4, 0, 0.0, None, torch.float32, True),
    ("B3-kvstart-window", 3, 6, 2, 2, 128, 16, 16, 5, 5, 0.0, [0, 2, 13], torch.float32, True),
]

# Every (D, bits) pair once, q dtype and signs varying along.
SWEEP = [
    (f"sweep-D{D}-b{b}", 1, 4, 2, 2, D, 12, 10, b, 0, 0.0, None, DTYPES[i % 3], i % 2 == 0)
    for i, (D, b) in enumerate(itertools.product(DIMS, BITS))
]


@pytest.mark.parametrize("case", CASES + SWEEP, ids=lambda c: c[0])
def test_flash_attn_vec_tq_native_matches_reference(case, one_thread):
    name, B, Hq, Hkv, Lq, D, C, kv_len, bits, window, softcap, kv_start, dtype, use_signs = case
    signs = signs_of("explicit" if use_signs else SIGN_KINDS[1 + len(name) % 2], D)  # unsigned cases: None or ones
    cache = build_cache(B, Hkv, D, C, bits, bits, kv_len, kv_len > C, signs, chunk=7 if kv_len < 100 else 512)
    q = torch.randn(B, Hq, Lq, D).to(dtype)
    start = torch.tensor(kv_start, dtype=torch.int64) if kv_start is not None else None
    out, ref, lse, ref_lse = run_both(q, cache, kv_len, bits, window=window, softcap=softcap, kv_start=start, signs=signs)
    assert_close(name, ref.float(), out.float(), OUT_RATIO[dtype])
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    if kv_start is not None and max(kv_start) >= kv_len:
        assert torch.equal(out[-1].float().abs().sum(), torch.tensor(0.0)), "a row without keys must be zeros"
        assert (lse[-1] == -math.inf).all()


def test_flash_attn_vec_tq_native_threads_agree():
    """The split over (batch, KV head, position blocks) depends on the thread count; the result does not (beyond
    float32 summation order)."""
    D, bits, kv_len = 64, 4, 4000
    cache = build_cache(1, 3, D, kv_len, bits, bits, kv_len, False, torch_tq.hadamard_signs(D), chunk=1000)
    q = torch.randn(1, 9, 1, D)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(torch.ops.tq.flash_attn_vec_tq(q, *cache, kv_len, D**-0.5, bits, signs=torch_tq.hadamard_signs(D)))
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-6)


def test_flash_attn_vec_tq_native_strided_q():
    D, bits = 64, 4
    cache = build_cache(1, 2, D, 16, bits, bits, 9, False, None)
    q = torch.randn(1, 3, 4, D).transpose(1, 2)  # [B, Hq=4, Lq=3, D], non-contiguous
    out, ref, _, _ = run_both(q, cache, 9, bits)
    assert_close("strided-q", ref, out, OUT_RATIO[torch.float32])


# tests/test_attention_windows.py's grid (sinks, ring, k8v4/k4v2/k3v2, Lq > 1, GQA, wrapped sliding ring, kv_start,
# softcap, lse, window dtypes, D 64..512), against the reference and the float64 oracle.
from test_attention_windows import CASES as WINDOW_CASES  # noqa: E402
from test_attention_windows import write_tokens  # noqa: E402


def poison_window_held_slots(cache, kv_len, sinks, recent):
    """0xFF codes and NaN norms at the slots of positions the windows hold: they must never be read."""
    k_codes, k_norms, v_codes, v_norms = cache[:4]
    C = k_codes.shape[2]
    held = [j for j in range(max(0, kv_len - C), kv_len)
            if (sinks is not None and j < sinks) or (recent is not None and j >= kv_len - recent)]
    slots = torch.tensor([j % C for j in held], dtype=torch.long)
    for codes, norms in ((k_codes, k_norms), (v_codes, v_norms)):
        codes[:, :, slots] = 0xFF
        norms[:, :, slots] = float("nan")


@pytest.mark.parametrize("case", WINDOW_CASES, ids=[c[0] for c in WINDOW_CASES])
def test_flash_attn_vec_tq_native_windows_and_v_bits(case, one_thread):
    (name, B, Hq, Hkv, Lq, D, C, kv_len, bits, v_bits, window, softcap, kv_start, sinks, recent, dtype, window_dtype,
     chunks) = case
    signs = torch_tq.hadamard_signs(D)
    cache, _, _ = write_tokens(B, Hkv, D, C, bits, v_bits, kv_len, kv_len > C or window > 0 and C < 64, signs, sinks,
                               recent, window_dtype, chunks, torch.randn(B, Hkv, D))
    k_oracle, v_oracle = union_kv64(*cache[:4], kv_len, bits, v_bits, signs, *cache[4:])
    poison_window_held_slots(cache, kv_len, sinks, recent)
    q = torch.randn(B, Hq, Lq, D).to(dtype)
    start = None if kv_start is None else torch.tensor(kv_start, dtype=torch.int64)
    out, ref, lse, ref_lse = run_both(q, cache[:4], kv_len, bits, v_bits, window, softcap, start, signs, cache[4:])
    assert_close(name, ref.float(), out.float(), OUT_RATIO[dtype])
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    oracle, oracle_lse = attention64(q.double(), k_oracle, v_oracle, kv_len, C, D**-0.5, window, softcap, start,
                                     return_lse=True)
    assert_close(f"{name} vs float64 oracle", oracle, out, OUT_RATIO[dtype])
    torch.testing.assert_close(lse.double(), oracle_lse, rtol=1e-5, atol=1e-5)


# Every (bits, v_bits) pair once; D, q dtype, the four window buffers' dtypes (one each) and windows on/off vary.
V_BITS_SWEEP = [
    (f"k{kb}v{vb}-D{DIMS[i % 4]}", kb, vb, DIMS[i % 4], DTYPES[i % 3], [DTYPES[(i + j) % 3] for j in range(4)],
     i % 3 != 2)
    for i, (kb, vb) in enumerate(itertools.product(BITS, BITS))
]


@pytest.mark.parametrize("case", V_BITS_SWEEP, ids=lambda c: c[0])
def test_flash_attn_vec_tq_native_every_bits_pair(case, one_thread):
    name, bits, v_bits, D, dtype, window_dtypes, with_windows = case
    B, Hq, Hkv, Lq, C, kv_len, S, W = 1, 4, 2, 2, 16, 14, 3, 4
    cache = (torch.randint(0, 256, (B, Hkv, C, D * bits // 8), dtype=torch.uint8),
             torch.rand(B, Hkv, C, D // rotation_block(D)) * 10 + 1,
             torch.randint(0, 256, (B, Hkv, C, D * v_bits // 8), dtype=torch.uint8),
             torch.rand(B, Hkv, C, D // rotation_block(D)) * 10 + 1)
    windows = [torch.randn(B, Hkv, n, D).to(dt) for n, dt in zip((S, S, W, W), window_dtypes)] if with_windows else ()
    q = torch.randn(B, Hq, Lq, D).to(dtype)
    out, ref, lse, ref_lse = run_both(q, cache, kv_len, bits, v_bits, signs=torch_tq.hadamard_signs(D), windows=windows)
    assert_close(name, ref.float(), out.float(), OUT_RATIO[dtype])
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


# ---- the shared bad-input table through the native path ------------------------------------------------

from _bad_inputs import BAD_INPUTS  # noqa: E402


@pytest.mark.parametrize("case_id, op, build, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_native_same_message(case_id, op, build, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        getattr(cpu_native, op)(**build())


# ---- building, caching, fallback, info ---------------------------------------------------------------

def _python(code: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("TQ_CPU_KERNELS", "TQ_CPU_CACHE", "CXX")}
    environment.update(env, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=environment,
                          cwd=str(REPO))


_SMOKE = """
import torch, torch_tq
from torch_tq.backends import cpu_native
codes, norms = torch_tq.allocate_quantized_kv(1, 2, 8, 64, 4)
torch_tq.hadamard_quantize_kv(torch.randn(1, 5, 2, 64), codes, norms, 0, bits=4)
out = torch_tq.flash_attn_vec_tq(torch.randn(1, 4, 1, 64), codes, norms, codes, norms, 5, 0.125, 4)
assert torch.isfinite(out).all()
print(cpu_native.implementation())
print(torch_tq.backend_status()["cpu"][1])
"""


def test_without_a_compiler_one_line_says_the_reference_is_used(tmp_path):
    out = _python(_SMOKE, CXX=str(tmp_path / "no-such-compiler"), TQ_CPU_CACHE=str(tmp_path / "cache"))
    assert out.returncode == 0, out.stderr
    implementation, description = out.stdout.strip().splitlines()
    assert implementation == "reference"
    assert description.startswith("pure-PyTorch reference (native kernels unavailable: no C++ compiler")
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("torch_tq: native CPU kernels unavailable (no C++ compiler")
    assert "using the pure-PyTorch reference" in lines[0]


def test_native_mode_without_a_compiler_raises(tmp_path):
    out = _python(_SMOKE, CXX=str(tmp_path / "no-such-compiler"), TQ_CPU_CACHE=str(tmp_path / "cache"),
                  TQ_CPU_KERNELS="native")
    assert out.returncode != 0
    assert "TQ_CPU_KERNELS=native but the native CPU kernels could not be built or loaded: no C++ compiler" in out.stderr


def test_reference_mode_is_silent_and_reported():
    out = _python(_SMOKE, TQ_CPU_KERNELS="reference")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == ["reference", "pure-PyTorch reference (TQ_CPU_KERNELS=reference)"]
    assert out.stderr.strip() == ""


def test_cached_build_loads_without_a_compiler(tmp_path):
    """The build this session made (same source, torch, Python and CPU) is found by key and loaded, no compiler."""
    out = _python(_SMOKE, CXX=str(tmp_path / "no-such-compiler"), TQ_CPU_CACHE=str(cpu_native.cache_dir().parent))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "native"
    assert "cached build in" in out.stdout and out.stderr.strip() == ""


def test_cache_key_covers_torch_abi_python_and_cpu(monkeypatch):
    base = cpu_native.build_key()
    assert cpu_native.cache_dir().name.endswith(base[:16])
    for target, name, value in ((torch, "__version__", "0.0.0"), (torch._C, "_GLIBCXX_USE_CXX11_ABI", "other"),
                                (cpu_native, "_cpu_fingerprint", lambda: "another cpu")):
        with monkeypatch.context() as m:
            m.setattr(target, name, value)
            assert cpu_native.build_key() != base, name
    with monkeypatch.context() as m:
        m.setattr(sys.implementation, "cache_tag", "cpython-399")
        assert cpu_native.build_key() != base


def test_info_reports_the_cpu_implementation(capsys):
    from torch_tq import cli

    assert cli.main(["info"]) == 0
    assert re.search(r"^  cpu   yes  native C\+\+ kernels \(.*\d+ threads; ", capsys.readouterr().out, flags=re.M)


def test_reference_functions_stay_callable():
    """torch_tq.reference.* is the reference whatever the CPU implementation (it never reaches tq_cpu)."""
    assert reference.flash_attn_vec_tq.__module__ == "torch_tq.backends.cpu.turboquant"
    assert reference.kv_cache_copy.__module__ == "torch_tq.backends.cpu.kv_cache"
