"""CPU reference of the TurboQuant ops: the executable specification of DESIGN §5.

Plain float32 PyTorch, vectorized over batch, tokens and heads. Every other backend is tested
against these functions.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ... import _validation
from ...codebooks import decision_boundaries, lloyd_max_codebook
from ...layout import pack_codes, resolve_signs, ring_write_slots, rotation_block, unpack_codes, valid_positions


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """Unnormalised Sylvester Walsh–Hadamard transform of each ``block``-sized chunk of the last dim.

    ``y_i = sum_j (-1)^popcount(i & j) x_j`` within a block; ``fwht(fwht(x)) == block * x``.
    """
    shape = x.shape
    y = x.reshape(-1, shape[-1] // block, block)
    h = 1
    while h < block:
        y = y.reshape(*y.shape[:2], block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).reshape(*y.shape[:2], block)
        h *= 2
    return y.reshape(shape)


def rotate(x: torch.Tensor, signs: Optional[torch.Tensor]) -> torch.Tensor:
    """``y = H_R (s ⊙ x) / sqrt(R)`` per rotation block (orthonormal), float32."""
    block = rotation_block(x.shape[-1])
    x = x.to(torch.float32)
    if signs is not None:
        x = x * signs
    return fwht(x, block) * (1.0 / math.sqrt(block))


def unrotate(y: torch.Tensor, signs: Optional[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`rotate`: ``x = s ⊙ H_R y / sqrt(R)``."""
    block = rotation_block(y.shape[-1])
    x = fwht(y.to(torch.float32), block) * (1.0 / math.sqrt(block))
    if signs is not None:
        x = x * signs
    return x


def nearest_code(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Index of the nearest Lloyd–Max centroid of each float32 ``u``; an exact tie goes to the lower index."""
    # bucketize(right=False) counts the float32 midpoints strictly below u.
    return torch.bucketize(u, decision_boundaries(bits, device=u.device), right=False)


def encode_rotated(y: torch.Tensor, bits: int, norm_correction: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode rotated vectors ``y [..., D]`` → (packed codes ``[..., D*b/8]`` uint8, norms ``[..., D/R]`` float32).

    With ``norm_correction`` the stored norm is ``n * sqrt(R) / ||c[code]||``, so the decoded block
    ``c[code] * n_stored / sqrt(R)`` has exactly the norm ``n`` of ``y``'s block.
    """
    D = y.shape[-1]
    block = rotation_block(D)
    blocks = y.reshape(*y.shape[:-1], D // block, block)
    norms = torch.linalg.vector_norm(blocks, dim=-1)  # [..., D/R]
    # A zero block stores norm 0 and u = 0 (decodes to 0 whatever its codes).
    inv = torch.where(norms > 0, math.sqrt(block) / norms, torch.zeros_like(norms))
    u = (blocks * inv.unsqueeze(-1)).reshape(y.shape)
    indices = nearest_code(u, bits)
    if norm_correction:
        values = lloyd_max_codebook(bits, device=y.device)[indices].reshape(blocks.shape)
        decoded_unit = torch.linalg.vector_norm(values, dim=-1)  # ||c[code]|| per block, never 0
        norms = norms * math.sqrt(block) / decoded_unit
    return pack_codes(indices, bits), norms


def quantize(x: torch.Tensor, bits: int, signs: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode vectors ``[..., D]`` → (packed codes ``[..., D*b/8]`` uint8, norms ``[..., D/R]`` float32)."""
    return encode_rotated(rotate(x, signs), bits)


def dequantize_rotated(codes: torch.Tensor, norms: torch.Tensor, bits: int) -> torch.Tensor:
    """``ŷ_i = c[code_i] * n / sqrt(R)``: packed ``[..., D*b/8]`` + norms ``[..., D/R]`` → float32 ``[..., D]``."""
    indices = unpack_codes(codes, bits)
    D = indices.shape[-1]
    block = rotation_block(D)
    values = lloyd_max_codebook(bits, device=codes.device)[indices]
    scale = (norms * (1.0 / math.sqrt(block))).repeat_interleave(block, dim=-1)
    return values * scale


def _batch_row(t: Optional[torch.Tensor], b: int) -> Optional[torch.Tensor]:
    return None if t is None else t[b : b + 1]


def quantize_per_sequence(quantize, src, codes, norms, is_sliding, bits, signs, offset, norm_correction, sink, recent,
                          cache_seqlens) -> None:
    """``hadamard_quantize_kv`` with ``cache_seqlens`` on a host backend: each sequence is an ordinary
    ``quantize`` call (that backend's op) at its own position, on views of batch row b written in place."""
    lengths = cache_seqlens.tolist()
    _validation.check_cache_seqlens_values("hadamard_quantize_kv", lengths)
    for b, position in enumerate(lengths):
        row = lambda t: _batch_row(t, b)  # noqa: E731
        quantize(row(src), row(codes), row(norms), position, is_sliding, bits, signs, row(offset), norm_correction,
                 row(sink), row(recent))


def attend_per_sequence(attend, q, k_codes, k_norms, v_codes, v_norms, kv_len, scale, bits, sliding_window, softcap,
                        kv_start, signs, lse, v_bits, k_sink, v_sink, k_recent, v_recent, cache_seqlens) -> torch.Tensor:
    """``flash_attn_vec_tq`` with ``cache_seqlens`` on a host backend: each sequence is an ordinary
    ``attend`` call (that backend's op) with its own kv_len."""
    lengths = cache_seqlens.tolist()
    _validation.check_cache_seqlens_values("flash_attn_vec_tq", lengths, kv_len, q.shape[2])
    rows = []
    for b, n in enumerate(lengths):
        row = lambda t: _batch_row(t, b)  # noqa: E731
        rows.append(attend(row(q), row(k_codes), row(k_norms), row(v_codes), row(v_norms), n, scale, bits,
                           sliding_window, softcap, row(kv_start), signs, row(lse), v_bits, row(k_sink), row(v_sink),
                           row(k_recent), row(v_recent)))
    return torch.cat(rows)


def hadamard_quantize_kv(src, codes, norms, write_pos: int, is_sliding: bool = False, bits: int = 4, signs=None,
                         offset=None, norm_correction: bool = False, sink=None, recent=None,
                         cache_seqlens=None) -> None:
    _validation.check_hadamard_quantize_kv(src, codes, norms, write_pos, is_sliding, bits, signs, offset, sink, recent,
                                           cache_seqlens)
    if cache_seqlens is not None:
        return quantize_per_sequence(hadamard_quantize_kv, src, codes, norms, is_sliding, bits, signs, offset,
                                     norm_correction, sink, recent, cache_seqlens)
    T = src.shape[1]
    signs = resolve_signs(signs, src.shape[-1], src.device)
    x = src.to(torch.float32)
    if offset is not None:
        x = x - offset.unsqueeze(1)
    y = rotate(x.transpose(1, 2), signs)  # [B, Hkv, T, D], rotated domain
    first, slots = ring_write_slots(T, write_pos, codes.shape[2], is_sliding)
    new_codes, new_norms = encode_rotated(y[:, :, first:], bits, norm_correction)
    codes.index_copy_(2, slots.to(codes.device), new_codes)
    norms.index_copy_(2, slots.to(codes.device), new_norms)
    if sink is not None:
        # Positions write_pos … write_pos+n-1 that are below S.
        n = max(0, min(T, sink.shape[2] - write_pos))
        sink[:, :, write_pos : write_pos + n] = y[:, :, :n].to(sink.dtype)
    if recent is not None:
        first, slots = ring_write_slots(T, write_pos, recent.shape[2], True)
        recent.index_copy_(2, slots.to(recent.device), y[:, :, first:].to(recent.dtype))


def dequantize_kv(codes, norms, start: int, length: int, bits: int = 4, rotated: bool = False, signs=None) -> torch.Tensor:
    _validation.check_dequantize_kv(codes, norms, start, length, bits, signs)
    signs = resolve_signs(signs, codes.shape[-1] * 8 // bits, codes.device)
    slots = torch.arange(start, start + length, device=codes.device) % codes.shape[2]
    y = dequantize_rotated(codes.index_select(2, slots), norms.index_select(2, slots), bits)
    return y if rotated else unrotate(y, signs)


def flash_attn_vec_tq(q, k_codes, k_norms, v_codes, v_norms, kv_len: int, scale: float, bits: int = 4,
                      sliding_window: int = 0, softcap: float = 0.0, kv_start=None, signs=None, lse=None, v_bits=None,
                      k_sink=None, v_sink=None, k_recent=None, v_recent=None, cache_seqlens=None) -> torch.Tensor:
    geo = _validation.check_flash_attn_vec_tq(q, k_codes, k_norms, v_codes, v_norms, kv_len, scale, bits,
                                              sliding_window, softcap, kv_start, signs, lse, v_bits, k_sink, v_sink,
                                              k_recent, v_recent, cache_seqlens)
    if cache_seqlens is not None:
        return attend_per_sequence(flash_attn_vec_tq, q, k_codes, k_norms, v_codes, v_norms, kv_len, scale, bits,
                                   sliding_window, softcap, kv_start, signs, lse, v_bits, k_sink, v_sink, k_recent,
                                   v_recent, cache_seqlens)
    B, Hq, Hkv, Lq, D, C = geo
    signs = resolve_signs(signs, D, q.device)
    group = Hq // Hkv
    lo, hi = valid_positions(kv_len, C)
    positions = torch.arange(lo, hi, device=q.device)  # [N]
    slots = positions % C
    k = dequantize_rotated(k_codes.index_select(2, slots), k_norms.index_select(2, slots), bits)  # [B, Hkv, N, D]
    v = dequantize_rotated(v_codes.index_select(2, slots), v_norms.index_select(2, slots), bits if v_bits is None else v_bits)
    # Positions held in full precision are read from there (rotated, like the decoded codes); sinks win.
    if k_recent is not None:
        W = k_recent.shape[2]
        held = positions >= kv_len - W
        k[:, :, held] = k_recent[:, :, positions[held] % W].float()
        v[:, :, held] = v_recent[:, :, positions[held] % W].float()
    if k_sink is not None:
        held = positions < k_sink.shape[2]
        k[:, :, held] = k_sink[:, :, positions[held]].float()
        v[:, :, held] = v_sink[:, :, positions[held]].float()

    # Attention is computed in the rotated domain: q·k = (Rq)·(Rk) for the orthonormal rotation R.
    q_rot = rotate(q, signs).reshape(B, Hkv, group, Lq, D)
    scores = scale * torch.einsum("bhgld,bhnd->bhgln", q_rot, k)  # [B, Hkv, G, Lq, N]
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)

    query_pos = torch.arange(kv_len - Lq, kv_len, device=q.device)  # [Lq]
    allowed = positions[None, :] <= query_pos[:, None]  # [Lq, N]
    if sliding_window > 0:
        allowed = allowed & (positions[None, :] > query_pos[:, None] - sliding_window)
    allowed = allowed.expand(B, Lq, positions.numel())
    if kv_start is not None:
        allowed = allowed & (positions[None, None, :] >= kv_start[:, None, None])
    allowed = allowed[:, None, None]  # [B, 1, 1, Lq, N]

    scores = scores.masked_fill(~allowed, -math.inf)
    # A query with no visible key (only possible through kv_start) outputs zeros, not NaN.
    row_max = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    if lse is not None:
        # log(denom) + max; a row without visible keys has denom 0 -> -inf.
        lse.copy_((denom.log() + row_max).reshape(B, Hq, Lq))
    out_rot = torch.einsum("bhgln,bhnd->bhgld", probs, v).reshape(B, Hq, Lq, D)
    return unrotate(out_rot, signs).to(q.dtype)
