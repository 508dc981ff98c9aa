"""Argument validation shared by every backend's Python path and by the fake kernels.

Each ``check_<op>`` raises ``ValueError`` naming the op, the argument, the rule and the value
received, and returns the geometry the implementations need. Nothing is written before these
checks pass. The MPS launch plans (``mps_ops/plans/*.h``) produce the same messages.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .layout import SUPPORTED_BITS, SUPPORTED_HEAD_DIMS, norm_blocks, row_bytes

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fail(op: str, message: str) -> None:
    raise ValueError(f"tq.{op}: {message}")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_rank(op: str, name: str, t: torch.Tensor, rank: int, letters: str) -> None:
    if t.dim() != rank:
        _fail(op, f"{name} must have rank {rank} {letters}, got shape {_shape(t)}")


def _check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        _fail(op, f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_bits(op: str, bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        _fail(op, f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _check_head_dim(op: str, head_dim: int) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        _fail(op, f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")


def _check_same_device(op: str, tensors: dict) -> None:
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if t is not None and t.device != first.device:
            _fail(op, f"{name} is on {t.device} but {first_name} is on {first.device}; all tensors must be on one device")


def _check_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        _fail(op, f"{name} must be contiguous (cache tensors are written in place), got strides {tuple(t.stride())}")


# The tensor whose last dim gives an op's head_dim D (the writing ops read it from src).
_HEAD_DIM_SOURCE = {"flash_attn_vec_tq": "q"}


def _row_bytes_message(op: str, prefix: str, got: int, head_dim: int, bits: int) -> str:
    """The codes-row-length error, naming the (head_dim, bits) the codes were made for when one of the two differs."""
    source = _HEAD_DIM_SOURCE.get(op, "src")
    message = (f"{prefix}codes last dim {got} does not fit {source}'s head_dim={head_dim} at bits={bits} "
               f"(needs D*bits/8 = {row_bytes(head_dim, bits)})")
    readings = []
    if got * 8 % bits == 0 and got * 8 // bits in SUPPORTED_HEAD_DIMS:
        readings.append(f"head_dim={got * 8 // bits} at bits={bits}")
    if got * 8 % head_dim == 0 and got * 8 // head_dim in SUPPORTED_BITS:
        readings.append(f"head_dim={head_dim} at bits={got * 8 // head_dim}")
    if readings:
        message += "; it is a cache of " + " or ".join(readings)
    return message


def _check_packed_cache(op: str, prefix: str, codes: torch.Tensor, norms: torch.Tensor, head_dim: int, bits: int) -> tuple[int, int, int]:
    """Checks one (codes, norms) pair against D and bits; returns (B, Hkv, C)."""
    _check_rank(op, f"{prefix}codes", codes, 4, "[B, Hkv, C, D*bits/8]")
    _check_rank(op, f"{prefix}norms", norms, 4, "[B, Hkv, C, D/R]")
    if codes.dtype != torch.uint8:
        _fail(op, f"{prefix}codes must be uint8, got {codes.dtype}")
    if norms.dtype != torch.float32:
        _fail(op, f"{prefix}norms must be float32, got {norms.dtype}")
    if codes.shape[-1] != row_bytes(head_dim, bits):
        _fail(op, _row_bytes_message(op, prefix, codes.shape[-1], head_dim, bits))
    expected_blocks = norm_blocks(head_dim)
    if norms.shape[-1] != expected_blocks:
        _fail(op, f"{prefix}norms last dim must be D/R = {expected_blocks} for head_dim={head_dim}, got {norms.shape[-1]}")
    if tuple(norms.shape[:3]) != tuple(codes.shape[:3]):
        _fail(op, f"{prefix}norms shape {_shape(norms)} does not match {prefix}codes shape {_shape(codes)} in [B, Hkv, C]")
    if codes.shape[2] < 1:
        _fail(op, f"{prefix}codes capacity C must be >= 1, got {codes.shape[2]}")
    _check_contiguous(op, f"{prefix}codes", codes)
    _check_contiguous(op, f"{prefix}norms", norms)
    return codes.shape[0], codes.shape[1], codes.shape[2]


def _check_signs(op: str, signs: Optional[torch.Tensor], head_dim: int) -> None:
    if signs is None:
        return
    if signs.dim() != 1 or signs.shape[0] != head_dim:
        _fail(op, f"signs must have shape [D] = [{head_dim}], got {_shape(signs)}")
    if signs.dtype != torch.float32:
        _fail(op, f"signs must be float32, got {signs.dtype}")
    _check_contiguous(op, "signs", signs)


def _fail_if_src_transposed(op: str, src: torch.Tensor, cache_name: str, cache_batch: int, cache_heads: int) -> None:
    """src given as [B, Hkv, T, D] (the cache's own layout, and transformers' K/V) reads as the wrong heads: say so."""
    if src.shape[0] == cache_batch and src.shape[1] == cache_heads:
        _fail(op, f"src must be [B, T, Hkv, D] with [B, Hkv] = [{cache_batch}, {cache_heads}] like {cache_name}, "
                  f"got shape {_shape(src)}; did you pass [B, Hkv, T, D]?")


def _check_write(op: str, write_pos: int, num_tokens: int, capacity: int, is_sliding: bool) -> None:
    if write_pos < 0:
        _fail(op, f"write_pos must be >= 0, got {write_pos}")
    if not is_sliding and write_pos + num_tokens > capacity:
        _fail(
            op,
            f"write of T={num_tokens} tokens at write_pos={write_pos} overflows the global cache capacity C={capacity} "
            f"(needs write_pos + T <= C; use is_sliding=True for a ring buffer)",
        )


def _check_cache_seqlens(op: str, cache_seqlens: Optional[torch.Tensor], batch: int) -> None:
    """Structure only: the values live on the op's device (CPU ops check them with
    :func:`check_cache_seqlens_values`)."""
    if cache_seqlens is None:
        return
    if cache_seqlens.dim() != 1 or cache_seqlens.shape[0] != batch:
        _fail(op, f"cache_seqlens must have shape [B] = [{batch}], got {_shape(cache_seqlens)}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        _fail(op, f"cache_seqlens must be int32 or int64, got {cache_seqlens.dtype}")


def check_cache_seqlens_values(op: str, lengths: list, kv_len: Optional[int] = None, q_len: int = 0) -> None:
    """The per-sequence lengths read on the host: >= 0 (>= Lq for the attention, whose queries are
    the last Lq positions), and <= ``kv_len`` (the attention's bound)."""
    for b, n in enumerate(lengths):
        if n < q_len:
            _fail(op, f"cache_seqlens[{b}] must be >= {q_len}{' (Lq)' if q_len else ''}, got {n}")
        if kv_len is not None and n > kv_len:
            _fail(op, f"cache_seqlens[{b}]={n} exceeds kv_len={kv_len}, the upper bound of every sequence's length")


def _check_float32_buffer(op: str, name: str, t: torch.Tensor, letters: str, shape: tuple) -> None:
    """A contiguous float32 side tensor of an exact shape (an offset, an lse output)."""
    if tuple(t.shape) != shape:
        _fail(op, f"{name} must have shape {letters} = [{', '.join(map(str, shape))}], got {_shape(t)}")
    if t.dtype != torch.float32:
        _fail(op, f"{name} must be float32, got {t.dtype}")
    _check_contiguous(op, name, t)


def _check_full_precision(op: str, name: str, t: torch.Tensor, batch: int, kv_heads: int, head_dim: int,
                          capacity: int, min_len: int) -> int:
    """Checks one full-precision window buffer ``[B, Hkv, N, D]``; returns N."""
    _check_rank(op, name, t, 4, "[B, Hkv, N, D]")
    _check_float(op, name, t)
    if (t.shape[0], t.shape[1], t.shape[3]) != (batch, kv_heads, head_dim):
        _fail(op, f"{name} must have [B, Hkv, *, D] = [{batch}, {kv_heads}, *, {head_dim}], got {_shape(t)}")
    if t.shape[2] < min_len or t.shape[2] > capacity:
        _fail(op, f"{name} must hold between {min_len} and C={capacity} positions, got {t.shape[2]}")
    _check_contiguous(op, name, t)
    return t.shape[2]


def _check_window_pair(op: str, prefix: str, k: Optional[torch.Tensor], v: Optional[torch.Tensor], batch: int,
                       kv_heads: int, head_dim: int, capacity: int, min_len: int) -> None:
    if (k is None) != (v is None):
        _fail(op, f"k_{prefix} and v_{prefix} must be given together, got only {'k' if v is None else 'v'}_{prefix}")
    if k is None:
        return
    _check_full_precision(op, f"k_{prefix}", k, batch, kv_heads, head_dim, capacity, min_len)
    _check_full_precision(op, f"v_{prefix}", v, batch, kv_heads, head_dim, capacity, min_len)
    if tuple(v.shape) != tuple(k.shape):
        _fail(op, f"v_{prefix} shape {_shape(v)} must equal k_{prefix} shape {_shape(k)}")


class WriteGeometry(NamedTuple):
    batch: int
    tokens: int
    kv_heads: int
    head_dim: int
    capacity: int


def check_hadamard_quantize_kv(src, codes, norms, write_pos: int, is_sliding: bool, bits: int, signs, offset=None,
                               sink=None, recent=None, cache_seqlens=None) -> WriteGeometry:
    op = "hadamard_quantize_kv"
    _check_bits(op, bits)
    _check_rank(op, "src", src, 4, "[B, T, Hkv, D]")
    _check_float(op, "src", src)
    B, T, Hkv, D = src.shape
    _check_head_dim(op, D)
    _check_same_device(op, {"src": src, "codes": codes, "norms": norms, "signs": signs, "offset": offset,
                            "sink": sink, "recent": recent, "cache_seqlens": cache_seqlens})
    cB, cH, C = _check_packed_cache(op, "", codes, norms, D, bits)
    if (cB, cH) != (B, Hkv):
        _fail_if_src_transposed(op, src, "codes", cB, cH)
        _fail(op, f"codes must have [B, Hkv] = [{B}, {Hkv}] to match src, got [{cB}, {cH}]")
    _check_signs(op, signs, D)
    if offset is not None:
        _check_float32_buffer(op, "offset", offset, "[B, Hkv, D]", (B, Hkv, D))
    if sink is not None:
        _check_full_precision(op, "sink", sink, B, Hkv, D, C, 0)
    if recent is not None:
        _check_full_precision(op, "recent", recent, B, Hkv, D, C, 1)
    _check_cache_seqlens(op, cache_seqlens, B)
    if cache_seqlens is not None and write_pos != 0:
        _fail(op, f"write_pos must be 0 when cache_seqlens gives each sequence's write position, got {write_pos}")
    _check_write(op, write_pos, T, C, is_sliding)
    return WriteGeometry(B, T, Hkv, D, C)


class ReadGeometry(NamedTuple):
    batch: int
    kv_heads: int
    capacity: int
    head_dim: int


def check_dequantize_kv(codes, norms, start: int, length: int, bits: int, signs) -> ReadGeometry:
    op = "dequantize_kv"
    _check_bits(op, bits)
    _check_rank(op, "codes", codes, 4, "[B, Hkv, C, D*bits/8]")
    D = codes.shape[-1] * 8 // bits
    if codes.shape[-1] * 8 % bits != 0 or D not in SUPPORTED_HEAD_DIMS:
        _fail(op, f"codes last dim {codes.shape[-1]} with bits={bits} gives no supported head_dim {SUPPORTED_HEAD_DIMS}")
    _check_same_device(op, {"codes": codes, "norms": norms, "signs": signs})
    B, Hkv, C = _check_packed_cache(op, "", codes, norms, D, bits)
    _check_signs(op, signs, D)
    if start < 0:
        _fail(op, f"start must be >= 0, got {start}")
    if length < 0 or length > C:
        _fail(op, f"length must be in [0, C={C}] (positions alias beyond the capacity), got {length}")
    return ReadGeometry(B, Hkv, C, D)


class AttentionGeometry(NamedTuple):
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    head_dim: int
    capacity: int


def check_flash_attn_vec_tq(q, k_codes, k_norms, v_codes, v_norms, kv_len: int, scale: float, bits: int,
                            sliding_window: int, softcap: float, kv_start, signs, lse=None, v_bits=None, k_sink=None,
                            v_sink=None, k_recent=None, v_recent=None, cache_seqlens=None) -> AttentionGeometry:
    op = "flash_attn_vec_tq"
    _check_bits(op, bits)
    if v_bits is not None and v_bits not in SUPPORTED_BITS:
        _fail(op, f"v_bits must be one of {SUPPORTED_BITS} (or None = bits), got {v_bits}")
    _check_rank(op, "q", q, 4, "[B, Hq, Lq, D]")
    _check_float(op, "q", q)
    B, Hq, Lq, D = q.shape
    _check_head_dim(op, D)
    _check_same_device(op, {"q": q, "k_codes": k_codes, "k_norms": k_norms, "v_codes": v_codes,
                            "v_norms": v_norms, "kv_start": kv_start, "signs": signs, "lse": lse, "k_sink": k_sink,
                            "v_sink": v_sink, "k_recent": k_recent, "v_recent": v_recent,
                            "cache_seqlens": cache_seqlens})
    kB, Hkv, C = _check_packed_cache(op, "k_", k_codes, k_norms, D, bits)
    _check_packed_cache(op, "v_", v_codes, v_norms, D, bits if v_bits is None else v_bits)
    if tuple(v_codes.shape[:3]) != tuple(k_codes.shape[:3]):
        _fail(op, f"v_codes shape {_shape(v_codes)} must match k_codes shape {_shape(k_codes)} in [B, Hkv, C]")
    if kB != B:
        _fail(op, f"k_codes batch must be B={B} to match q, got {kB}")
    if Hq % Hkv != 0:
        _fail(op, f"query heads Hq={Hq} must be a multiple of KV heads Hkv={Hkv}")
    if Lq < 1:
        _fail(op, f"q must hold Lq >= 1 queries, got {Lq}")
    if kv_len < Lq:
        _fail(op, f"kv_len={kv_len} must be >= Lq={Lq} (the queries are the last Lq positions)")
    if sliding_window < 0:
        _fail(op, f"sliding_window must be >= 0 (0 = full attention), got {sliding_window}")
    if sliding_window > C:
        _fail(op, f"sliding_window={sliding_window} exceeds the cache capacity C={C}")
    if kv_len > C:
        if sliding_window == 0:
            _fail(op, f"kv_len={kv_len} exceeds the cache capacity C={C}: the cache has wrapped, which is only valid "
                      f"with 0 < sliding_window <= C (full attention needs tokens that are gone)")
        if sliding_window + Lq - 1 > C:
            _fail(op, f"kv_len={kv_len} exceeds the cache capacity C={C} and the first of Lq={Lq} queries needs "
                      f"sliding_window={sliding_window} positions: sliding_window + Lq - 1 must be <= C")
    if not (math.isfinite(scale) and scale > 0):
        _fail(op, f"scale must be a finite number > 0, got {float(scale)}")
    if softcap < 0:
        _fail(op, f"softcap must be >= 0 (0 = off), got {softcap}")
    if kv_start is not None:
        if kv_start.dim() != 1 or kv_start.shape[0] != B:
            _fail(op, f"kv_start must have shape [B] = [{B}], got {_shape(kv_start)}")
        if kv_start.dtype != torch.int64:
            _fail(op, f"kv_start must be int64, got {kv_start.dtype}")
    _check_signs(op, signs, D)
    if lse is not None:
        _check_float32_buffer(op, "lse", lse, "[B, Hq, Lq]", (B, Hq, Lq))
    _check_window_pair(op, "sink", k_sink, v_sink, B, Hkv, D, C, 0)
    _check_window_pair(op, "recent", k_recent, v_recent, B, Hkv, D, C, 1)
    _check_cache_seqlens(op, cache_seqlens, B)
    return AttentionGeometry(B, Hq, Hkv, Lq, D, C)


def check_kv_cache_copy(src, cache, write_pos: int, is_sliding: bool) -> WriteGeometry:
    op = "kv_cache_copy"
    _check_rank(op, "src", src, 4, "[B, T, Hkv, D]")
    _check_rank(op, "cache", cache, 4, "[B, Hkv, C, D]")
    _check_float(op, "src", src)
    _check_float(op, "cache", cache)
    _check_same_device(op, {"src": src, "cache": cache})
    B, T, Hkv, D = src.shape
    cB, cH, C, cD = cache.shape
    if (cB, cH, cD) != (B, Hkv, D):
        if cD == D:
            _fail_if_src_transposed(op, src, "cache", cB, cH)
        _fail(op, f"cache must have [B, Hkv, *, D] = [{B}, {Hkv}, *, {D}] to match src, got {_shape(cache)}")
    if C < 1:
        _fail(op, f"cache capacity C must be >= 1, got {C}")
    _check_contiguous(op, "cache", cache)
    _check_write(op, write_pos, T, C, is_sliding)
    return WriteGeometry(B, T, Hkv, D, C)
