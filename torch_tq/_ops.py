"""The ``torch.ops.tq`` op library: one schema, one fake kernel and one documented wrapper per op.

Schemas are defined here, in Python, so every platform has ``torch.ops.tq.*``. The CPU implementations
register from ``torch_tq.backends.cpu_native`` (native C++ kernels built on first use, or the pure-PyTorch
reference of ``torch_tq.backends.cpu``); the Triton kernels (``torch_tq.backends.cuda``) register for the
CUDA dispatch key when ``triton`` is installed; the native MPS extension (macOS builds only) registers
its kernels for the MPS dispatch key with ``TORCH_LIBRARY_IMPL(tq, MPS, m)``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _validation
from .backends import cpu_native as _cpu
from .backends import cuda as _cuda
from .backends import registered_backend_error

NAMESPACE = "tq"

SCHEMAS = {
    "hadamard_quantize_kv": "hadamard_quantize_kv(Tensor src, Tensor(a!) codes, Tensor(b!) norms, SymInt write_pos, "
    "bool is_sliding=False, int bits=4, Tensor? signs=None, Tensor? offset=None, bool norm_correction=False, "
    "Tensor(c!)? sink=None, Tensor(d!)? recent=None, Tensor? cache_seqlens=None) -> ()",
    "dequantize_kv": "dequantize_kv(Tensor codes, Tensor norms, int start, int length, int bits=4, "
    "bool rotated=False, Tensor? signs=None) -> Tensor",
    "flash_attn_vec_tq": "flash_attn_vec_tq(Tensor q, Tensor k_codes, Tensor k_norms, Tensor v_codes, "
    "Tensor v_norms, SymInt kv_len, float scale, int bits=4, int sliding_window=0, float softcap=0.0, "
    "Tensor? kv_start=None, Tensor? signs=None, Tensor(a!)? lse=None, int? v_bits=None, Tensor? k_sink=None, "
    "Tensor? v_sink=None, Tensor? k_recent=None, Tensor? v_recent=None, Tensor? cache_seqlens=None) -> Tensor",
    "kv_cache_copy": "kv_cache_copy(Tensor src, Tensor(a!) cache, int write_pos, bool is_sliding=False) -> ()",
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    _lib.define(_schema)

for _name in SCHEMAS:
    _lib.impl(_name, getattr(_cpu, _name), "CPU")

# The Triton kernels import lazily (at the first CUDA call), so registering them costs nothing here.
if _cuda.triton_installed():
    for _name in _cuda.OPS:
        _lib.impl(_name, _cuda.op_impl(_name), "CUDA")


@torch.library.register_fake("tq::hadamard_quantize_kv")
def _(src, codes, norms, write_pos, is_sliding=False, bits=4, signs=None, offset=None, norm_correction=False, sink=None,
      recent=None, cache_seqlens=None):
    _validation.check_hadamard_quantize_kv(src, codes, norms, write_pos, is_sliding, bits, signs, offset, sink, recent,
                                           cache_seqlens)
    return None


@torch.library.register_fake("tq::dequantize_kv")
def _(codes, norms, start, length, bits=4, rotated=False, signs=None):
    B, Hkv, _C, D = _validation.check_dequantize_kv(codes, norms, start, length, bits, signs)
    return codes.new_empty((B, Hkv, length, D), dtype=torch.float32)


@torch.library.register_fake("tq::flash_attn_vec_tq")
def _(q, k_codes, k_norms, v_codes, v_norms, kv_len, scale, bits=4, sliding_window=0, softcap=0.0, kv_start=None,
      signs=None, lse=None, v_bits=None, k_sink=None, v_sink=None, k_recent=None, v_recent=None, cache_seqlens=None):
    _validation.check_flash_attn_vec_tq(q, k_codes, k_norms, v_codes, v_norms, kv_len, scale, bits,
                                        sliding_window, softcap, kv_start, signs, lse, v_bits, k_sink, v_sink,
                                        k_recent, v_recent, cache_seqlens)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("tq::kv_cache_copy")
def _(src, cache, write_pos, is_sliding=False):
    _validation.check_kv_cache_copy(src, cache, write_pos, is_sliding)
    return None


def _dispatch(op: str, device: torch.device):
    """The op overload, or a clear RuntimeError when no backend implements it for ``device``."""
    reason = registered_backend_error(op, device)
    if reason is not None:
        raise RuntimeError(reason)
    return getattr(torch.ops.tq, op)


def hadamard_quantize_kv(
    src: torch.Tensor,
    codes: torch.Tensor,
    norms: torch.Tensor,
    write_pos: int,
    is_sliding: bool = False,
    bits: int = 4,
    signs: Optional[torch.Tensor] = None,
    offset: Optional[torch.Tensor] = None,
    norm_correction: bool = False,
    sink: Optional[torch.Tensor] = None,
    recent: Optional[torch.Tensor] = None,
    cache_seqlens: Optional[torch.Tensor] = None,
) -> None:
    r"""Rotate, normalise, quantize and bit-pack new K or V vectors into a TurboQuant cache, in place.

    Per rotation block of R = min(D, 256) coordinates: ``y = H_R (s ⊙ (x - offset)) / sqrt(R)``,
    ``n = ||y||``, ``code_i`` = nearest Lloyd–Max centroid of ``y_i * sqrt(R) / n`` (ties to the lower
    index). The stored norm is ``n``, or with ``norm_correction`` ``n * sqrt(R) / ||c[code]||`` so that
    the decoded block ``c[code] * n_stored / sqrt(R)`` has exactly the norm ``n``.

    The full-precision windows of :func:`flash_attn_vec_tq` are written by the same launch: the
    rotated vector ``y`` itself (before quantization, cast to the buffer's dtype) goes to
    ``sink[:, :, p]`` for positions ``p < S`` and to ``recent[:, :, p mod W]`` for every position
    (when ``T > W`` only the last ``W`` are kept), so both hold exactly what the codes approximate.

    Args:
        src (torch.Tensor):
            new vectors of shape `[B, T, Hkv, D]`, float32/float16/bfloat16, D in (64, 128, 256, 512).
        codes (torch.Tensor):
            uint8 `[B, Hkv, C, D*b/8]`, little-endian bitstream per row; written in place at the new slots.
        norms (torch.Tensor):
            float32 `[B, Hkv, C, D/R]`; written in place at the new slots.
        write_pos (int):
            absolute position of ``src[:, 0]``; token t goes to slot ``write_pos + t`` (global cache,
            must fit in C) or ``(write_pos + t) mod C`` (sliding cache; when T > C only the last C are kept).
        is_sliding (bool):
            ring-buffer semantics. Default: ``False``.
        bits (int):
            code width b in (2, 3, 4, 5, 6, 8). Default: ``4``.
        signs (Optional[torch.Tensor]):
            float32 `[D]` of ±1 applied before the rotation; ``None`` means the canonical
            ``hadamard_signs(D)`` (the plain Walsh-Hadamard transform takes ``torch.ones(D)``). A cache
            must be read with the signs it was written with. Default: ``None``.
        offset (Optional[torch.Tensor]):
            float32 `[B, Hkv, D]` subtracted from every new vector before the rotation (key centring:
            attention without soft-capping is unchanged by a per-head shift of the keys). Default: ``None``.
        norm_correction (bool):
            store the corrected norm (see above). Default: ``False``.
        sink (Optional[torch.Tensor]):
            `[B, Hkv, S, D]` float32/float16/bfloat16, contiguous: full-precision rotated copies of
            positions ``0 … S-1``, written in place for the new tokens among them. Default: ``None``.
        recent (Optional[torch.Tensor]):
            `[B, Hkv, W, D]` float32/float16/bfloat16, contiguous, ``W >= 1``: a ring of the newest
            ``W`` positions (slot ``p mod W``), full-precision rotated copies, written in place. Default: ``None``.
        cache_seqlens (Optional[torch.Tensor]):
            int32/int64 `[B]` on src's device: the tokens each sequence already holds, i.e. its own
            write position (``write_pos`` must then be 0). Read by the kernel, not the host, so a
            captured CUDA graph replays correctly as the lengths advance. The CPU ops check the
            values; device kernels cannot without a synchronisation, so there a global write past C
            is the caller's error (it is skipped, never written out of bounds). Default: ``None``.
    """
    _dispatch("hadamard_quantize_kv", src.device)(src, codes, norms, write_pos, is_sliding, bits, signs, offset,
                                                  norm_correction, sink, recent, cache_seqlens)


def dequantize_kv(
    codes: torch.Tensor,
    norms: torch.Tensor,
    start: int,
    length: int,
    bits: int = 4,
    rotated: bool = False,
    signs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Decode positions ``start … start+length-1`` (slot ``p mod C``) of a TurboQuant cache.

    Args:
        codes (torch.Tensor): uint8 `[B, Hkv, C, D*b/8]`.
        norms (torch.Tensor): float32 `[B, Hkv, C, D/R]`.
        start (int): first absolute position.
        length (int): number of positions, at most C.
        bits (int): code width b. Default: ``4``.
        rotated (bool): return the rotated-domain vectors ``ŷ`` instead of ``x̂``. Default: ``False``.
        signs (Optional[torch.Tensor]): the float32 `[D]` signs used at encode time; ``None`` means the
            canonical ``hadamard_signs(D)``. Default: ``None``.

    Returns:
        float32 tensor of shape `[B, Hkv, length, D]`.
    """
    return _dispatch("dequantize_kv", codes.device)(codes, norms, start, length, bits, rotated, signs)


def flash_attn_vec_tq(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_norms: torch.Tensor,
    v_codes: torch.Tensor,
    v_norms: torch.Tensor,
    kv_len: int,
    scale: float,
    bits: int = 4,
    sliding_window: int = 0,
    softcap: float = 0.0,
    kv_start: Optional[torch.Tensor] = None,
    signs: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    v_bits: Optional[int] = None,
    k_sink: Optional[torch.Tensor] = None,
    v_sink: Optional[torch.Tensor] = None,
    k_recent: Optional[torch.Tensor] = None,
    v_recent: Optional[torch.Tensor] = None,
    cache_seqlens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Decode attention over a TurboQuant-compressed KV cache, computed in the rotated domain.

    Query ``i`` sits at position ``kv_len - Lq + i`` and attends, causally, to the valid cached
    positions ``j <= pos`` (and ``j > pos - sliding_window`` when ``sliding_window > 0``, and
    ``j >= kv_start[b]`` when given). Scores ``scale * q·k̂``, then ``softcap * tanh(s / softcap)``
    when ``softcap > 0``; softmax in float32. Query head h reads KV head ``h // (Hq / Hkv)``.
    A query with no visible position returns zeros.

    Full-precision windows (optional, written by :func:`hadamard_quantize_kv`): which positions are
    visible is decided as above; a visible position ``j < S`` is read from ``k_sink``/``v_sink``, one with
    ``j >= kv_len - W`` from the ring ``k_recent``/``v_recent`` (slot ``j mod W``), every other one from
    the codes. Window entries are in the rotated domain, like the decoded codes, so one softmax
    covers sinks, codes and the recent window exactly.

    The op cannot know what was written: ``kv_len`` must be the number of tokens written to the
    cache (and to the recent ring) — a larger value attends over unwritten slots.

    Args:
        q (torch.Tensor): queries `[B, Hq, Lq, D]`, float32/float16/bfloat16.
        k_codes, v_codes (torch.Tensor): uint8 `[B, Hkv, C, D*b/8]`.
        k_norms, v_norms (torch.Tensor): float32 `[B, Hkv, C, D/R]`.
        kv_len (int): number of tokens written so far (>= Lq); a ``SymInt`` under ``torch.compile``. ``kv_len > C`` (a wrapped ring
            buffer) requires ``0 < sliding_window`` and ``sliding_window + Lq - 1 <= C``.
        scale (float): score scale, usually ``D ** -0.5``.
        bits (int): code width b. Default: ``4``.
        sliding_window (int): window size, 0 for full attention. Default: ``0``.
        softcap (float): logit soft-capping, 0 for off. Default: ``0.0``.
        kv_start (Optional[torch.Tensor]): int64 `[B]`, first valid position per sequence (left padding). Default: ``None``.
        signs (Optional[torch.Tensor]): float32 `[D]` signs used at encode time; ``None`` means the
            canonical ``hadamard_signs(D)``. Default: ``None``.
        lse (Optional[torch.Tensor]): contiguous float32 `[B, Hq, Lq]`, written in place with the
            natural log of each query's softmax denominator, ``log Σ_j exp(s_j)`` over its visible
            positions (``-inf`` when none is visible), so the output can be merged exactly with
            attention over other keys. Default: ``None``.
        v_bits (Optional[int]): code width of the values; ``None`` means ``bits``. Default: ``None``.
        k_sink, v_sink (Optional[torch.Tensor]): `[B, Hkv, S, D]` float32/float16/bfloat16, contiguous,
            ``S <= C``: positions ``0 … S-1`` in full precision, rotated. Both or neither. Default: ``None``.
        k_recent, v_recent (Optional[torch.Tensor]): `[B, Hkv, W, D]`, contiguous, ``1 <= W <= C``: the
            newest ``W`` positions, slot ``p mod W``, rotated. Both or neither. Default: ``None``.
        cache_seqlens (Optional[torch.Tensor]): int32/int64 `[B]` on q's device: each sequence's own
            ``kv_len`` (tokens written, its Lq queries included), read by the kernel so that a CUDA
            graph replays as the lengths advance; ``kv_len`` is then an upper bound of every entry
            (e.g. the capacity) that sizes the launch. Default: ``None`` (every sequence has ``kv_len``).

    Returns:
        `[B, Hq, Lq, D]` in q's dtype.
    """
    return _dispatch("flash_attn_vec_tq", q.device)(
        q, k_codes, k_norms, v_codes, v_norms, kv_len, scale, bits, sliding_window, softcap, kv_start, signs, lse,
        v_bits, k_sink, v_sink, k_recent, v_recent, cache_seqlens,
    )


def kv_cache_copy(src: torch.Tensor, cache: torch.Tensor, write_pos: int, is_sliding: bool = False) -> None:
    r"""Write new full-precision K or V vectors into a cache, casting to the cache dtype, in place.

    Args:
        src (torch.Tensor): `[B, T, Hkv, D]`, float32/float16/bfloat16.
        cache (torch.Tensor): contiguous `[B, Hkv, C, D]`, float32/float16/bfloat16; written at the new slots.
        write_pos (int): absolute position of ``src[:, 0]`` (same slot rules as :func:`hadamard_quantize_kv`).
        is_sliding (bool): ring-buffer semantics. Default: ``False``.
    """
    _dispatch("kv_cache_copy", src.device)(src, cache, write_pos, is_sliding)
