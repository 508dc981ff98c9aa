"""Triton kernels of the TurboQuant ops for the CUDA dispatch key, and their launchers.

Every launcher first runs the same ``_validation.check_<op>`` as the CPU reference
(``torch_tq.backends.cpu.turboquant``, the executable specification), resolves the signs in one
place, then launches:

* ``hadamard_quantize_kv``: one launch for all B×T×Hkv rows (signs, offset, rotation in registers,
  per-block norms, norm correction, nearest centroid with ties to the lower index, bit packing, the
  ring/global slot, and the full-precision sink/recent window writes).
* ``dequantize_kv``: one launch.
* ``flash_attn_vec_tq``: three launches: rotate (and scale) q once; the split-K main kernel over the
  grid (B·Hkv, num_splits, row tiles), where each program streams a contiguous range of positions of
  ONE KV head and scores ALL of the G = Hq/Hkv query heads × Lq queries of that group (at decode one
  row tile holds them all, so each KV byte is read once per GQA group), keeping (m, l, acc) partials;
  the reduce merges the splits with log-sum-exp, un-rotates, writes the output and the optional lse.
  The number of splits grows with the visible range and the SM count (:func:`choose_num_splits`).

The Walsh-Hadamard transform of a block of R = 16·RA coordinates runs as two small dense passes in
registers, H_R = H_RA ⊗ H_16 (Sylvester order), with the ±1 entries made from index parities: exact
float32 products, only the summation order differs from the reference's butterflies.

Every offset into a cache tensor is computed in int64 (program ids are cast first), so caches above
2^31 bytes or elements are addressed correctly.
"""

from __future__ import annotations

import math

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
        _CODEBOOKS[key] = (lloyd_max_codebook(bits, device=device), decision_boundaries(bits, device=device))
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
    LEVELS: tl.constexpr = 1 << BITS
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
    # Nearest centroid = the number of decision boundaries strictly below u (an exact tie goes lower).
    code = tl.zeros((ROWS * NB, R), dtype=tl.int32)
    if BITS <= 4:
        for k in tl.static_range(LEVELS - 1):
            code += (u > tl.load(bounds_ptr + k)).to(tl.int32)
    else:
        # Binary search: after the step of size 2^s, code holds the count of boundaries below u to 2^s.
        for k in tl.static_range(BITS):
            bound = tl.load(bounds_ptr + code + ((1 << (BITS - 1 - k)) - 1))
            code = tl.where(u > bound, code + (1 << (BITS - 1 - k)), code)
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


def hadamard_quantize_kv_fwd(src, codes, norms, write_pos, is_sliding, bits, signs, offset, norm_correction, sink,
                             recent, cache_seqlens=None) -> None:
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
    rows = _rows_per_program(D)
    grid = (triton.cdiv(n_rows, rows),)
    hadamard_quantize_kv_fwd_kernel[grid](
        src, codes, norms, signs,
        offset if offset is not None else norms,
        bounds,
        codebook,
        sink if sink is not None else norms,
        recent if recent is not None else norms,
        cache_seqlens if cache_seqlens is not None else norms,
        n_rows, t_lo, T, Hkv, C, S,
        recent.shape[2] if recent is not None else 1,
        write_pos, first_code, first_recent, math.sqrt(R), 1.0 / math.sqrt(R),
        *src.stride(),
        D=D,
        R=R,
        BITS=bits,
        ROWS=rows,
        IS_SLIDING=bool(is_sliding),
        USE_OFFSET=offset is not None,
        NORM_CORRECTION=bool(norm_correction),
        HAS_SINK=sink is not None,
        HAS_RECENT=recent is not None,
        HAS_SEQLENS=cache_seqlens is not None,
        num_warps=4,
    )


def hadamard_quantize_kv(src, codes, norms, write_pos: int, is_sliding: bool = False, bits: int = 4, signs=None,
                         offset=None, norm_correction: bool = False, sink=None, recent=None,
                         cache_seqlens=None) -> None:
    # cache_seqlens values live on the device: they are not checked (that would synchronize); a write past a
    # global cache is dropped.
    _validation.check_hadamard_quantize_kv(src, codes, norms, write_pos, is_sliding, bits, signs, offset, sink, recent,
                                           cache_seqlens)
    signs = resolve_signs(signs, src.shape[-1], src.device)
    hadamard_quantize_kv_fwd(src, codes, norms, int(write_pos), is_sliding, bits, signs, offset, norm_correction, sink,
                             recent, cache_seqlens)


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
    dequantize_kv_fwd_kernel[(triton.cdiv(n_rows, rows),)](
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
def flash_attn_vec_tq_fwd_kernel(
    q_rot_ptr, k_codes_ptr, k_norms_ptr, v_codes_ptr, v_norms_ptr, k_sink_ptr, v_sink_ptr, k_recent_ptr,
    v_recent_ptr, kv_start_ptr, seqlens_ptr, k_codebook_ptr, v_codebook_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    Hkv, C, S, W, kv_len, vis_lo, chunk, num_splits, window, softcap, inv_sqrt_r, GL, LQ,
    D: tl.constexpr, R: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SINK: tl.constexpr,
    HAS_RECENT: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_SEQLENS: tl.constexpr, USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
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


@triton.jit
def flash_attn_vec_tq_reduce_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, signs_ptr, out_ptr, lse_ptr, n_rows, num_splits, inv_sqrt_r, GL,
    D: tl.constexpr, R: tl.constexpr, ROWS: tl.constexpr, STORE_LSE: tl.constexpr,
):
    """Merge the splits of each query row with log-sum-exp, un-rotate, write out (q's dtype) and lse."""
    NB: tl.constexpr = D // R
    i_p = tl.program_id(0).to(tl.int64)
    rows = i_p * ROWS + tl.arange(0, ROWS)  # flat over (b, hq, i) = (b, hkv, g*Lq + i): the output's row order
    row_ok = rows < n_rows
    part0 = (rows // GL) * num_splits * GL + rows % GL  # split 0 of the row's partials
    d = tl.arange(0, D)
    m_max = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    for s in range(num_splits):
        m_max = tl.maximum(m_max, tl.load(part_m_ptr + part0 + s * GL, mask=row_ok, other=float("-inf")))
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_sum = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((ROWS, D), dtype=tl.float32)
    for s in range(num_splits):
        part = part0 + s * GL
        w = tl.exp(tl.load(part_m_ptr + part, mask=row_ok, other=float("-inf")) - m_safe)
        l_sum += w * tl.load(part_l_ptr + part, mask=row_ok, other=0.0)
        acc += w[:, None] * tl.load(part_acc_ptr + part[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
    # A row without any visible position (only possible through kv_start) outputs zeros and lse = -inf.
    y = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    y = _wht_rows(tl.reshape(y, (ROWS * NB, R)), ROWS * NB, R) * inv_sqrt_r
    y = tl.reshape(y, (ROWS, D)) * tl.load(signs_ptr + d)[None, :]
    tl.store(out_ptr + rows[:, None] * D + d[None, :], _cast(y, out_ptr.dtype.element_ty), mask=row_ok[:, None])
    if STORE_LSE:
        tl.store(lse_ptr + rows, tl.log(l_sum) + m_max, mask=row_ok)


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


def choose_num_splits(num_positions: int, groups: int, device: torch.device, block_n: int) -> int:
    """Splits of the visible range per KV head: enough programs to fill the GPU, each at least a few tiles long."""
    if num_positions <= 0:
        return 1
    want = triton.cdiv(_PROGRAMS_PER_SM * _sm_count(device), groups)
    most = triton.cdiv(num_positions, max(_MIN_SPLIT_POSITIONS, block_n))
    return max(1, min(want, most))


def flash_attn_vec_tq_fwd(q, k_codes, k_norms, v_codes, v_norms, kv_len, scale, bits, sliding_window, softcap,
                          kv_start, signs, lse, v_bits, k_sink, v_sink, k_recent, v_recent, geo, cache_seqlens=None,
                          num_splits=None) -> torch.Tensor:
    B, Hq, Hkv, Lq, D, C = geo
    G = Hq // Hkv
    R = rotation_block(D)
    device = q.device
    out = _empty((B, Hq, Lq, D), q.dtype, device)

    # 1. q rotated (and scaled) once.
    q_rot = _empty((B, Hq, Lq, D), torch.float32, device)
    n_rows = B * Hq * Lq
    rows = _rows_per_program(D)
    flash_attn_vec_tq_rotate_q_kernel[(triton.cdiv(n_rows, rows),)](
        q, signs, q_rot, n_rows, Hq, Lq, float(scale), 1.0 / math.sqrt(R), *q.stride(),
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
    block_n = _BLOCK_N[D]
    num_positions = kv_len - vis_lo
    if num_splits is None:
        num_splits = choose_num_splits(num_positions, B * Hkv, device, block_n)
    chunk = triton.cdiv(triton.cdiv(max(num_positions, 1), num_splits), block_n) * block_n
    num_splits = max(1, triton.cdiv(num_positions, chunk))
    GL = G * Lq
    part_acc = _empty((B * Hkv, num_splits, GL, D), torch.float32, device)
    part_m = _empty((B * Hkv, num_splits, GL), torch.float32, device)
    part_l = _empty((B * Hkv, num_splits, GL), torch.float32, device)
    k_codebook, _ = _codebook(bits, device)
    v_codebook, _ = _codebook(bits if v_bits is None else v_bits, device)
    S = k_sink.shape[2] if k_sink is not None else 0
    W = k_recent.shape[2] if k_recent is not None else 0
    block_m = min(max(16, triton.next_power_of_2(GL)), _MAX_BLOCK_M[D])
    flash_attn_vec_tq_fwd_kernel[(B * Hkv, num_splits, triton.cdiv(GL, block_m))](
        q_rot, k_codes, k_norms, v_codes, v_norms,
        k_sink if k_sink is not None else q_rot,
        v_sink if v_sink is not None else q_rot,
        k_recent if k_recent is not None else q_rot,
        v_recent if v_recent is not None else q_rot,
        kv_start if kv_start is not None else k_norms,
        cache_seqlens if cache_seqlens is not None else k_norms,
        k_codebook, v_codebook, part_acc, part_m, part_l,
        Hkv, C, S, W, kv_len, vis_lo, chunk, num_splits, sliding_window, float(softcap), 1.0 / math.sqrt(R), GL, Lq,
        D=D,
        R=R,
        K_BITS=bits,
        V_BITS=bits if v_bits is None else v_bits,
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
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_DTYPE=tl.float32 if q.dtype == torch.float32 else tl.float16,
        num_stages=_NUM_STAGES,
        num_warps=4 if D == 64 and block_m <= 16 else 8,
    )

    # 3. merge the splits, un-rotate, write out and lse.
    flash_attn_vec_tq_reduce_kernel[(triton.cdiv(n_rows, rows),)](
        part_acc, part_m, part_l, signs, out, lse if lse is not None else part_m, n_rows, num_splits,
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
                      k_sink=None, v_sink=None, k_recent=None, v_recent=None, cache_seqlens=None) -> torch.Tensor:
    # cache_seqlens values live on the device and are not checked here (that would synchronize): an entry
    # above kv_len reads no position at or past kv_len.
    geo = _validation.check_flash_attn_vec_tq(q, k_codes, k_norms, v_codes, v_norms, kv_len, scale, bits,
                                              sliding_window, softcap, kv_start, signs, lse, v_bits, k_sink, v_sink,
                                              k_recent, v_recent, cache_seqlens)
    signs = resolve_signs(signs, geo.head_dim, q.device)
    return flash_attn_vec_tq_fwd(q, k_codes, k_norms, v_codes, v_norms, int(kv_len), scale, bits, sliding_window,
                                 softcap, kv_start, signs, lse, v_bits, k_sink, v_sink, k_recent, v_recent, geo,
                                 cache_seqlens)
