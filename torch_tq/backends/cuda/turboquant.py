"""Triton kernels of the TurboQuant ops for the CUDA dispatch key, and their launchers.

Every launcher first runs the same ``_validation.check_<op>`` as the CPU reference
(``torch_tq.backends.cpu.turboquant``, the executable specification), resolves the signs in one
place, then launches:

* ``hadamard_quantize_kv``: one launch for all B×T×Hkv rows (signs, offset, rotation, per-block norms,
  norm correction, nearest centroid with ties to the lower index, bit packing, the ring/global slot,
  and the full-precision sink/recent window writes): the dot kernel (persistent programs over tiles of
  64 rotation blocks, the rotation on the tensor cores) or, for a decode step, v1 (rotation in registers).
* ``dequantize_kv``: one launch.
* ``flash_attn_vec_tq``: the split-K main kernel over the grid (B·Hkv, num_splits, row tiles), where
  each program streams a contiguous range of positions of ONE KV head and scores ALL of the G = Hq/Hkv
  query heads × Lq queries of that group (at decode one row tile holds them all, so each KV byte is
  read once per GQA group), keeping (m, l, acc) partials; the last program of each (KV head, row tile)
  to finish merges the splits with log-sum-exp, un-rotates, writes the output and the optional lse
  (:func:`_merge_if_last`). The number of splits grows with the visible range and the SM count
  (:func:`choose_num_splits`). Launches per call: ONE with the folded q rotation (the default v2 with
  float16 or bfloat16 q at D <= 128); two otherwise (a q-rotation launch first: float32 q, D256, D512's
  v1, v3's default); AttnConfig(fused_merge=False) adds the separate merge launch back. The first call on
  a (device, stream) also zeroes its ticket counters once (:func:`_tickets`).

The Walsh-Hadamard transform of a block of R = 16·RA coordinates runs as two small dense passes in
registers, H_R = H_RA ⊗ H_16 (Sylvester order), with the ±1 entries made from index parities: exact
float32 products, only the summation order differs from the reference's butterflies.

Every offset into a cache tensor is computed in int64 (program ids are cast first), so caches above
2^31 bytes or elements are addressed correctly.
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import torch
import triton
import triton.language as tl

from ... import _validation
from ...codebooks import decision_boundaries, lloyd_max_codebook
from ...layout import resolve_signs, rotation_block

# ---------------------------------------------------------------------------------------------------------------------
# Shared device helpers


@triton.jit
def _parity_sign(i, j):
    """(-1)^popcount(i & j) as float32, for 0 <= i, j < 256: the entries of the Sylvester Hadamard matrix."""
    p = i & j
    p = p ^ (p >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    return 1.0 - 2.0 * (p & 1).to(tl.float32)


@triton.jit
def _cast(x, DTYPE: tl.constexpr):
    """float32 ``x`` rounded to ``DTYPE`` to nearest even, like torch's ``.to(dtype)``.

    bfloat16 is rounded by hand on the bits: the GPU's own conversion is round-to-nearest-even too,
    but the Triton interpreter (the CI tests) truncates, so the hand rounding keeps both identical.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # NaN stays NaN (the rounding carry could turn a NaN payload into infinity).
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _wht_rows(x, ROWS: tl.constexpr, R: tl.constexpr):
    """Unnormalised Walsh-Hadamard transform of each row of ``x [ROWS, R]`` (float32), R a multiple of 16.

    Coordinate ``a*16 + b`` of a row is entry (a, b) of an [R/16, 16] matrix X; H_R = H_{R/16} ⊗ H_16,
    so the transform is H_{R/16} X H_16 (both symmetric).
    """
    RB: tl.constexpr = 16
    RA: tl.constexpr = R // 16
    x3 = tl.reshape(x, (ROWS, RA, RB))
    ib = tl.arange(0, RB)
    hb = _parity_sign(ib[:, None], ib[None, :])  # [RB, RB]
    y = tl.sum(x3[:, :, None, :] * hb[None, None, :, :], axis=3)  # [ROWS, RA, RB]
    ia = tl.arange(0, RA)
    ha = _parity_sign(ia[:, None], ia[None, :])  # [RA, RA]
    y = tl.sum(y[:, None, :, :] * ha[None, :, :, None], axis=2)  # [ROWS, RA, RB]
    return tl.reshape(y, (ROWS, R))


@triton.jit
def _unpack_codes(row_ptr, row_ok, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """Codes ``[ROWS, D]`` int32 of the packed rows starting at the uint8 pointers ``row_ptr [ROWS]``.

    Little-endian bitstream: code i occupies bits i*b … i*b+b-1 of the row (layout.py). Widths that
    divide 8 load the row as one contiguous byte tile and split it in registers; 3, 5 and 6 bits
    assemble each group of 8 codes (``b`` bytes) as one 64-bit word.
    """
    if BITS == 8:
        d = tl.arange(0, D)
        codes = tl.load(row_ptr[:, None] + d[None, :], mask=row_ok[:, None], other=0).to(tl.int32)
    elif BITS == 4:
        k = tl.arange(0, D // 2)
        byte = tl.load(row_ptr[:, None] + k[None, :], mask=row_ok[:, None], other=0).to(tl.int32)
        # [ROWS, D/2, 2]: the even coordinate is the low nibble.
        codes = tl.reshape(tl.join(byte & 15, byte >> 4), (ROWS, D))
    elif BITS == 2:
        k = tl.arange(0, D // 4)
        byte = tl.load(row_ptr[:, None] + k[None, :], mask=row_ok[:, None], other=0).to(tl.int32)
        # join(join(c0, c2), join(c1, c3)) flattens to c0, c1, c2, c3.
        codes = tl.join(tl.join(byte & 3, (byte >> 4) & 3), tl.join((byte >> 2) & 3, byte >> 6))
        codes = tl.reshape(codes, (ROWS, D))
    else:
        g = tl.arange(0, D // 8)
        j = tl.arange(0, 8)
        ptr = row_ptr[:, None, None] + (g * BITS)[None, :, None] + j[None, None, :]
        byte = tl.load(ptr, mask=row_ok[:, None, None] & (j < BITS)[None, None, :], other=0).to(tl.int64)
        word = tl.sum(byte << (j * 8).to(tl.int64)[None, None, :], axis=2)  # [ROWS, D/8]
        codes = (word[:, :, None] >> (j * BITS).to(tl.int64)[None, None, :]) & ((1 << BITS) - 1)
        codes = tl.reshape(codes.to(tl.int32), (ROWS, D))
    return codes


@triton.jit
def _decode_rows(codes_ptr, norms_ptr, codebook_ptr, row, row_ok, inv_sqrt_r, ROWS: tl.constexpr, D: tl.constexpr,
                 R: tl.constexpr, BITS: tl.constexpr):
    """Rotated-domain rows ``ŷ = c[code] * n / sqrt(R)`` ``[ROWS, D]`` float32 of cache rows ``row [ROWS]`` (int64)."""
    NB: tl.constexpr = D // R
    RBYTES: tl.constexpr = D * BITS // 8
    codes = _unpack_codes(codes_ptr + row * RBYTES, row_ok, ROWS, D, BITS)
    values = tl.load(codebook_ptr + codes)
    nb = tl.arange(0, NB)
    scale = tl.load(norms_ptr + row[:, None] * NB + nb[None, :], mask=row_ok[:, None], other=0.0) * inv_sqrt_r
    y = tl.reshape(values, (ROWS, NB, R)) * scale[:, :, None]
    return tl.reshape(y, (ROWS, D))


def _cdiv(a: int, b: int) -> int:
    # triton.cdiv / next_power_of_2 are constexpr functions: ~5 us of host time per call from Python, several per
    # launch (the decode op's host time is what a 4k-context call costs).
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _rows_per_program(head_dim: int) -> int:
    # The two transform passes hold ROWS*D*16 float32 products: keep that at 8192 (64 per thread at 4 warps).
    return max(1, 512 // head_dim)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and scratch buffer of the launchers comes from here (the tests fill it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


_CODEBOOKS: dict = {}


def _codebook(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [2^b], decision boundaries [2^b - 1]) float32 on ``device``, cached."""
    key = (bits, str(device))
    if key not in _CODEBOOKS:
        bounds = decision_boundaries(bits)
        half = 1 << (bits - 1)
        # _nearest_code searches |u| among the positive half: the boundaries must be exactly symmetric about 0.
        if bounds[half - 1] != 0 or not torch.equal(bounds[: half - 1], -bounds[half:].flip(0)):
            raise RuntimeError(f"the {bits}-bit decision boundaries are not symmetric about 0")
        _CODEBOOKS[key] = (lloyd_max_codebook(bits, device=device), bounds.to(device))
    return _CODEBOOKS[key]


# ---------------------------------------------------------------------------------------------------------------------
# hadamard_quantize_kv


@triton.jit
def hadamard_quantize_kv_fwd_kernel(
    src_ptr, codes_ptr, norms_ptr, signs_ptr, offset_ptr, bounds_ptr, codebook_ptr, sink_ptr, recent_ptr, seqlens_ptr,
    n_rows, t_lo, T, Hkv, C, S, W, write_pos, first_code, first_recent, sqrt_r, inv_sqrt_r,
    stride_sb, stride_st, stride_sh, stride_sd,
    D: tl.constexpr, R: tl.constexpr, BITS: tl.constexpr, ROWS: tl.constexpr, IS_SLIDING: tl.constexpr,
    USE_OFFSET: tl.constexpr, NORM_CORRECTION: tl.constexpr, HAS_SINK: tl.constexpr, HAS_RECENT: tl.constexpr,
    HAS_SEQLENS: tl.constexpr,
):
    NB: tl.constexpr = D // R
    RBYTES: tl.constexpr = D * BITS // 8
    i_p = tl.program_id(0).to(tl.int64)
    # Flat rows over (b, t - t_lo, h), h fastest: consecutive rows are consecutive in a contiguous src.
    rows = i_p * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    n_t = T - t_lo
    h = rows % Hkv
    t = (rows // Hkv) % n_t + t_lo
    b = rows // Hkv // n_t
    bh = b * Hkv + h
    d = tl.arange(0, D)
    p_src = src_ptr + b[:, None] * stride_sb + t[:, None] * stride_st + h[:, None] * stride_sh + d[None, :] * stride_sd
    x = tl.load(p_src, mask=row_ok[:, None], other=0.0).to(tl.float32)
    if USE_OFFSET:
        x = x - tl.load(offset_ptr + bh[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
    x = x * tl.load(signs_ptr + d)[None, :]
    y = _wht_rows(tl.reshape(x, (ROWS * NB, R)), ROWS * NB, R) * inv_sqrt_r  # [ROWS*NB, R], rotated domain

    norm = tl.sqrt(tl.sum(y * y, axis=1))  # [ROWS*NB]
    # A zero block stores norm 0 and u = 0 (decodes to 0 whatever its codes).
    inv = tl.where(norm > 0, sqrt_r / tl.where(norm > 0, norm, 1.0), 0.0)
    u = y * inv[:, None]
    code = _nearest_code(u, bounds_ptr, BITS)
    if NORM_CORRECTION:
        values = tl.load(codebook_ptr + code)
        unit = tl.sqrt(tl.sum(values * values, axis=1))
        norm = norm * sqrt_r / unit

    if HAS_SEQLENS:
        # Each sequence writes at its own position, read on the device (write_pos is 0).
        p = tl.load(seqlens_ptr + b, mask=row_ok, other=0).to(tl.int64) + t  # absolute positions [ROWS]
    else:
        p = write_pos + t  # absolute positions [ROWS]
    if IS_SLIDING:
        slot = p % C
    else:
        slot = p
    # A position past a global cache (possible only through unchecked device lengths) is not written.
    code_ok = row_ok & (t >= first_code) & (slot < C)
    cache_row = bh * C + slot  # [ROWS] int64
    nb = tl.arange(0, NB)
    tl.store(norms_ptr + cache_row[:, None] * NB + nb[None, :], tl.reshape(norm, (ROWS, NB)), mask=code_ok[:, None])
    # Bit packing: each group of 8 codes is one little-endian word of BITS bytes.
    j = tl.arange(0, 8)
    groups = tl.reshape(code, (ROWS, D // 8, 8)).to(tl.int64)
    word = tl.sum(groups << (j * BITS).to(tl.int64)[None, None, :], axis=2)  # fields do not overlap: sum = or
    byte = ((word[:, :, None] >> (j * 8).to(tl.int64)[None, None, :]) & 255).to(tl.uint8)  # [ROWS, D/8, 8]
    g = tl.arange(0, D // 8)
    p_codes = codes_ptr + cache_row[:, None, None] * RBYTES + (g * BITS)[None, :, None] + j[None, None, :]
    tl.store(p_codes, byte, mask=code_ok[:, None, None] & (j < BITS)[None, None, :])

    y_rows = tl.reshape(y, (ROWS, D))
    if HAS_SINK:
        sink_ok = row_ok & (p < S)
        p_sink = sink_ptr + (bh * S + p)[:, None] * D + d[None, :]
        tl.store(p_sink, _cast(y_rows, sink_ptr.dtype.element_ty), mask=sink_ok[:, None])
    if HAS_RECENT:
        recent_ok = row_ok & (t >= first_recent)
        p_recent = recent_ptr + (bh * W + p % W)[:, None] * D + d[None, :]
        tl.store(p_recent, _cast(y_rows, recent_ptr.dtype.element_ty), mask=recent_ok[:, None])


@triton.jit
def _hadamard_columns(signs_ptr, DC: tl.constexpr, G: tl.constexpr, P: tl.constexpr, DTYPE: tl.constexpr,
                      SIGNED: tl.constexpr):
    """Columns P, P+G, P+2G, … of the unnormalised Sylvester matrix H_DC: ``[DC, DC/G]`` ±1 in ``DTYPE`` (exact).
    With SIGNED, row k is multiplied by the sign ``signs_ptr[k]`` (±1: still exact), i.e. diag(s) H."""
    k = tl.arange(0, DC)
    j = tl.arange(0, DC // G) * G + P
    h = _parity_sign(k[:, None], j[None, :])
    if SIGNED:
        h = h * tl.load(signs_ptr + k)[:, None]
    return h.to(DTYPE)


@triton.jit
def _exact_dot(a, b, acc, F32_OPERANDS: tl.constexpr):
    """``a @ b + acc`` for bf16/fp16 operands whose products are exact (one of them ±1), float32 accumulation.

    F32_OPERANDS (the Triton interpreter, which multiplies bf16 operands as their raw uint16 bits) widens both to
    float32 first: exact, and the same products and sums as the tensor cores."""
    if F32_OPERANDS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc=acc)


@triton.jit
def _rotate_chunk(p_src, p_offset, p_signs, ok, h0, h1, h2, h3, DC: tl.constexpr, G: tl.constexpr,
                  SPLIT: tl.constexpr, USE_OFFSET: tl.constexpr, DOT_DTYPE: tl.constexpr, SIGNS_IN_H: tl.constexpr,
                  F32: tl.constexpr):
    """``(x ⊙ s) H_DC`` of one chunk of DC coordinates of ROWS block rows, as G column phases ``[ROWS, DC/G]`` float32.

    ``p_src``/``p_offset``/``p_signs`` ``[ROWS, DC]`` pointers; with SIGNS_IN_H the signs are already the rows of
    the ``h*`` matrices (D <= 256: one sign vector per chunk) and x goes to the dot as loaded. Without SPLIT the source is
    bf16/fp16 and the signs ±1: x ⊙ s is exact in that dtype, the tensor-core products are exact and summed in
    float32. With SPLIT, x ⊙ s (after the offset) is formed in float32 and split into three bf16 parts that carry
    its 24 mantissa bits exactly (hi + mid + lo), one dot each into the same float32 accumulator.
    Phase q holds the rotated coordinates q, q+G, q+2G, … (unused phases repeat phase 0 and are never read).
    """
    if SPLIT:
        x = tl.load(p_src, mask=ok[:, None], other=0.0).to(tl.float32)
        if USE_OFFSET:
            x = x - tl.load(p_offset, mask=ok[:, None], other=0.0)
        if not SIGNS_IN_H:
            x = x * tl.load(p_signs)
        hi = x.to(tl.bfloat16)
        rest = x - hi.to(tl.float32)  # exact: hi is x rounded to 8 significant bits
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)  # the last 8 bits, exact
        zero = tl.zeros((x.shape[0], DC // G), dtype=tl.float32)
        y0 = _exact_dot(hi, h0, _exact_dot(mid, h0, _exact_dot(lo, h0, zero, F32), F32), F32)
        y1, y2, y3 = y0, y0, y0
        if G >= 2:
            y1 = _exact_dot(hi, h1, _exact_dot(mid, h1, _exact_dot(lo, h1, zero, F32), F32), F32)
        if G == 4:
            y2 = _exact_dot(hi, h2, _exact_dot(mid, h2, _exact_dot(lo, h2, zero, F32), F32), F32)
            y3 = _exact_dot(hi, h3, _exact_dot(mid, h3, _exact_dot(lo, h3, zero, F32), F32), F32)
    else:
        x = tl.load(p_src, mask=ok[:, None], other=0.0)
        if not SIGNS_IN_H:
            # ±1 times a 16-bit value is exact in float32 and back (the interpreter has no bf16 arithmetic).
            x = (x.to(tl.float32) * tl.load(p_signs)).to(DOT_DTYPE)
        zero = tl.zeros((x.shape[0], DC // G), dtype=tl.float32)
        y0 = _exact_dot(x, h0, zero, F32)
        y1, y2, y3 = y0, y0, y0
        if G >= 2:
            y1 = _exact_dot(x, h1, zero, F32)
        if G == 4:
            y2 = _exact_dot(x, h2, zero, F32)
            y3 = _exact_dot(x, h3, zero, F32)
    return y0, y1, y2, y3


@triton.jit
def _nearest_code(u, bounds_ptr, BITS: tl.constexpr):
    """The number of decision boundaries strictly below each ``u`` (an exact tie goes to the lower code), int32.

    The boundaries are symmetric (b[H-1] = 0, b[H-1-i] = -b[H-1+i], H = 2^(BITS-1); :func:`_codebook` checks it),
    so only |u| is searched among the H-1 positive ones: for u > 0 the code is H + #{b > 0: b < u}, for u <= 0 it
    is H-1 - #{b > 0: b <= |u|}, and b <= |u| is b < nextup(|u|) (|u|'s bits + 1). Half the comparisons.
    """
    HALF: tl.constexpr = 1 << (BITS - 1)
    positive = u > 0
    a = tl.abs(u)
    a = tl.where(positive, a, (a.to(tl.uint32, bitcast=True) + 1).to(tl.float32, bitcast=True))
    if BITS <= 4:
        # Counted in float32 (exact small integers): compare-select-add compiles to FSET.BF + FADD, two
        # instructions a boundary, where an int32 count takes three (FSETP, VIADD, predicated move).
        count = tl.zeros(u.shape, dtype=tl.float32)
        for k in tl.static_range(HALF - 1):
            count += tl.where(a > tl.load(bounds_ptr + HALF + k), 1.0, 0.0)
        m = count.to(tl.int32)
    else:
        # Binary search: after the step of size 2^s, m holds the count of positive boundaries below a, to 2^s.
        m = tl.zeros(u.shape, dtype=tl.int32)
        for k in tl.static_range(BITS - 1):
            bound = tl.load(bounds_ptr + HALF + m + ((1 << (BITS - 2 - k)) - 1))
            m = tl.where(a > bound, m + (1 << (BITS - 2 - k)), m)
    return tl.where(positive, HALF + m, HALF - 1 - m)


@triton.jit
def _interleave(a, b, c, d, G: tl.constexpr):
    """The G column phases back in coordinate order: ``[ROWS, N]`` x G -> ``[ROWS, N*G]`` (element n*G + q of phase q)."""
    if G == 1:
        return a
    elif G == 2:
        return tl.reshape(tl.join(a, b), (a.shape[0], 2 * a.shape[1]))
    else:
        # join(join(a, c), join(b, d)) flattens to a, b, c, d.
        return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), (a.shape[0], 4 * a.shape[1]))


@triton.jit
def _code_of_group(p: tl.constexpr, q0, q1, q2, q3, q4, q5, q6, q7):
    """``q<p>`` for a compile-time p (the codes of position p in each group of 8)."""
    if p == 0:
        return q0
    elif p == 1:
        return q1
    elif p == 2:
        return q2
    elif p == 3:
        return q3
    elif p == 4:
        return q4
    elif p == 5:
        return q5
    elif p == 6:
        return q6
    else:
        return q7


@triton.jit
def _encode_chunk(y0, y1, y2, y3, scale, bounds_ptr, codebook_ptr, p_codes, code_ok, ROWS: tl.constexpr,
                  DC: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, NORM_CORRECTION: tl.constexpr):
    """Codes of one chunk (phases ``y*`` times ``scale [ROWS]`` = u) packed and stored at ``p_codes [ROWS]`` (uint8
    pointers to the chunk's first byte); returns the sum of the squared centroids per row (norm correction) or 0.

    Packing follows the column phases so that whole bytes form in registers: 8 bits one code a byte, 4 bits the
    even/odd phases as low/high nibbles, 2 bits four phases; 3, 5 and 6 bits (one phase) split each group of 8
    codes apart and assemble its BITS little-endian bytes (layout.py) with int32 shifts.
    """
    c0 = _nearest_code(y0 * scale[:, None], bounds_ptr, BITS)
    c1, c2, c3 = c0, c0, c0
    if G >= 2:
        c1 = _nearest_code(y1 * scale[:, None], bounds_ptr, BITS)
    if G == 4:
        c2 = _nearest_code(y2 * scale[:, None], bounds_ptr, BITS)
        c3 = _nearest_code(y3 * scale[:, None], bounds_ptr, BITS)
    sq = tl.zeros((ROWS,), dtype=tl.float32)
    if NORM_CORRECTION:
        v = tl.load(codebook_ptr + c0)
        sq += tl.sum(v * v, axis=1)
        if G >= 2:
            v = tl.load(codebook_ptr + c1)
            sq += tl.sum(v * v, axis=1)
        if G == 4:
            v = tl.load(codebook_ptr + c2)
            sq += tl.sum(v * v, axis=1)
            v = tl.load(codebook_ptr + c3)
            sq += tl.sum(v * v, axis=1)
    if BITS == 8 or BITS == 4 or BITS == 2:
        if BITS == 8:
            byte = c0
        elif BITS == 4:
            byte = c0 | (c1 << 4)
        else:
            byte = c0 | (c1 << 2) | (c2 << 4) | (c3 << 6)
        n = tl.arange(0, DC * BITS // 8)
        tl.store(p_codes[:, None] + n[None, :], byte.to(tl.uint8), mask=code_ok[:, None])
    else:
        # Code p of each group of 8 (bits p*BITS … p*BITS+BITS-1 of the group's BITS bytes) by three even/odd splits.
        e, o = tl.split(tl.reshape(c0, (ROWS, DC // 8, 2, 2, 2)))
        e0, e1 = tl.split(e)
        o0, o1 = tl.split(o)
        q0, q4 = tl.split(e0)
        q2, q6 = tl.split(e1)
        q1, q5 = tl.split(o0)
        q3, q7 = tl.split(o1)
        g = tl.arange(0, DC // 8)
        for j in tl.static_range(BITS):
            # Byte j holds bits 8j … 8j+7 of the group: the codes whose bit ranges overlap them, shifted into place.
            byte = tl.zeros((ROWS, DC // 8), dtype=tl.int32)
            for p in tl.static_range(8):
                if p * BITS < 8 * j + 8 and p * BITS + BITS > 8 * j:
                    q = _code_of_group(p, q0, q1, q2, q3, q4, q5, q6, q7)
                    if p * BITS >= 8 * j:
                        byte |= q << (p * BITS - 8 * j)
                    else:
                        byte |= q >> (8 * j - p * BITS)
            tl.store(p_codes[:, None] + (g * BITS + j)[None, :], (byte & 255).to(tl.uint8), mask=code_ok[:, None])
    return sq


@triton.jit
def _store_window(p_rows, ok, y0, y1, y2, y3, DC: tl.constexpr, G: tl.constexpr):
    """One chunk of rotated rows (the G phases in coordinate order) into a full-precision window, rounded like
    torch's ``.to(dtype)``; ``p_rows [ROWS]`` points at the chunk's first element of each row."""
    k = tl.arange(0, DC)
    tl.store(p_rows[:, None] + k[None, :], _cast(_interleave(y0, y1, y2, y3, G), p_rows.dtype.element_ty),
             mask=ok[:, None])


@triton.jit
def hadamard_quantize_kv_dot_kernel(
    src_ptr, codes_ptr, norms_ptr, signs_ptr, offset_ptr, bounds_ptr, codebook_ptr, sink_ptr, recent_ptr, seqlens_ptr,
    blocks_per_seq, tiles_per_seq, n_tiles, t_lo, C, S, W, write_pos, first_code, first_recent, sqrt_r, inv_sqrt_r,
    stride_sb, stride_st, stride_sh, stride_sd,
    D: tl.constexpr, R: tl.constexpr, HKV: tl.constexpr, BITS: tl.constexpr, ROWS: tl.constexpr, SPLIT: tl.constexpr,
    SIGNS_PM1: tl.constexpr, DOT_DTYPE: tl.constexpr, F32_OPERANDS: tl.constexpr, IS_SLIDING: tl.constexpr, USE_OFFSET: tl.constexpr, NORM_CORRECTION: tl.constexpr,
    HAS_SINK: tl.constexpr, HAS_RECENT: tl.constexpr, HAS_SEQLENS: tl.constexpr,
):
    """Quantize tiles of ROWS rotation blocks (one row of R coordinates each; a D=512 row is two) per iteration of
    a persistent loop, the rotation on the tensor cores: the block is split into chunks of DC = min(R, 128)
    coordinates, each multiplied by the G column phases of the ±1 matrix H_DC (built once per program), and for
    R = 256 the two chunks combine as H_256 = [[H, H], [H, -H]] (y_lo = P + Q, y_hi = P - Q, float32).
    """
    NB: tl.constexpr = D // R
    DC: tl.constexpr = R if R <= 128 else 128
    G: tl.constexpr = 2 if BITS == 4 else (4 if BITS == 2 else 1)
    CBYTES: tl.constexpr = DC * BITS // 8
    RBYTES: tl.constexpr = D * BITS // 8
    # ±1 signs with D <= 256 (one sign vector) go into the ±1 matrices, diag(s) H, one set per chunk; D = 512 (two
    # blocks with their own signs) multiplies x by them in registers, and so does any other sign vector (SPLIT).
    SIGNS_IN_H: tl.constexpr = NB == 1 and SIGNS_PM1
    k = tl.arange(0, DC)
    h0 = _hadamard_columns(signs_ptr, DC, G, 0, DOT_DTYPE, SIGNS_IN_H)
    h1, h2, h3 = h0, h0, h0
    if G >= 2:
        h1 = _hadamard_columns(signs_ptr, DC, G, 1, DOT_DTYPE, SIGNS_IN_H)
    if G == 4:
        h2 = _hadamard_columns(signs_ptr, DC, G, 2, DOT_DTYPE, SIGNS_IN_H)
        h3 = _hadamard_columns(signs_ptr, DC, G, 3, DOT_DTYPE, SIGNS_IN_H)
    # The second chunk of R = 256 (its own signs when they are in the matrices).
    g0, g1, g2, g3 = h0, h1, h2, h3
    if R > DC and SIGNS_IN_H:
        g0 = _hadamard_columns(signs_ptr + DC, DC, G, 0, DOT_DTYPE, SIGNS_IN_H)
        if G >= 2:
            g1 = _hadamard_columns(signs_ptr + DC, DC, G, 1, DOT_DTYPE, SIGNS_IN_H)
        if G == 4:
            g2 = _hadamard_columns(signs_ptr + DC, DC, G, 2, DOT_DTYPE, SIGNS_IN_H)
            g3 = _hadamard_columns(signs_ptr + DC, DC, G, 3, DOT_DTYPE, SIGNS_IN_H)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        # A tile holds blocks of one sequence b: its index splits on scalars, and a block's (t, h) comes from
        # divisions by the compile-time HKV and NB (a runtime divisor costs ~20 instructions per row and layout).
        # Index arithmetic in int32 (the launcher checks the sizes), offsets into the tensors in int64.
        b = tile // tiles_per_seq
        blocks = (tile - b * tiles_per_seq) * ROWS + tl.arange(0, ROWS)  # flat (t - t_lo, h, block), h fastest
        ok = blocks < blocks_per_seq
        row = blocks // NB
        coord0 = (blocks % NB) * R  # first coordinate of the block in its row
        h = (row % HKV).to(tl.int64)
        t = (row // HKV + t_lo).to(tl.int64)
        b = b.to(tl.int64)
        bh = b * HKV + h
        p_src = src_ptr + b * stride_sb + t * stride_st + h * stride_sh + coord0 * stride_sd  # [ROWS]
        p_off = offset_ptr + bh * D + coord0
        p_sg = signs_ptr + coord0
        ya0, ya1, ya2, ya3 = _rotate_chunk(p_src[:, None] + k[None, :] * stride_sd, p_off[:, None] + k[None, :],
                                           p_sg[:, None] + k[None, :], ok, h0, h1, h2, h3, DC, G, SPLIT, USE_OFFSET,
                                           DOT_DTYPE, SIGNS_IN_H, F32_OPERANDS)
        if R > DC:
            q0, q1, q2, q3 = _rotate_chunk(p_src[:, None] + (DC + k)[None, :] * stride_sd,
                                           p_off[:, None] + (DC + k)[None, :], p_sg[:, None] + (DC + k)[None, :], ok,
                                           g0, g1, g2, g3, DC, G, SPLIT, USE_OFFSET, DOT_DTYPE, SIGNS_IN_H,
                                           F32_OPERANDS)
            yb0, yb1, yb2, yb3 = ya0 - q0, ya1 - q1, ya2 - q2, ya3 - q3
            ya0, ya1, ya2, ya3 = ya0 + q0, ya1 + q1, ya2 + q2, ya3 + q3
            ya0, ya1, ya2, ya3 = ya0 * inv_sqrt_r, ya1 * inv_sqrt_r, ya2 * inv_sqrt_r, ya3 * inv_sqrt_r
            yb0, yb1, yb2, yb3 = yb0 * inv_sqrt_r, yb1 * inv_sqrt_r, yb2 * inv_sqrt_r, yb3 * inv_sqrt_r
        else:
            ya0, ya1, ya2, ya3 = ya0 * inv_sqrt_r, ya1 * inv_sqrt_r, ya2 * inv_sqrt_r, ya3 * inv_sqrt_r
            yb0, yb1, yb2, yb3 = ya0, ya1, ya2, ya3

        # The block norm of the rotated coordinates (each phase once).
        sq = tl.sum(ya0 * ya0, axis=1)
        if G >= 2:
            sq += tl.sum(ya1 * ya1, axis=1)
        if G == 4:
            sq += tl.sum(ya2 * ya2, axis=1) + tl.sum(ya3 * ya3, axis=1)
        if R > DC:
            sq += tl.sum(yb0 * yb0, axis=1)
            if G >= 2:
                sq += tl.sum(yb1 * yb1, axis=1)
            if G == 4:
                sq += tl.sum(yb2 * yb2, axis=1) + tl.sum(yb3 * yb3, axis=1)
        norm = tl.sqrt(sq)
        # A zero block stores norm 0 and u = 0 (decodes to 0 whatever its codes).
        scale = tl.where(norm > 0, sqrt_r / tl.where(norm > 0, norm, 1.0), 0.0)

        if HAS_SEQLENS:
            # Each sequence writes at its own position, read on the device (write_pos is 0).
            p = tl.load(seqlens_ptr + b).to(tl.int64) + t  # absolute positions [ROWS] (b < B: always in range)
        else:
            p = write_pos + t
        if IS_SLIDING:
            slot = p % C
        else:
            slot = p
        # A position past a global cache (possible only through unchecked device lengths) is not written.
        code_ok = ok & (t >= first_code) & (slot < C)
        cache_row = bh * C + slot
        p_codes = codes_ptr + cache_row * RBYTES + (coord0 * BITS) // 8
        unit_sq = _encode_chunk(ya0, ya1, ya2, ya3, scale, bounds_ptr, codebook_ptr, p_codes, code_ok, ROWS, DC, G,
                                BITS, NORM_CORRECTION)
        if R > DC:
            unit_sq += _encode_chunk(yb0, yb1, yb2, yb3, scale, bounds_ptr, codebook_ptr, p_codes + CBYTES, code_ok,
                                     ROWS, DC, G, BITS, NORM_CORRECTION)
        if NORM_CORRECTION:
            norm = norm * sqrt_r / tl.sqrt(unit_sq)
        tl.store(norms_ptr + cache_row * NB + coord0 // R, norm, mask=code_ok)

        if HAS_SINK:
            p_sink = sink_ptr + (bh * S + p) * D + coord0
            sink_ok = ok & (p < S)
            _store_window(p_sink, sink_ok, ya0, ya1, ya2, ya3, DC, G)
            if R > DC:
                _store_window(p_sink + DC, sink_ok, yb0, yb1, yb2, yb3, DC, G)
        if HAS_RECENT:
            p_recent = recent_ptr + (bh * W + p % W) * D + coord0
            recent_ok = ok & (t >= first_recent)
            _store_window(p_recent, recent_ok, ya0, ya1, ya2, ya3, DC, G)
            if R > DC:
                _store_window(p_recent + DC, recent_ok, yb0, yb1, yb2, yb3, DC, G)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Knobs of :func:`hadamard_quantize_kv_fwd` (benchmarks/cuda_ops.py --sweep quant times them).

    variant: "dot" (default: :func:`hadamard_quantize_kv_dot_kernel`, every bits / head dim / dtype) or "v1"
        (:func:`hadamard_quantize_kv_fwd_kernel`, the rotation as broadcast-multiply-sum passes in registers).
    rows: rotation blocks per tile (dot, 16-128; None = 64) or rows per program (v1, None = 512 // D).
    num_warps: None = 4 (v1; dot: 4, 8 for 5-8 bits). num_stages: the dot kernel's software pipelining of its tile loop
        (the next tile's source load in flight during this one's epilogue): None = 2 for D <= 128, 1 above (D256/512
        with 2 stages take 135 KB of shared memory: one program per SM).
    programs_per_sm: the dot kernel's persistent programs per SM: None = 3 for D <= 128, 2 above.
    v1_below: calls with fewer rotation blocks (rows x D/R) than this run v1: a decode step (up to B*Hkv = 1023 rows)
        stays the one small v1 launch it was; 0 = the dot kernel always.
    """

    # Measured on the H200 (2026-11-30, B8 T32768 Hkv8 D128 bf16, 4 bits): 2 stages with 3 programs per SM 605 us
    # (26% of the copy bandwidth), 1 stage with 2 programs 744 us, v1 13.2 ms; B8 T8192 D256 / D512: 1 stage with 2
    # programs 356 / 818 us, with 3 programs 447 / 1048 us (245+ registers: only 2 fit). A decode step (B1 / B8, T1,
    # Hkv8, CUDA graph): v1 6.0 / 6.1 us, dot 6.6 / 7.2 us (it builds its ±1 matrices first), hence v1_below.
    variant: str = "dot"
    rows: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    programs_per_sm: int | None = None
    v1_below: int = 1024


DEFAULT_QUANT_CONFIG = QuantConfig()
_DOT_QUANT_ROWS = 64
_PM1_SIGNS: dict = {}


def _signs_are_pm1(signs: torch.Tensor) -> bool:
    """Whether every entry of ``signs`` is +1 or -1 (the canonical signs and ``torch.ones(D)`` are): then the dot
    kernel multiplies x by them exactly in x's own 16-bit dtype. Other float32 signs take its split path.

    Cached per tensor object and version, so the host reads a sign vector once, not at every decode step.
    """
    key = id(signs)
    hit = _PM1_SIGNS.get(key)
    if hit is not None and hit[0]() is signs and hit[1] == signs._version:
        return hit[2]
    pm1 = bool((signs.abs() == 1).all())
    _PM1_SIGNS[key] = (weakref.ref(signs, lambda _, key=key: _PM1_SIGNS.pop(key, None)), signs._version, pm1)
    return pm1


def hadamard_quantize_kv_fwd(src, codes, norms, write_pos, is_sliding, bits, signs, offset, norm_correction, sink,
                             recent, cache_seqlens=None, config: QuantConfig | None = None) -> None:
    cfg = DEFAULT_QUANT_CONFIG if config is None else config
    if cfg.variant not in ("dot", "v1"):
        raise ValueError(f"QuantConfig.variant must be 'dot' or 'v1', got {cfg.variant!r}")
    B, T, Hkv, D = src.shape
    C = codes.shape[2]
    first_code = max(0, T - C) if is_sliding else 0
    first_recent = max(0, T - recent.shape[2]) if recent is not None else T
    S = sink.shape[2] if sink is not None else 0
    # The first token any buffer needs: a sink position, a kept code, or a kept ring entry (with device
    # lengths any token may land below S).
    t_lo = 0 if write_pos < S or (cache_seqlens is not None and S > 0) else min(first_code, first_recent)
    n_rows = B * (T - t_lo) * Hkv
    if n_rows == 0:
        return
    R = rotation_block(D)
    codebook, bounds = _codebook(bits, src.device)
    W = recent.shape[2] if recent is not None else 1
    buffers = (offset if offset is not None else norms, bounds, codebook, sink if sink is not None else norms,
               recent if recent is not None else norms, cache_seqlens if cache_seqlens is not None else norms)
    flags = dict(
        IS_SLIDING=bool(is_sliding),
        USE_OFFSET=offset is not None,
        NORM_CORRECTION=bool(norm_correction),
        HAS_SINK=sink is not None,
        HAS_RECENT=recent is not None,
        HAS_SEQLENS=cache_seqlens is not None,
    )
    n_blocks = n_rows * (D // R)
    if cfg.variant == "dot" and n_blocks >= cfg.v1_below:
        # bf16/fp16 sources times ±1 signs are exact in their own dtype (one dot per phase); float32 sources,
        # offsets (x - offset in float32) and other signs go through three exact bf16 parts.
        pm1 = _signs_are_pm1(signs)
        direct = src.dtype in (torch.bfloat16, torch.float16) and offset is None and pm1
        rows = cfg.rows or _DOT_QUANT_ROWS
        blocks_per_seq = (T - t_lo) * Hkv * (D // R)
        tiles_per_seq = triton.cdiv(blocks_per_seq, rows)
        n_tiles = B * tiles_per_seq
        if max(n_tiles, tiles_per_seq * rows) >= 2**31:
            raise ValueError(f"hadamard_quantize_kv: {n_blocks} rotation blocks in one call exceed the CUDA kernel's "
                             "int32 indices; split the call along the batch")
        programs_per_sm = cfg.programs_per_sm or (3 if D <= 128 else 2)
        programs = max(1, min(n_tiles, programs_per_sm * _sm_count(src.device)))
        hadamard_quantize_kv_dot_kernel[(programs,)](
            src, codes, norms, signs, *buffers,
            blocks_per_seq, tiles_per_seq, n_tiles, t_lo, C, S, W, write_pos, first_code, first_recent, math.sqrt(R),
            1.0 / math.sqrt(R), *src.stride(),
            D=D,
            R=R,
            HKV=Hkv,
            BITS=bits,
            ROWS=rows,
            SPLIT=not direct,
            SIGNS_PM1=pm1,
            DOT_DTYPE=tl.float16 if direct and src.dtype == torch.float16 else tl.bfloat16,
            F32_OPERANDS=src.device.type != "cuda",  # the Triton interpreter (see _exact_dot)
            # 5-8 bits: the binary search's gathers need 8 warps to stay clear of spills (sm_90, 64 rows).
            num_warps=cfg.num_warps or (8 if bits >= 5 else 4),
            num_stages=cfg.num_stages or (2 if D <= 128 else 1),
            **flags,
        )
        return
    rows = cfg.rows or _rows_per_program(D)
    grid = (_cdiv(n_rows, rows),)
    hadamard_quantize_kv_fwd_kernel[grid](
        src, codes, norms, signs, *buffers,
        n_rows, t_lo, T, Hkv, C, S, W, write_pos, first_code, first_recent, math.sqrt(R), 1.0 / math.sqrt(R),
        *src.stride(),
        D=D,
        R=R,
        BITS=bits,
        ROWS=rows,
        num_warps=cfg.num_warps or 4,
        **flags,
    )


def hadamard_quantize_kv(src, codes, norms, write_pos: int, is_sliding: bool = False, bits: int = 4, signs=None,
                         offset=None, norm_correction: bool = False, sink=None, recent=None,
                         cache_seqlens=None, config: QuantConfig | None = None) -> None:
    # cache_seqlens values live on the device: they are not checked (that would synchronize); a write past a
    # global cache is dropped.
    _validation.check_hadamard_quantize_kv(src, codes, norms, write_pos, is_sliding, bits, signs, offset, sink, recent,
                                           cache_seqlens)
    signs = resolve_signs(signs, src.shape[-1], src.device)
    hadamard_quantize_kv_fwd(src, codes, norms, int(write_pos), is_sliding, bits, signs, offset, norm_correction, sink,
                             recent, cache_seqlens, config=config)


# ---------------------------------------------------------------------------------------------------------------------
# dequantize_kv


@triton.jit
def dequantize_kv_fwd_kernel(
    codes_ptr, norms_ptr, signs_ptr, codebook_ptr, out_ptr, n_rows, length, start, C, inv_sqrt_r,
    D: tl.constexpr, R: tl.constexpr, BITS: tl.constexpr, ROWS: tl.constexpr, ROTATED: tl.constexpr,
):
    NB: tl.constexpr = D // R
    i_p = tl.program_id(0).to(tl.int64)
    rows = i_p * ROWS + tl.arange(0, ROWS)  # flat over (b, h, i)
    row_ok = rows < n_rows
    i = rows % length
    bh = rows // length
    cache_row = bh * C + (start + i) % C
    y = _decode_rows(codes_ptr, norms_ptr, codebook_ptr, cache_row, row_ok, inv_sqrt_r, ROWS, D, R, BITS)
    d = tl.arange(0, D)
    if not ROTATED:
        y = _wht_rows(tl.reshape(y, (ROWS * NB, R)), ROWS * NB, R) * inv_sqrt_r
        y = tl.reshape(y, (ROWS, D)) * tl.load(signs_ptr + d)[None, :]
    tl.store(out_ptr + rows[:, None] * D + d[None, :], y, mask=row_ok[:, None])


def dequantize_kv_fwd(codes, norms, start, length, bits, rotated, signs, head_dim) -> torch.Tensor:
    B, Hkv, C = codes.shape[:3]
    D = head_dim
    out = _empty((B, Hkv, length, D), torch.float32, codes.device)
    n_rows = B * Hkv * length
    if n_rows == 0:
        return out
    R = rotation_block(D)
    rows = _rows_per_program(D)
    codebook, _ = _codebook(bits, codes.device)
    dequantize_kv_fwd_kernel[(_cdiv(n_rows, rows),)](
        codes, norms, signs, codebook, out, n_rows, length, start, C, 1.0 / math.sqrt(R),
        D=D,
        R=R,
        BITS=bits,
        ROWS=rows,
        ROTATED=bool(rotated),
        num_warps=4,
    )
    return out


def dequantize_kv(codes, norms, start: int, length: int, bits: int = 4, rotated: bool = False,
                  signs=None) -> torch.Tensor:
    geo = _validation.check_dequantize_kv(codes, norms, start, length, bits, signs)
    signs = resolve_signs(signs, geo.head_dim, codes.device)
    return dequantize_kv_fwd(codes, norms, int(start), int(length), bits, rotated, signs, geo.head_dim)


# ---------------------------------------------------------------------------------------------------------------------
# flash_attn_vec_tq


@triton.jit
def flash_attn_vec_tq_rotate_q_kernel(
    q_ptr, signs_ptr, q_rot_ptr, n_rows, Hq, Lq, scale, inv_sqrt_r,
    stride_qb, stride_qh, stride_ql, stride_qd,
    D: tl.constexpr, R: tl.constexpr, ROWS: tl.constexpr,
):
    """q_rot = scale · H_R (s ⊙ q) / sqrt(R), float32, contiguous ``[B, Hq, Lq, D]``."""
    NB: tl.constexpr = D // R
    i_p = tl.program_id(0).to(tl.int64)
    rows = i_p * ROWS + tl.arange(0, ROWS)  # flat over (b, hq, i)
    row_ok = rows < n_rows
    i = rows % Lq
    h = (rows // Lq) % Hq
    b = rows // Lq // Hq
    d = tl.arange(0, D)
    p_q = q_ptr + b[:, None] * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_ql + d[None, :] * stride_qd
    x = tl.load(p_q, mask=row_ok[:, None], other=0.0).to(tl.float32) * tl.load(signs_ptr + d)[None, :]
    y = _wht_rows(tl.reshape(x, (ROWS * NB, R)), ROWS * NB, R) * inv_sqrt_r
    y = tl.reshape(y, (ROWS, D)) * scale
    tl.store(q_rot_ptr + rows[:, None] * D + d[None, :], y, mask=row_ok[:, None])


@triton.jit
def _tanh(x):
    # tanh from exp, stable for large |x| (no libdevice dependency, same code on GPU and in the interpreter).
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _attend(q, k, v, j, j_ok, q_pos, m_i, l_i, acc, window, softcap,
            USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    # q [M, D] arrives in the dot's operand dtype (float32 or float16); k, v and p are rounded to it here.
    """One online-softmax step of the rows ``q [M, D]`` over the positions ``j [N]`` with keys/values ``[N, D]``."""
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION)  # [M, N]; q carries the scale
    if USE_SOFTCAP:
        s = softcap * _tanh(s / softcap)
    visible = j_ok[None, :] & (j[None, :] <= q_pos[:, None])
    if USE_WINDOW:
        visible = visible & (j[None, :] > q_pos[:, None] - window)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # Rows that have seen no visible position yet keep m = -inf; exp against 0 gives 0 there, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend_window(q, k_win_ptr, v_win_ptr, win_row0, win_len, lo, hi, q_pos, m_i, l_i, acc, window, softcap,
                   D: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Positions ``[lo, hi)`` read from a full-precision window ``[.., win_len, D]`` at entry ``j mod win_len``."""
    d = tl.arange(0, D)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N).to(tl.int64)
        j_ok = j < hi
        p_row = (win_row0 + j % win_len)[:, None] * D + d[None, :]
        k = tl.load(k_win_ptr + p_row, mask=j_ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_win_ptr + p_row, mask=j_ok[:, None], other=0.0).to(tl.float32)
        m_i, l_i, acc = _attend(q, k, v, j, j_ok, q_pos, m_i, l_i, acc, window, softcap, USE_WINDOW, USE_SOFTCAP,
                                PRECISION)
    return m_i, l_i, acc


@triton.jit
def _split_range(seqlens_ptr, kv_start_ptr, b, i_s, q_i, m_ok, vis_lo, chunk, kv_len, C, LQ, window,
                 HAS_SEQLENS: tl.constexpr, USE_WINDOW: tl.constexpr, HAS_KV_START: tl.constexpr):
    """(lo, hi, n_kv, q_pos): the positions [lo, hi) that split ``i_s`` of sequence ``b`` reads for the query rows
    ``q_i`` (``m_ok`` masks padding rows), the sequence's length and each row's absolute position."""
    lo = vis_lo + i_s * chunk
    hi = lo + chunk  # this split's positions
    if HAS_SEQLENS:
        # This sequence's own length (kv_len bounds them all and sized the splits over [0, kv_len)); a
        # wrapped ring holds its positions from length - C on.
        n_kv = tl.load(seqlens_ptr + b).to(tl.int64)
        lo = tl.maximum(lo, n_kv - C)
    else:
        n_kv = kv_len
    q_pos = n_kv - LQ + q_i
    # No query of this tile sees past its last position (causal), nor (with a window) before its first one's window.
    hi = tl.minimum(tl.minimum(hi, n_kv), n_kv - LQ + tl.max(tl.where(m_ok, q_i, 0)) + 1)
    if USE_WINDOW:
        lo = tl.maximum(lo, n_kv - LQ + tl.min(tl.where(m_ok, q_i, LQ)) - window + 1)
    if HAS_KV_START:
        lo = tl.maximum(lo, tl.load(kv_start_ptr + b))
    return lo, hi, n_kv, q_pos


@triton.jit
def flash_attn_vec_tq_fwd_kernel(
    q_rot_ptr, k_codes_ptr, k_norms_ptr, v_codes_ptr, v_norms_ptr, k_sink_ptr, v_sink_ptr, k_recent_ptr,
    v_recent_ptr, kv_start_ptr, seqlens_ptr, k_codebook_ptr, v_codebook_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    tickets_ptr, signs_ptr, out_ptr, lse_ptr,
    Hkv, C, S, W, kv_len, vis_lo, chunk, num_splits, window, softcap, inv_sqrt_r, GL, LQ,
    D: tl.constexpr, R: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SINK: tl.constexpr,
    HAS_RECENT: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_SEQLENS: tl.constexpr, USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    FUSED_MERGE: tl.constexpr, MERGE_ROWS: tl.constexpr, STORE_LSE: tl.constexpr,
):
    """Split ``i_s`` of KV head ``i_bh`` for the query rows of tile ``i_m``: positions
    ``[vis_lo + i_s*chunk, +chunk)`` ∩ ``[kv_start, kv_len)``, cut to what the tile's queries can see."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    i_m = tl.program_id(2)
    b = i_bh // Hkv
    m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < GL  # row m = g * Lq + i of the group's G*Lq query rows
    d = tl.arange(0, D)
    # The group's G*Lq rotated query rows are contiguous in q_rot [B, Hq, Lq, D].
    q = tl.load(q_rot_ptr + (i_bh * GL + m)[:, None] * D + d[None, :], mask=m_ok[:, None], other=0.0)
    q = _cast(q, DOT_DTYPE)
    q_i = m % LQ
    lo, hi, n_kv, q_pos = _split_range(seqlens_ptr, kv_start_ptr, b, i_s, q_i, m_ok, vis_lo, chunk, kv_len, C, LQ,
                                       window, HAS_SEQLENS, USE_WINDOW, HAS_KV_START)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)

    # Visible position j comes from the sinks when j < S, else from the recent ring when j >= n_kv - W,
    # else from the codes (S = 0 / W = 0 when the buffer is absent).
    code_lo = tl.maximum(lo, S)
    code_hi = tl.minimum(hi, n_kv - W)
    if HAS_SINK:
        m_i, l_i, acc = _attend_window(q, k_sink_ptr, v_sink_ptr, i_bh * S, tl.maximum(S, 1), lo, tl.minimum(hi, S),
                                       q_pos, m_i, l_i, acc, window, softcap, D, BLOCK_N, USE_WINDOW, USE_SOFTCAP,
                                       PRECISION)
    for start in range(code_lo, code_hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N).to(tl.int64)
        j_ok = j < code_hi
        cache_row = i_bh * C + j % C
        k = _decode_rows(k_codes_ptr, k_norms_ptr, k_codebook_ptr, cache_row, j_ok, inv_sqrt_r, BLOCK_N, D, R, K_BITS)
        v = _decode_rows(v_codes_ptr, v_norms_ptr, v_codebook_ptr, cache_row, j_ok, inv_sqrt_r, BLOCK_N, D, R, V_BITS)
        m_i, l_i, acc = _attend(q, k, v, j, j_ok, q_pos, m_i, l_i, acc, window, softcap, USE_WINDOW, USE_SOFTCAP,
                                PRECISION)
    if HAS_RECENT:
        m_i, l_i, acc = _attend_window(q, k_recent_ptr, v_recent_ptr, i_bh * W, W,
                                       tl.maximum(tl.maximum(lo, S), n_kv - W), hi, q_pos, m_i, l_i, acc, window,
                                       softcap, D, BLOCK_N, USE_WINDOW, USE_SOFTCAP, PRECISION)

    part = (i_bh * num_splits + i_s) * GL + m  # [BLOCK_M], partials [B*Hkv, num_splits, G*Lq]
    tl.store(part_m_ptr + part, m_i, mask=m_ok)
    tl.store(part_l_ptr + part, l_i, mask=m_ok)
    tl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc, mask=m_ok[:, None])
    if FUSED_MERGE:
        _merge_if_last(tickets_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, signs_ptr, out_ptr, lse_ptr, i_bh, i_m,
                       num_splits, inv_sqrt_r, GL, D, R, BLOCK_M, MERGE_ROWS, STORE_LSE)


@triton.jit
def _merge_rows(part_acc_ptr, part_m_ptr, part_l_ptr, signs_ptr, out_ptr, lse_ptr, rows, row_ok, num_splits,
                inv_sqrt_r, GL, D: tl.constexpr, R: tl.constexpr, ROWS: tl.constexpr, STORE_LSE: tl.constexpr):
    """Merge the splits of the query rows ``rows [ROWS]`` with log-sum-exp, un-rotate, write out (q's dtype) and lse.

    ``rows`` are flat over (b, hq, i) = (b, hkv, g*Lq + i): the output's row order. The partials are read with
    ``.cg`` (L2, not L1): in the fused merge other programs of the same launch wrote them.
    """
    NB: tl.constexpr = D // R
    part0 = (rows // GL) * num_splits * GL + rows % GL  # split 0 of the row's partials
    d = tl.arange(0, D)
    m_max = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    for s in range(num_splits):
        m_max = tl.maximum(m_max, tl.load(part_m_ptr + part0 + s * GL, mask=row_ok, other=float("-inf"),
                                          cache_modifier=".cg"))
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_sum = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((ROWS, D), dtype=tl.float32)
    for s in range(num_splits):
        part = part0 + s * GL
        w = tl.exp(tl.load(part_m_ptr + part, mask=row_ok, other=float("-inf"), cache_modifier=".cg") - m_safe)
        l_sum += w * tl.load(part_l_ptr + part, mask=row_ok, other=0.0, cache_modifier=".cg")
        acc += w[:, None] * tl.load(part_acc_ptr + part[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0,
                                    cache_modifier=".cg")
    # A row without any visible position (only possible through kv_start) outputs zeros and lse = -inf.
    y = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    y = _wht_rows(tl.reshape(y, (ROWS * NB, R)), ROWS * NB, R) * inv_sqrt_r
    y = tl.reshape(y, (ROWS, D)) * tl.load(signs_ptr + d)[None, :]
    tl.store(out_ptr + rows[:, None] * D + d[None, :], _cast(y, out_ptr.dtype.element_ty), mask=row_ok[:, None])
    if STORE_LSE:
        tl.store(lse_ptr + rows, tl.log(l_sum) + m_max, mask=row_ok)


@triton.jit
def flash_attn_vec_tq_reduce_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, signs_ptr, out_ptr, lse_ptr, n_rows, num_splits, inv_sqrt_r, GL,
    D: tl.constexpr, R: tl.constexpr, ROWS: tl.constexpr, STORE_LSE: tl.constexpr,
):
    """The separate merge launch (AttnConfig(fused_merge=False)): :func:`_merge_rows` over ROWS rows per program."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    _merge_rows(part_acc_ptr, part_m_ptr, part_l_ptr, signs_ptr, out_ptr, lse_ptr, rows, rows < n_rows, num_splits,
                inv_sqrt_r, GL, D, R, ROWS, STORE_LSE)


@triton.jit
def _merge_if_last(tickets_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, signs_ptr, out_ptr, lse_ptr, i_bh, i_m,
                   num_splits, inv_sqrt_r, GL, D: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
                   MERGE_ROWS: tl.constexpr, STORE_LSE: tl.constexpr):
    """The fused merge: called by every split program of row tile ``i_m`` of KV head ``i_bh`` right after it stored
    its partials; the LAST of the ``num_splits`` programs to arrive merges them all (:func:`_merge_rows`).

    No program waits for another (the programs of a grid need not be co-resident): each takes a ticket with an
    acq_rel atomic after a CTA barrier (all of its threads' partial stores are ordered before the release), and the
    one that draws ticket num_splits - 1 has acquired every other program's stores. It puts the counter back to 0,
    so the next call (or CUDA-graph replay) starts from zero without a memset launch.
    """
    done = num_splits - 1
    ticket = tickets_ptr + i_bh * tl.cdiv(GL, BLOCK_M) + i_m
    if num_splits > 1:
        tl.debug_barrier()
        done = tl.atomic_add(ticket, 1, sem="acq_rel")
    if done == num_splits - 1:
        if num_splits > 1:
            tl.store(ticket, 0)
        tl.debug_barrier()
        for r0 in range(i_m * BLOCK_M, tl.minimum(i_m * BLOCK_M + BLOCK_M, GL), MERGE_ROWS):
            m = r0 + tl.arange(0, MERGE_ROWS)
            _merge_rows(part_acc_ptr, part_m_ptr, part_l_ptr, signs_ptr, out_ptr, lse_ptr, i_bh * GL + m, m < GL,
                        num_splits, inv_sqrt_r, GL, D, R, MERGE_ROWS, STORE_LSE)


# ---- version 2 of the main kernel (NB = 1, i.e. D <= 256; every bit width) -----------------------------------------
#
# Why: v1 ran at ~0.3 TB/s on the H200 because it was latency-bound: 248 registers per thread at 8 warps
# allow ONE program per SM, which keeps only one 32-position tile (4 KB of codes) in flight per SM with no
# pipelining (Little's law wants ~30 KB per SM at 4 TB/s). v2 cuts the per-element work and the registers:
#   * one 64-bit base pointer per program and 32-bit in-slab offsets (v1: 64-bit pointers per element);
#   * the norm scales the [M, N] scores and probabilities after/before the dots instead of every element
#     of the [N, D] tiles (NB = 1: one norm per row);
#   * the codebook is gathered in the dot's operand dtype (float16 for half-precision queries: no convert);
#   * a row is split into two halves of D/2 coordinates that need no join/reshape: even/odd coordinates
#     for 4 bits (low/high nibble of each byte), first/second half for other widths; the scores are the
#     sum of two dots and the output keeps two accumulators, stored to their coordinates at the end;
#   * the next tile's 4-bit codes are loaded while the current one is computed (PREFETCH);
#   * the q rotation is folded in (FOLD_Q: q·diag(signs)·H as a dot with the ±1 Hadamard matrix, exact
#     products, float32 sums), saving a launch.


@triton.jit
def _col_map(i, half: tl.constexpr, EO: tl.constexpr, DH: tl.constexpr):
    """Coordinate of column ``i`` of half ``half`` of a row: even/odd coordinates (EO) or first/second half."""
    if EO:
        return 2 * i + half
    else:
        return half * DH + i


@triton.jit
def _unpack_off(base_ptr, off, ok, N: tl.constexpr, DC: tl.constexpr, BITS: tl.constexpr):
    """Codes ``[N, DC]`` int32 of DC consecutive coordinates packed from byte offsets ``off [N]`` (int32) of base_ptr."""
    if BITS == 8:
        d = tl.arange(0, DC)
        codes = tl.load(base_ptr + (off[:, None] + d[None, :]), mask=ok[:, None], other=0).to(tl.int32)
    elif BITS == 4:
        k = tl.arange(0, DC // 2)
        byte = tl.load(base_ptr + (off[:, None] + k[None, :]), mask=ok[:, None], other=0).to(tl.int32)
        codes = tl.reshape(tl.join(byte & 15, byte >> 4), (N, DC))
    elif BITS == 2:
        k = tl.arange(0, DC // 4)
        byte = tl.load(base_ptr + (off[:, None] + k[None, :]), mask=ok[:, None], other=0).to(tl.int32)
        codes = tl.join(tl.join(byte & 3, (byte >> 4) & 3), tl.join((byte >> 2) & 3, byte >> 6))
        codes = tl.reshape(codes, (N, DC))
    elif BITS == 3:
        # 3 bytes per 8 codes, assembled into one 24-bit int32 word.
        g = tl.arange(0, DC // 8)
        p = base_ptr + (off[:, None] + (g * 3)[None, :])
        w = tl.load(p, mask=ok[:, None], other=0).to(tl.int32)
        w = w | (tl.load(p + 1, mask=ok[:, None], other=0).to(tl.int32) << 8)
        w = w | (tl.load(p + 2, mask=ok[:, None], other=0).to(tl.int32) << 16)
        r = tl.arange(0, 8)
        codes = tl.reshape((w[:, :, None] >> (r * 3)[None, None, :]) & 7, (N, DC))
    else:
        g = tl.arange(0, DC // 8)
        j = tl.arange(0, 8)
        ptr = base_ptr + (off[:, None, None] + (g * BITS)[None, :, None] + j[None, None, :])
        byte = tl.load(ptr, mask=ok[:, None, None] & (j < BITS)[None, None, :], other=0).to(tl.int64)
        word = tl.sum(byte << (j * 8).to(tl.int64)[None, None, :], axis=2)
        codes = (word[:, :, None] >> (j * BITS).to(tl.int64)[None, None, :]) & ((1 << BITS) - 1)
        codes = tl.reshape(codes.to(tl.int32), (N, DC))
    return codes


@triton.jit
def _codes_halves(base_ptr, off, ok, N: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """(codes_a, codes_b) ``[N, D/2]`` int32 of the rows at byte offsets ``off``, split as :func:`_col_map` says."""
    DH: tl.constexpr = D // 2
    if BITS == 4:
        k = tl.arange(0, DH)
        byte = tl.load(base_ptr + (off[:, None] + k[None, :]), mask=ok[:, None], other=0).to(tl.int32)
        a = byte & 15
        b = byte >> 4
    else:
        HALF_BYTES: tl.constexpr = DH * BITS // 8
        a = _unpack_off(base_ptr, off, ok, N, DH, BITS)
        b = _unpack_off(base_ptr, off + HALF_BYTES, ok, N, DH, BITS)
    return a, b


@triton.jit
def _pair_index(base_ptr, off, ok, N: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """``[N, D/2]`` int32: column i holds the 2·BITS-bit field of codes (2i, 2i+1) of the rows at byte offsets ``off``."""
    DH: tl.constexpr = D // 2
    if BITS == 4:
        k = tl.arange(0, DH)
        idx = tl.load(base_ptr + (off[:, None] + k[None, :]), mask=ok[:, None], other=0).to(tl.int32)
    elif BITS == 2:
        k = tl.arange(0, DH // 2)
        byte = tl.load(base_ptr + (off[:, None] + k[None, :]), mask=ok[:, None], other=0).to(tl.int32)
        idx = tl.reshape(tl.join(byte & 15, byte >> 4), (N, DH))
    else:
        g = tl.arange(0, DH // 4)
        p = base_ptr + (off[:, None] + (g * 3)[None, :])
        w = tl.load(p, mask=ok[:, None], other=0).to(tl.int32)
        w = w | (tl.load(p + 1, mask=ok[:, None], other=0).to(tl.int32) << 8)
        w = w | (tl.load(p + 2, mask=ok[:, None], other=0).to(tl.int32) << 16)
        t = tl.arange(0, 4)
        idx = tl.reshape((w[:, :, None] >> (t * 6)[None, None, :]) & 63, (N, DH))
    return idx


@triton.jit
def _pair_values(table_ptr, idx):
    """(even, odd) float16 values of the pair indices ``idx`` from a table of int32 = two float16 bit patterns."""
    w = tl.load(table_ptr + idx)
    lo = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    hi = ((w >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    return lo, hi


@triton.jit
def _attend2(qa, qb, ka, kb, va, vb, kscale, vscale, j, j_ok, q_pos, m_i, l_i, acc_a, acc_b, window, softcap,
             SCALED: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
             SWAP: tl.constexpr):
    """One online-softmax step over ``j [N]`` with split keys/values (operand dtype) and per-row scales.

    SWAP (the "v3" variant) computes the transposed products, s^T = K q^T and (P V)^T = V^T P^T: on sm_90 the
    first wgmma operand may come from registers, so the gathered key tile feeds the tensor cores where it was
    decoded, and what goes through shared memory is q (once) and p^T ([N, 16], per tile) instead of the
    [N, D] key tile. The key halves are interleaved into one [N, D] operand (for 4 bits the coordinate order:
    a pair-LUT word of two float16 is then one operand register pair) and ``qa`` arrives as the whole query
    rows in that same column order (``qb`` unused).
    """
    if SWAP:
        # qa holds the whole query rows in the interleaved column order (qb is unused): see the v2 kernel.
        kf = tl.reshape(tl.join(ka, kb), (ka.shape[0], 2 * ka.shape[1]))
        s = tl.trans(tl.dot(kf, tl.trans(qa), input_precision=PRECISION))
    else:
        s = tl.dot(qa, tl.trans(ka), input_precision=PRECISION)
        s = tl.dot(qb, tl.trans(kb), acc=s, input_precision=PRECISION)  # [M, N]; q carries the softmax scale
    if SCALED:
        s = s * kscale[None, :]
    if USE_SOFTCAP:
        s = softcap * _tanh(s / softcap)
    visible = j_ok[None, :] & (j[None, :] <= q_pos[:, None])
    if USE_WINDOW:
        visible = visible & (j[None, :] > q_pos[:, None] - window)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if SCALED:
        p = p * vscale[None, :]
    if SWAP:
        pt = tl.trans(p.to(qa.dtype))
        acc_a = tl.trans(tl.dot(tl.trans(va), pt, acc=tl.trans(acc_a * alpha[:, None]), input_precision=PRECISION))
        acc_b = tl.trans(tl.dot(tl.trans(vb), pt, acc=tl.trans(acc_b * alpha[:, None]), input_precision=PRECISION))
    else:
        pc = p.to(qa.dtype)
        acc_a = tl.dot(pc, va, acc=acc_a * alpha[:, None], input_precision=PRECISION)
        acc_b = tl.dot(pc, vb, acc=acc_b * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc_a, acc_b


@triton.jit
def _attend_window2(qa, qb, k_win_ptr, v_win_ptr, win_row0, win_len, lo, hi, q_pos, m_i, l_i, acc_a, acc_b, window,
                    softcap, D: tl.constexpr, K_EO: tl.constexpr, V_EO: tl.constexpr, BLOCK_N: tl.constexpr,
                    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
                    SWAP: tl.constexpr):
    """Positions ``[lo, hi)`` of a full-precision window (rotated domain) at entry ``j mod win_len``."""
    DH: tl.constexpr = D // 2
    i = tl.arange(0, DH)
    ck_a = _col_map(i, 0, K_EO, DH)
    ck_b = _col_map(i, 1, K_EO, DH)
    cv_a = _col_map(i, 0, V_EO, DH)
    cv_b = _col_map(i, 1, V_EO, DH)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N).to(tl.int64)
        j_ok = j < hi
        row = (win_row0 + j % win_len)[:, None] * D
        ka = tl.load(k_win_ptr + row + ck_a[None, :], mask=j_ok[:, None], other=0.0).to(tl.float32).to(qa.dtype)
        kb = tl.load(k_win_ptr + row + ck_b[None, :], mask=j_ok[:, None], other=0.0).to(tl.float32).to(qa.dtype)
        va = tl.load(v_win_ptr + row + cv_a[None, :], mask=j_ok[:, None], other=0.0).to(tl.float32).to(qa.dtype)
        vb = tl.load(v_win_ptr + row + cv_b[None, :], mask=j_ok[:, None], other=0.0).to(tl.float32).to(qa.dtype)
        m_i, l_i, acc_a, acc_b = _attend2(qa, qb, ka, kb, va, vb, j_ok, j_ok, j, j_ok, q_pos, m_i, l_i, acc_a, acc_b,
                                          window, softcap, False, USE_WINDOW, USE_SOFTCAP, PRECISION, SWAP)
    return m_i, l_i, acc_a, acc_b


@triton.jit
def flash_attn_vec_tq_fwd2_kernel(
    q_ptr, hmat_ptr, signs_ptr, k_codes_ptr, k_norms_ptr, v_codes_ptr, v_norms_ptr, k_sink_ptr, v_sink_ptr,
    k_recent_ptr, v_recent_ptr, kv_start_ptr, seqlens_ptr, k_codebook_ptr, v_codebook_ptr, part_acc_ptr, part_m_ptr,
    part_l_ptr, tickets_ptr, out_ptr, lse_ptr,
    Hkv, C, S, W, kv_len, vis_lo, chunk, num_splits, window, softcap, q_scale, inv_sqrt_r, GL, LQ, G,
    stride_qb, stride_qh, stride_ql, stride_qd,
    D: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SINK: tl.constexpr, HAS_RECENT: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_SEQLENS: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    FOLD_Q: tl.constexpr, PREFETCH: tl.constexpr, LUT_PAIR: tl.constexpr,
    FUSED_MERGE: tl.constexpr, MERGE_ROWS: tl.constexpr, STORE_LSE: tl.constexpr, SWAP: tl.constexpr,
):
    """As :func:`flash_attn_vec_tq_fwd_kernel` (same grid, partials and position logic), for NB = 1.

    SWAP = the "v3" variant: the transposed dots of :func:`_attend2`.
    """
    DH: tl.constexpr = D // 2
    K_RB: tl.constexpr = D * K_BITS // 8
    V_RB: tl.constexpr = D * V_BITS // 8
    PF_K: tl.constexpr = PREFETCH and K_BITS == 4
    PF_V: tl.constexpr = PREFETCH and V_BITS == 4
    # LUT_PAIR (float16 operands only): one gather from a 2^(2b)-entry table per pair of codes, for b = 2, 3, 4.
    K_PAIR: tl.constexpr = LUT_PAIR and K_BITS <= 4
    V_PAIR: tl.constexpr = LUT_PAIR and V_BITS <= 4
    K_EO: tl.constexpr = K_BITS == 4 or K_PAIR
    V_EO: tl.constexpr = V_BITS == 4 or V_PAIR
    i_bh = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    i_m = tl.program_id(2)
    b = i_bh // Hkv
    m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < GL
    q_i = m % LQ
    i = tl.arange(0, DH)
    ck_a = _col_map(i, 0, K_EO, DH)
    ck_b = _col_map(i, 1, K_EO, DH)
    cv_a = _col_map(i, 0, V_EO, DH)
    cv_b = _col_map(i, 1, V_EO, DH)
    if SWAP:
        # Whole rows, columns in the order the key halves interleave to (ck_a[0], ck_b[0], ck_a[1], ...).
        cq = tl.reshape(tl.join(ck_a, ck_b), (D,))
        if FOLD_Q:
            hq = (i_bh % Hkv) * G + m // LQ
            d = tl.arange(0, D)
            p_q = q_ptr + b * stride_qb + hq[:, None] * stride_qh + q_i[:, None] * stride_ql + d[None, :] * stride_qd
            x = tl.load(p_q, mask=m_ok[:, None], other=0.0).to(tl.float32) * tl.load(signs_ptr + d)[None, :]
            h = tl.load(hmat_ptr + d[:, None] * D + cq[None, :])
            qa = _cast(tl.dot(x.to(DOT_DTYPE), h, input_precision=PRECISION) * q_scale, DOT_DTYPE)
        else:
            qa = _cast(tl.load(q_ptr + (i_bh * GL + m)[:, None] * D + cq[None, :], mask=m_ok[:, None], other=0.0),
                       DOT_DTYPE)
        qb = qa
    elif FOLD_Q:
        # q_rot[:, c] = q_scale * sum_d q[:, d] s[d] H[d, c]: the ±1 entries make every product exact.
        hq = (i_bh % Hkv) * G + m // LQ
        d = tl.arange(0, D)
        p_q = q_ptr + b * stride_qb + hq[:, None] * stride_qh + q_i[:, None] * stride_ql + d[None, :] * stride_qd
        x = tl.load(p_q, mask=m_ok[:, None], other=0.0).to(tl.float32) * tl.load(signs_ptr + d)[None, :]
        x = x.to(DOT_DTYPE)
        ha = tl.load(hmat_ptr + d[:, None] * D + ck_a[None, :])
        hb = tl.load(hmat_ptr + d[:, None] * D + ck_b[None, :])
        qa = _cast(tl.dot(x, ha, input_precision=PRECISION) * q_scale, DOT_DTYPE)
        qb = _cast(tl.dot(x, hb, input_precision=PRECISION) * q_scale, DOT_DTYPE)
    else:
        row = (i_bh * GL + m)[:, None] * D
        qa = _cast(tl.load(q_ptr + row + ck_a[None, :], mask=m_ok[:, None], other=0.0), DOT_DTYPE)
        qb = _cast(tl.load(q_ptr + row + ck_b[None, :], mask=m_ok[:, None], other=0.0), DOT_DTYPE)
    lo, hi, n_kv, q_pos = _split_range(seqlens_ptr, kv_start_ptr, b, i_s, q_i, m_ok, vis_lo, chunk, kv_len, C, LQ,
                                       window, HAS_SEQLENS, USE_WINDOW, HAS_KV_START)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_a = tl.zeros((BLOCK_M, DH), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, DH), dtype=tl.float32)

    code_lo = tl.maximum(lo, S)
    code_hi = tl.minimum(hi, n_kv - W)
    if HAS_SINK:
        m_i, l_i, acc_a, acc_b = _attend_window2(qa, qb, k_sink_ptr, v_sink_ptr, i_bh * S, tl.maximum(S, 1), lo,
                                                 tl.minimum(hi, S), q_pos, m_i, l_i, acc_a, acc_b, window, softcap,
                                                 D, K_EO, V_EO, BLOCK_N, USE_WINDOW, USE_SOFTCAP, PRECISION,
                                                 SWAP)
    # One 64-bit base per program; offsets inside one KV head's slab are int32.
    k_base = k_codes_ptr + i_bh * C * K_RB
    v_base = v_codes_ptr + i_bh * C * V_RB
    kn_base = k_norms_ptr + i_bh * C
    vn_base = v_norms_ptr + i_bh * C
    jj = tl.arange(0, BLOCK_N)
    j0 = code_lo + jj
    # Prefetched raw 4-bit bytes of the first tile (unused placeholders otherwise).
    if PF_K:
        k_raw = tl.load(k_base + (((j0 % C).to(tl.int32) * K_RB)[:, None] + i[None, :]), mask=(j0 < code_hi)[:, None],
                        other=0)
    else:
        k_raw = tl.zeros((BLOCK_N, DH), dtype=tl.uint8)
    if PF_V:
        v_raw = tl.load(v_base + (((j0 % C).to(tl.int32) * V_RB)[:, None] + i[None, :]), mask=(j0 < code_hi)[:, None],
                        other=0)
    else:
        v_raw = tl.zeros((BLOCK_N, DH), dtype=tl.uint8)
    for start in range(code_lo, code_hi, BLOCK_N):
        j = start + jj
        j_ok = j < code_hi
        slot = (j % C).to(tl.int32)
        jn = j + BLOCK_N
        slot_n = (jn % C).to(tl.int32)
        ok_n = jn < code_hi
        kscale = tl.load(kn_base + slot, mask=j_ok, other=0.0) * inv_sqrt_r
        vscale = tl.load(vn_base + slot, mask=j_ok, other=0.0) * inv_sqrt_r
        if PF_K:
            kc = k_raw.to(tl.int32)
            k_raw = tl.load(k_base + ((slot_n * K_RB)[:, None] + i[None, :]), mask=ok_n[:, None], other=0)
            if K_PAIR:
                ka, kb = _pair_values(k_codebook_ptr, kc)
            else:
                ka = tl.load(k_codebook_ptr + (kc & 15))
                kb = tl.load(k_codebook_ptr + (kc >> 4))
        elif K_PAIR:
            ka, kb = _pair_values(k_codebook_ptr, _pair_index(k_base, slot * K_RB, j_ok, BLOCK_N, D, K_BITS))
        else:
            kca, kcb = _codes_halves(k_base, slot * K_RB, j_ok, BLOCK_N, D, K_BITS)
            ka = tl.load(k_codebook_ptr + kca)
            kb = tl.load(k_codebook_ptr + kcb)
        if PF_V:
            vc = v_raw.to(tl.int32)
            v_raw = tl.load(v_base + ((slot_n * V_RB)[:, None] + i[None, :]), mask=ok_n[:, None], other=0)
            if V_PAIR:
                va, vb = _pair_values(v_codebook_ptr, vc)
            else:
                va = tl.load(v_codebook_ptr + (vc & 15))
                vb = tl.load(v_codebook_ptr + (vc >> 4))
        elif V_PAIR:
            va, vb = _pair_values(v_codebook_ptr, _pair_index(v_base, slot * V_RB, j_ok, BLOCK_N, D, V_BITS))
        else:
            vca, vcb = _codes_halves(v_base, slot * V_RB, j_ok, BLOCK_N, D, V_BITS)
            va = tl.load(v_codebook_ptr + vca)
            vb = tl.load(v_codebook_ptr + vcb)
        m_i, l_i, acc_a, acc_b = _attend2(qa, qb, ka, kb, va, vb, kscale, vscale, j, j_ok, q_pos, m_i, l_i, acc_a,
                                          acc_b, window, softcap, True, USE_WINDOW, USE_SOFTCAP, PRECISION,
                                          SWAP)
    if HAS_RECENT:
        m_i, l_i, acc_a, acc_b = _attend_window2(qa, qb, k_recent_ptr, v_recent_ptr, i_bh * W, W,
                                                 tl.maximum(tl.maximum(lo, S), n_kv - W), hi, q_pos, m_i, l_i, acc_a,
                                                 acc_b, window, softcap, D, K_EO, V_EO, BLOCK_N, USE_WINDOW,
                                                 USE_SOFTCAP, PRECISION, SWAP)

    part = (i_bh * num_splits + i_s) * GL + m
    tl.store(part_m_ptr + part, m_i, mask=m_ok)
    tl.store(part_l_ptr + part, l_i, mask=m_ok)
    tl.store(part_acc_ptr + part[:, None] * D + cv_a[None, :], acc_a, mask=m_ok[:, None])
    tl.store(part_acc_ptr + part[:, None] * D + cv_b[None, :], acc_b, mask=m_ok[:, None])
    if FUSED_MERGE:
        _merge_if_last(tickets_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, signs_ptr, out_ptr, lse_ptr, i_bh, i_m,
                       num_splits, inv_sqrt_r, GL, D, D, BLOCK_M, MERGE_ROWS, STORE_LSE)


# Positions per key/value tile of the main kernel, by head_dim, and its warps: the largest tiles that compiled
# for sm_90 (Triton 3.9's ptxas, read with cuobjdump -res-usage) without spilling registers at a decode
# row tile (BLOCK_M = 16): D64 32/4 warps (238 registers), D128 32/8 (248), D256 16/8 (219); D512 16/8 spills
# 48 bytes. Larger tiles spilled kilobytes. Not yet tuned by timing on a GPU.
_BLOCK_N = {64: 32, 128: 32, 256: 16, 512: 16}
# Query rows (G*Lq of one KV head) per program: decode fits one tile; a long Lq (prefill) takes several.
_MAX_BLOCK_M = {64: 64, 128: 64, 256: 32, 512: 16}
# Fewest positions worth a split of their own: below this, the partials cost more than the parallelism gains.
_MIN_SPLIT_POSITIONS = 256
# Programs to aim for per streaming multiprocessor, so that long contexts keep every SM's memory pipes busy.
_PROGRAMS_PER_SM = 4

# No software pipelining in the main kernel's loop: the pipeliner would stage the codebook gathers through
# shared memory (66 KB more per program at D=128, 4 bits), leaving room for fewer programs per SM; the
# latency is hidden by several programs per SM instead (22 KB each at D=128 with 16-bit queries).
_NUM_STAGES = 1

_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the Triton interpreter runs programs one after another
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


def choose_num_splits(num_positions: int, groups: int, device: torch.device, block_n: int,
                      programs_per_sm: int = _PROGRAMS_PER_SM, min_split_positions: int = _MIN_SPLIT_POSITIONS) -> int:
    """Splits of the visible range per KV head: enough programs to fill the GPU, each at least a few tiles long."""
    if num_positions <= 0:
        return 1
    want = _cdiv(programs_per_sm * _sm_count(device), groups)
    most = _cdiv(num_positions, max(min_split_positions, block_n))
    return max(1, min(want, most))


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    """Knobs of :func:`flash_attn_vec_tq_fwd` (benchmarks/cuda_ops.py --sweep times them). None = the default.

    variant: "v2" (the kernel for NB = 1, i.e. D <= 256; D = 512 always runs v1), "v1" (the previous kernel) or
        "v3" (v2's kernel with the transposed dots of :func:`_attend2` (SWAP) for decode row tiles, G*Lq <= 16,
        of float16/bfloat16 queries; anything else runs as v2). Not the default until timed on the GPU.
    block_n / num_warps / num_stages: tile positions, warps and software-pipelining stages of the main kernel.
    prefetch: v2 loads the next tile's 4-bit codes during the current tile.
    fold_q: v2/v3 rotate q inside the main kernel (a dot with the ±1 Hadamard matrix) instead of a separate
        launch (None: v2 with float16/bfloat16 q at D <= 128; v3 never).
    lut_pair: v2 with half-precision queries and 2-, 3- or 4-bit codes gathers two float16 values per lookup
        from a 2^(2b)-entry table (1 KB at 4 bits) instead of one per code from the 2^b centroids
        (None: on for v3, off for v2).
    programs_per_sm / min_split_positions: the split heuristic (:func:`choose_num_splits`).
    fused_merge: the last split program of each (KV head, row tile) merges the splits and writes out/lse (one
        launch with fold_q) instead of a separate merge launch.
    """

    variant: str = "v2"
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    prefetch: bool = True
    fold_q: bool | None = None
    lut_pair: bool | None = None
    programs_per_sm: int = _PROGRAMS_PER_SM
    min_split_positions: int = _MIN_SPLIT_POSITIONS
    fused_merge: bool = False


DEFAULT_ATTN_CONFIG = AttnConfig()
# v2 tiles by head_dim: (block_n, num_warps). Compiled for sm_90 (Triton 3.9's ptxas, pointers and C divisible
# by 16 as at a real launch), 4-bit K and V, bf16 q, no spills: D64 64/4 128 registers (4 programs of 4 warps per
# SM), D128 64/8 118 (2 programs of 8 warps), D256 32/8 141; 3-bit D128 64/8 158. v1 at D128 (32/8) needed 248,
# i.e. one program of 8 warps per SM. To be tuned by timing: benchmarks/cuda_ops.py --sweep.
_V2_TILE = {32: (64, 4), 64: (64, 4), 128: (64, 8), 256: (32, 8)}
# v3 tiles by head_dim: (block_n, num_warps), 4-bit K/V, bf16 q, pair LUT, fused merge, q rotated by its own
# launch, compiled for sm_90 with benchmarks/compile_sm90.py v3 "[...]" 0, no spills, registers with Triton 3.6
# (the H200's) / 3.9: D128 32/4 124 / 120 (4 programs of 4 warps per SM; BN64: 214 / 165, 2 programs, ~20% fewer
# loop instructions per KB), D64 64/4 152 / 129; 3-bit D128 64/4 236 / 154. Four warps: per KB of codes the loop
# issues ~40% fewer warp instructions than at 8 warps (one warpgroup per program). D128 takes the 32-position
# tile for occupancy: session 4 measured 0.41 TB/s, far below the issue limit, i.e. latency-bound.
# To be tuned by timing: benchmarks/cuda_ops.py --sweep attn ("v3 bn64").
_V3_TILE = {32: (64, 4), 64: (64, 4), 128: (32, 4), 256: (32, 4)}
_HMAT: dict = {}


def _hadamard_matrix(D: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The unnormalised Sylvester Hadamard matrix H_D (±1) in ``dtype`` on ``device``, cached."""
    key = (D, dtype, str(device))
    h = _HMAT.get(key)
    if h is None:
        idx = torch.arange(D)
        bits = (idx[:, None] & idx[None, :]).to(torch.int64)
        parity = torch.zeros_like(bits)
        while bool(bits.any()):
            parity ^= bits & 1
            bits = bits >> 1
        h = _HMAT[key] = (1 - 2 * parity).to(dtype).to(device)
    return h


# The fused merge's ticket counters (int32, one per (b, KV head, row tile)), per (device, stream): all zero
# between calls (the merging program resets its own), so they are allocated and zeroed once. Outgrown buffers
# stay referenced: a CUDA graph captured earlier keeps using the one it captured.
_TICKETS: dict = {}
_RETIRED_TICKETS: list = []


def _tickets(n: int, device: torch.device) -> torch.Tensor:
    """At least ``n`` zeroed ticket counters for launches on the current stream of ``device``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (index, torch._C._cuda_getCurrentRawStream(index))  # what Triton's launcher reads too (cheap)
    else:
        key = (str(device), 0)
    t = _TICKETS.get(key)
    if t is None or t.numel() < n:
        fresh = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # Zeroed inside the capture (replays re-zero it) and not cached: it lives in the graph's memory pool.
            return fresh
        if t is not None:
            _RETIRED_TICKETS.append(t)
        t = _TICKETS[key] = fresh
    return t


_CODEBOOKS_DT: dict = {}


def _codebook_dt(bits: int, dtype: torch.dtype, device: torch.device, pair: bool = False) -> torch.Tensor:
    """The centroids in ``dtype``; with ``pair`` (float16, b <= 4), the int32 table of 2^(2b) entries whose entry
    ``lo | hi << b`` holds the float16 bit patterns of centroid lo (low half) and centroid hi (high half)."""
    pair = pair and bits <= 4
    key = (bits, dtype, str(device), pair)
    cb = _CODEBOOKS_DT.get(key)
    if cb is None:
        c = lloyd_max_codebook(bits).to(dtype)
        if pair:
            h = c.view(torch.int16).to(torch.int32) & 0xFFFF
            n = 1 << bits
            idx = torch.arange(n * n)
            c = h[idx % n] | (h[idx // n] << 16)
        cb = _CODEBOOKS_DT[key] = c.to(device)
    return cb


def flash_attn_vec_tq_fwd(q, k_codes, k_norms, v_codes, v_norms, kv_len, scale, bits, sliding_window, softcap,
                          kv_start, signs, lse, v_bits, k_sink, v_sink, k_recent, v_recent, geo, cache_seqlens=None,
                          num_splits=None, config: AttnConfig | None = None) -> torch.Tensor:
    cfg = DEFAULT_ATTN_CONFIG if config is None else config
    B, Hq, Hkv, Lq, D, C = geo
    G = Hq // Hkv
    R = rotation_block(D)
    device = q.device
    out = _empty((B, Hq, Lq, D), q.dtype, device)
    k_bits = bits
    v_bits = bits if v_bits is None else v_bits
    half = q.dtype != torch.float32
    dot_dtype = torch.float16 if half else torch.float32
    GL = G * Lq
    block_m = min(max(16, _next_power_of_2(GL)), _MAX_BLOCK_M[D])
    # v2: one norm per row (R = D), halves of at least 16 coordinates, a KV head's code slab under 2^31 bytes;
    # float32 queries (exact float32 dots, on the CUDA cores) only for decode row tiles at D <= 128: larger ones
    # spill on sm_90 and keep v1.
    v2_fits = R == D and D >= 32 and C * D * max(k_bits, v_bits) // 8 < 2**31
    use_v2 = cfg.variant in ("v2", "v3") and v2_fits and (half or (block_m <= 16 and D <= 128))
    # v3 = v2's kernel with the transposed dots, for decode row tiles (G*Lq <= 16) of half-precision queries;
    # others run as v2 (float32 operands spill: 144 bytes at D128 with every option on, Triton 3.6).
    swap = use_v2 and cfg.variant == "v3" and block_m == 16 and half
    if use_v2:
        block_n, warps = (_V3_TILE if swap else _V2_TILE)[D]
        if block_m > 16:
            block_n = min(block_n, 32)  # prefill row tiles: D128 BM64 BN64 spilled, BN32 does not
        # The folded rotation holds the [D, D/2] Hadamard halves as dot operands: float32 ones spill at D128.
        # v3 rotates q in its own launch by default: its folded [D, D] operand costs it ~90 registers at D128
        # (Triton 3.6, BN32: 124 -> 218), and session 4's sweep timed v2's q-rotation launch faster than its fold.
        fold_q = (half and D <= 128 and not swap) if cfg.fold_q is None else cfg.fold_q
        stages = 1 if cfg.num_stages is None else cfg.num_stages
        lut_pair = (swap if cfg.lut_pair is None else bool(cfg.lut_pair)) and half
    else:
        block_n, warps = _BLOCK_N[D], None
        fold_q = False
        stages = _NUM_STAGES if cfg.num_stages is None else cfg.num_stages
    block_n = cfg.block_n or block_n
    n_rows = B * Hq * Lq
    rows = _rows_per_program(D)

    # 1. q rotated (and scaled) once (v2 with fold_q: inside the main kernel).
    if fold_q:
        q_arg = q
    else:
        q_arg = _empty((B, Hq, Lq, D), torch.float32, device)
        flash_attn_vec_tq_rotate_q_kernel[(_cdiv(n_rows, rows),)](
            q, signs, q_arg, n_rows, Hq, Lq, float(scale), 1.0 / math.sqrt(R), *q.stride(),
            D=D,
            R=R,
            ROWS=rows,
            num_warps=4,
        )

    # 2. split-K over the visible range [vis_lo, kv_len) of each KV head (with device lengths over [0, kv_len),
    # each program cutting its split to its own sequence's range).
    vis_lo = max(0, kv_len - C)
    if sliding_window > 0:
        # The first query (position kv_len - Lq) sees j > kv_len - Lq - sliding_window.
        vis_lo = max(vis_lo, kv_len - Lq - sliding_window + 1)
    if cache_seqlens is not None:
        vis_lo = 0
    num_positions = kv_len - vis_lo
    if num_splits is None:
        if config is None:
            num_splits = choose_num_splits(num_positions, B * Hkv, device, block_n)
        else:
            num_splits = choose_num_splits(num_positions, B * Hkv, device, block_n, cfg.programs_per_sm,
                                           cfg.min_split_positions)
    chunk = _cdiv(_cdiv(max(num_positions, 1), num_splits), block_n) * block_n
    num_splits = max(1, _cdiv(num_positions, chunk))
    # The partials [B*Hkv, num_splits, G*Lq] (acc with D more) in one allocation (host time per call).
    n_part = B * Hkv * num_splits * GL
    partials = _empty((n_part * (D + 2),), torch.float32, device)
    part_acc, part_m, part_l = partials[: n_part * D], partials[n_part * D : n_part * (D + 1)], partials[n_part * (D + 1) :]
    fused = bool(cfg.fused_merge)
    n_row_tiles = _cdiv(GL, block_m)
    tickets = _tickets(B * Hkv * n_row_tiles, device) if fused and num_splits > 1 else part_m
    # The fused merge un-rotates MERGE_ROWS rows at a time: half the separate merge's rows, so its transform
    # (MERGE_ROWS*D*16 products) adds no registers to the main loop's.
    merge = dict(FUSED_MERGE=fused, MERGE_ROWS=max(1, min(rows // 2, block_m)), STORE_LSE=lse is not None)
    lse_arg = lse if lse is not None else part_m
    S = k_sink.shape[2] if k_sink is not None else 0
    W = k_recent.shape[2] if k_recent is not None else 0
    windows = (k_sink if k_sink is not None else part_m, v_sink if v_sink is not None else part_m,
               k_recent if k_recent is not None else part_m, v_recent if v_recent is not None else part_m,
               kv_start if kv_start is not None else k_norms, cache_seqlens if cache_seqlens is not None else k_norms)
    flags = dict(
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_SINK=k_sink is not None,
        HAS_RECENT=k_recent is not None,
        HAS_KV_START=kv_start is not None,
        HAS_SEQLENS=cache_seqlens is not None,
        USE_WINDOW=sliding_window > 0,
        USE_SOFTCAP=softcap > 0,
        # float32 queries: exact float32 products. float16/bfloat16 queries: float16 operands on the tensor
        # cores (10 mantissa bits, finer than bfloat16's 7; rotated keys and values stay far below 65504 for
        # any realistic norm), accumulated and soft-maxed in float32. (The Triton interpreter cannot multiply
        # bfloat16 operands, so float16 is also the one half-precision path that CI runs.)
        PRECISION="tf32" if half else "ieee",
        DOT_DTYPE=tl.float16 if half else tl.float32,
        num_stages=stages,
    )
    grid = (B * Hkv, num_splits, n_row_tiles)
    if use_v2:
        flash_attn_vec_tq_fwd2_kernel[grid](
            q_arg, _hadamard_matrix(D, dot_dtype, device) if fold_q else part_m, signs,
            k_codes, k_norms, v_codes, v_norms, *windows,
            _codebook_dt(k_bits, dot_dtype, device, lut_pair), _codebook_dt(v_bits, dot_dtype, device, lut_pair),
            part_acc, part_m, part_l, tickets, out, lse_arg,
            Hkv, C, S, W, kv_len, vis_lo, chunk, num_splits, sliding_window, float(softcap),
            float(scale) / math.sqrt(R) if fold_q else 1.0, 1.0 / math.sqrt(R), GL, Lq, G,
            *q.stride(),
            D=D,
            K_BITS=k_bits,
            V_BITS=v_bits,
            FOLD_Q=fold_q,
            PREFETCH=bool(cfg.prefetch),
            LUT_PAIR=lut_pair,
            SWAP=swap,
            num_warps=cfg.num_warps or warps,
            **merge,
            **flags,
        )
    else:
        k_codebook, _ = _codebook(k_bits, device)
        v_codebook, _ = _codebook(v_bits, device)
        flash_attn_vec_tq_fwd_kernel[grid](
            q_arg, k_codes, k_norms, v_codes, v_norms, *windows,
            k_codebook, v_codebook, part_acc, part_m, part_l, tickets, signs, out, lse_arg,
            Hkv, C, S, W, kv_len, vis_lo, chunk, num_splits, sliding_window, float(softcap), 1.0 / math.sqrt(R), GL,
            Lq,
            D=D,
            R=R,
            K_BITS=k_bits,
            V_BITS=v_bits,
            num_warps=cfg.num_warps or (4 if D == 64 and block_m <= 16 else 8),
            **merge,
            **flags,
        )
    if fused:
        return out

    # 3. merge the splits, un-rotate, write out and lse (unless the main kernel's last split program did).
    flash_attn_vec_tq_reduce_kernel[(_cdiv(n_rows, rows),)](
        part_acc, part_m, part_l, signs, out, lse_arg, n_rows, num_splits,
        1.0 / math.sqrt(R), GL,
        D=D,
        R=R,
        ROWS=rows,
        STORE_LSE=lse is not None,
        num_warps=4,
    )
    return out


def flash_attn_vec_tq(q, k_codes, k_norms, v_codes, v_norms, kv_len: int, scale: float, bits: int = 4,
                      sliding_window: int = 0, softcap: float = 0.0, kv_start=None, signs=None, lse=None, v_bits=None,
                      k_sink=None, v_sink=None, k_recent=None, v_recent=None, cache_seqlens=None,
                      config: AttnConfig | None = None) -> torch.Tensor:
    # cache_seqlens values live on the device and are not checked here (that would synchronize): an entry
    # above kv_len reads no position at or past kv_len.
    geo = _validation.check_flash_attn_vec_tq(q, k_codes, k_norms, v_codes, v_norms, kv_len, scale, bits,
                                              sliding_window, softcap, kv_start, signs, lse, v_bits, k_sink, v_sink,
                                              k_recent, v_recent, cache_seqlens)
    signs = resolve_signs(signs, geo.head_dim, q.device)
    return flash_attn_vec_tq_fwd(q, k_codes, k_norms, v_codes, v_norms, int(kv_len), scale, bits, sliding_window,
                                 softcap, kv_start, signs, lse, v_bits, k_sink, v_sink, k_recent, v_recent, geo,
                                 cache_seqlens, config=config)
