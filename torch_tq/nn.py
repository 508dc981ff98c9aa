"""``nn.Module`` wrappers for TurboQuant attention: a compressed per-layer KV cache and the attention over it.

Both modules reach kernels only through the documented ``torch_tq`` op wrappers (``torch.ops.tq``), so they
run on every backend that implements the ops. They need no transformers; the Hugging Face integration
(:mod:`torch_tq.integrations.transformers`) is built on :class:`TurboQuantKVCache`.

Letters follow DESIGN §5: B batch, T new tokens, Hq query heads, Hkv KV heads, D head_dim, C capacity
(slots), b bits, R = min(D, 256) rotation block.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _ops
from .backends.cpu.turboquant import unrotate
from .layout import (
    SUPPORTED_BITS,
    SUPPORTED_HEAD_DIMS,
    allocate_quantized_kv,
    hadamard_signs,
    quantized_nbytes,
    valid_positions,
)

__all__ = ["TurboQuantAttention", "TurboQuantKVCache", "merge_attention", "reference_attention", "resolve_window_dtype"]

WINDOW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WINDOW_DTYPE_RULES = ("model", "auto")


def check_window_dtype(owner: str, window_dtype) -> None:
    """Raises ``ValueError`` unless ``window_dtype`` is one of :data:`WINDOW_DTYPES` or :data:`WINDOW_DTYPE_RULES`."""
    if window_dtype not in WINDOW_DTYPES + WINDOW_DTYPE_RULES:
        raise ValueError(f"{owner}: window_dtype must be one of {[str(d) for d in WINDOW_DTYPES]} or "
                         f"{list(WINDOW_DTYPE_RULES)}, got {window_dtype!r}")


def resolve_window_dtype(window_dtype: torch.dtype | str, kv_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of the full-precision windows for K/V of ``kv_dtype`` (see :class:`TurboQuantKVCache`)."""
    if window_dtype == "model":
        return kv_dtype
    if window_dtype == "auto":
        return kv_dtype if kv_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    return window_dtype


class TurboQuantKVCache(nn.Module):
    r"""The TurboQuant-compressed K and V of one attention layer, global or sliding-window (ring buffer).

    Token ``p`` (absolute position) lives in slot ``p`` of a global cache and in slot ``p mod C`` of a
    sliding cache (DESIGN §5). Every write rotates with the sign vector ``signs`` (default
    :func:`torch_tq.hadamard_signs`), which is part of the storage format; reads pass the same signs.

    A decode step is one ``tq.hadamard_quantize_kv`` launch per tensor (key centring, norm correction
    and the full-precision window writes happen inside it) and one ``tq.flash_attn_vec_tq`` launch that
    reads sinks + codes + recent window (DESIGN §8). Every buffer is allocated once, for the capacity;
    :meth:`append` and :meth:`attend` allocate, concatenate and synchronise nothing (a global cache
    grows only through :meth:`grow`, which the transformers integration calls when it is full).

    Args:
        num_kv_heads (int): Hkv.
        head_dim (int): D, one of (64, 128, 256, 512).
        capacity (int): C, the number of slots. A sliding cache needs ``C >= sliding_window`` (and
            ``C >= sliding_window + Lq - 1`` to attend ``Lq`` queries at once after it has wrapped).
        bits (int): code width of the keys (and of the values unless ``v_bits`` is given), in
            (2, 3, 4, 5, 6, 8). Default: ``4``.
        batch_size (int): B. Default: ``1``.
        sliding_window (int): 0 for a global cache; ``> 0`` makes the cache a ring buffer whose
            :meth:`attend` defaults to this window. Default: ``0``.
        signs (Optional[torch.Tensor]): float32 ``[D]`` of ±1 applied before the rotation.
            Default: ``None``, meaning :func:`torch_tq.hadamard_signs` ``(D)``.
        device: where the buffers live. Default: ``None`` (the default device).
        center_keys (bool): store keys minus their mean over the first append (exact for attention
            without soft-capping, more accurate after quantization). Default: ``True``.
        norm_correction (bool): store each block's norm so that its decoded vector has the true norm.
            Default: ``True``.
        sink_tokens (int): also keep the K/V of the first ``sink_tokens`` positions in full precision
            and attend to them from there. The first tokens ("attention sinks") take a large share of
            every query's attention, so their quantization error weighs on every output. These are
            absolute positions: in a left-padded batch a padded row's sinks are padding (masked by
            ``kv_start``), so its own first tokens stay quantized. Default: ``0``.
        recent_tokens (int): also keep the newest ``recent_tokens`` positions in full precision, in a
            ring (a query's own neighbourhood matters most). Must be ``<= capacity``. Default: ``0``.
        v_bits (Optional[int]): code width of the values. Default: ``None`` (= ``bits``).
        window_dtype (torch.dtype | str): storage dtype of the full-precision windows: a float dtype
            (``torch.float32``, ``torch.float16``, ``torch.bfloat16``), ``"model"`` (the dtype of the first
            appended K/V) or ``"auto"`` (the K/V dtype if it is 16-bit, else ``torch.bfloat16``: a
            float32 model's windows at half the bytes, with a relative rounding error of 2^-9, far below
            the codes'). The windows are copies in the rotated domain, read by the ops in whatever float
            dtype they have. Default: ``"model"``.

    Every token is quantized when it is appended; the windows hold full-precision copies in the
    rotated domain (what the op reads), so tokens never move between stores.

    Shapes:
        - k_codes, v_codes (buffers): uint8 ``[B, Hkv, C, D*b/8]`` (``b`` = bits, ``v_bits``), a
          little-endian bitstream per row.
        - k_norms, v_norms (buffers): float32 ``[B, Hkv, C, D/R]``.
        - signs (buffer): float32 ``[D]``.
        - k_mean (buffer): float32 ``[B, Hkv, D]``, the key offset (zeros without ``center_keys``).
        - sink_k, sink_v (buffers): ``[B, Hkv, sink_tokens, D]``, positions ``0 … sink_tokens-1``, rotated.
        - recent_k, recent_v (buffers): ``[B, Hkv, recent_tokens, D]``, position ``p`` in slot
          ``p mod recent_tokens``, rotated.
        - append: k, v ``[B, T, Hkv, D]`` (float32/float16/bfloat16).
        - attend: q ``[B, Hq, Lq, D]`` -> ``[B, Hq, Lq, D]`` in q's dtype.
        - dequantize: -> k, v float32 ``[B, Hkv, N, D]`` for the N positions still held.

    Examples::

        >>> cache = TurboQuantKVCache(num_kv_heads=3, head_dim=64, capacity=128, bits=4)
        >>> cache.append(torch.randn(1, 10, 3, 64), torch.randn(1, 10, 3, 64))
        >>> out = cache.attend(torch.randn(1, 9, 1, 64))  # the query of position 9, [1, 9, 1, 64]
    """

    k_codes: torch.Tensor
    k_norms: torch.Tensor
    v_codes: torch.Tensor
    v_norms: torch.Tensor
    signs: torch.Tensor

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        bits: int = 4,
        batch_size: int = 1,
        sliding_window: int = 0,
        signs: Optional[torch.Tensor] = None,
        device: torch.device | str | None = None,
        center_keys: bool = True,
        norm_correction: bool = True,
        sink_tokens: int = 0,
        recent_tokens: int = 0,
        v_bits: Optional[int] = None,
        window_dtype: torch.dtype | str = "model",
    ):
        super().__init__()
        v_bits = bits if v_bits is None else v_bits
        check_window_dtype("TurboQuantKVCache", window_dtype)
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"TurboQuantKVCache: head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
        for name, value in (("bits", bits), ("v_bits", v_bits)):
            if value not in SUPPORTED_BITS:
                raise ValueError(f"TurboQuantKVCache: {name} must be one of {SUPPORTED_BITS}, got {value}")
        if sliding_window < 0:
            raise ValueError(f"TurboQuantKVCache: sliding_window must be >= 0 (0 = global cache), got {sliding_window}")
        if sliding_window > capacity:
            raise ValueError(
                f"TurboQuantKVCache: a sliding cache needs capacity >= sliding_window, got capacity={capacity}, "
                f"sliding_window={sliding_window}"
            )
        for name, value in (("sink_tokens", sink_tokens), ("recent_tokens", recent_tokens)):
            if value < 0:
                raise ValueError(f"TurboQuantKVCache: {name} must be >= 0, got {value}")
            if value > capacity:
                raise ValueError(f"TurboQuantKVCache: {name}={value} exceeds the capacity C={capacity}")
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.bits = bits
        self.v_bits = v_bits
        self.sliding_window = sliding_window
        self.center_keys = center_keys
        self.norm_correction = norm_correction
        self.sink_tokens = sink_tokens
        self.recent_tokens = recent_tokens
        # Tokens written so far (absolute position of the next token): host bookkeeping, never a tensor read.
        self.seq_len = 0
        k = allocate_quantized_kv(batch_size, num_kv_heads, capacity, head_dim, bits, device=device)
        v = allocate_quantized_kv(batch_size, num_kv_heads, capacity, head_dim, v_bits, device=device)
        self.register_buffer("k_codes", k.codes)
        self.register_buffer("k_norms", k.norms)
        self.register_buffer("v_codes", v.codes)
        self.register_buffer("v_norms", v.norms)
        device = k.codes.device
        if signs is None:
            signs = hadamard_signs(head_dim)
        if signs.shape != (head_dim,):
            raise ValueError(f"TurboQuantKVCache: signs must have shape [D] = [{head_dim}], got {list(signs.shape)}")
        self.register_buffer("signs", signs.to(device=device, dtype=torch.float32).contiguous())
        # Per-(sequence, KV head) key offset subtracted inside the quantize op; set by the first append.
        self.register_buffer("k_mean", torch.zeros(batch_size, num_kv_heads, head_dim, device=device))
        self.has_k_mean = False
        self.window_dtype = window_dtype
        # A rule ("model", "auto") is resolved by the first append, from the K/V dtype.
        window = dict(device=device, dtype=resolve_window_dtype(window_dtype, torch.float32))
        self.register_buffer("sink_k", torch.zeros(batch_size, num_kv_heads, sink_tokens, head_dim, **window))
        self.register_buffer("sink_v", torch.zeros_like(self.sink_k))
        self.register_buffer("recent_k", torch.zeros(batch_size, num_kv_heads, recent_tokens, head_dim, **window))
        self.register_buffer("recent_v", torch.zeros_like(self.recent_k))

    @property
    def is_sliding(self) -> bool:
        return self.sliding_window > 0

    @property
    def batch_size(self) -> int:
        return self.k_codes.shape[0]

    @property
    def capacity(self) -> int:
        return self.k_codes.shape[2]

    @property
    def num_valid(self) -> int:
        """How many positions the cache still holds: ``seq_len`` (global) or ``min(seq_len, C)`` (sliding)."""
        lo, hi = valid_positions(self.seq_len, self.capacity)
        return hi - lo

    @property
    def num_sinks(self) -> int:
        """How many of the first positions are held in full precision: ``min(sink_tokens, seq_len)``."""
        return min(self.sink_tokens, self.seq_len)

    @property
    def num_recent(self) -> int:
        """How many of the newest positions are held in full precision: ``min(recent_tokens, seq_len)``."""
        return min(self.recent_tokens, self.seq_len)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for K and V: codes + norms at the current capacity, and the full-precision windows."""
        return (self._codes_nbytes(self.capacity)
                + self._window_nbytes(self.sink_tokens, self.sink_k) + self._window_nbytes(self.recent_tokens, self.recent_k))

    @property
    def nbytes_used(self) -> int:
        """Bytes of K and V for the positions held (codes + norms, and the full-precision copies), without spare capacity."""
        return (self._codes_nbytes(self.num_valid)
                + self._window_nbytes(self.num_sinks, self.sink_k) + self._window_nbytes(self.num_recent, self.recent_k))

    def _codes_nbytes(self, slots: int) -> int:
        B, Hkv, D = self.batch_size, self.num_kv_heads, self.head_dim
        return quantized_nbytes(B, Hkv, slots, D, self.bits) + quantized_nbytes(B, Hkv, slots, D, self.v_bits)

    def _window_nbytes(self, tokens: int, buffer: torch.Tensor) -> int:
        return 2 * self.batch_size * self.num_kv_heads * self.head_dim * tokens * buffer.element_size()

    def extra_repr(self) -> str:
        kind = f"sliding_window={self.sliding_window}" if self.is_sliding else "global"
        bits = f"bits={self.bits}" + (f", v_bits={self.v_bits}" if self.v_bits != self.bits else "")
        extra = "".join(f", {name}={getattr(self, name)}" for name in ("sink_tokens", "recent_tokens") if getattr(self, name))
        if self.sink_tokens or self.recent_tokens:
            extra += f", windows={str(self.sink_k.dtype).removeprefix('torch.')}"
        return (f"B={self.batch_size}, Hkv={self.num_kv_heads}, D={self.head_dim}, C={self.capacity}, "
                f"{bits}, {kind}, seq_len={self.seq_len}{extra}")

    def _windows(self, which: str) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(sink, recent) buffers of ``which`` in ("k", "v"), None where the window is off."""
        sink = getattr(self, f"sink_{which}") if self.sink_tokens else None
        recent = getattr(self, f"recent_{which}") if self.recent_tokens else None
        return sink, recent

    def append(self, k: torch.Tensor, v: torch.Tensor, position: Optional[int] = None,
               cache_seqlens: Optional[torch.Tensor] = None) -> None:
        r"""Add ``T`` new tokens (positions ``seq_len … seq_len+T-1``): one quantize launch per tensor.

        Args:
            k, v (torch.Tensor): ``[B, T, Hkv, D]``, float32/float16/bfloat16.
            position (Optional[int]): ``seq_len``, passed by a caller that keeps the count itself (see
                "torch.compile" below). Default: ``None`` (read ``seq_len``).
            cache_seqlens (Optional[torch.Tensor]): int32 ``[B]`` on the cache's device, the tokens each
                sequence holds before this call: the kernels read the write positions from it instead
                of ``position`` (which still drives the host-side checks), so a captured CUDA graph
                replays correctly. Default: ``None``.

        Raises ``ValueError`` when a global cache would overflow its capacity (see :meth:`grow`).

        torch.compile: Dynamo treats integer attributes of an ``nn.Module`` as constants, so a compiled
        step that reads ``seq_len`` recompiles at every token. A caller that holds the count on a plain
        object (as the transformers integration does) passes it as ``position``/``kv_len`` and the
        cache only writes ``seq_len``; the count is then a ``SymInt`` and the step compiles once.
        """
        if k.shape != v.shape:
            raise ValueError(f"TurboQuantKVCache.append: k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
        if k.dim() != 4:
            raise ValueError(f"TurboQuantKVCache.append: k must be [B, T, Hkv, D], got shape {list(k.shape)}")
        T = k.shape[1]
        pos = self.seq_len if position is None else position
        if not self.is_sliding and pos + T > self.capacity:
            raise ValueError(
                f"TurboQuantKVCache.append: {T} new tokens after {pos} overflow the global cache capacity "
                f"C={self.capacity}; call grow() first or allocate a larger capacity"
            )
        if T == 0:
            return
        if pos == 0:
            self._start(k)
        k_sink, k_recent = self._windows("k")
        v_sink, v_recent = self._windows("v")
        offset = self.k_mean if self.center_keys else None
        write_pos = pos if cache_seqlens is None else 0
        _ops.hadamard_quantize_kv(k, self.k_codes, self.k_norms, write_pos, self.is_sliding, self.bits, self.signs,
                                  offset, self.norm_correction, k_sink, k_recent, cache_seqlens)
        _ops.hadamard_quantize_kv(v, self.v_codes, self.v_norms, write_pos, self.is_sliding, self.v_bits, self.signs,
                                  None, self.norm_correction, v_sink, v_recent, cache_seqlens)
        self.seq_len = pos + T

    def _start(self, k: torch.Tensor) -> None:
        """First append (a prefill): fix the key offset and the windows' dtype. Not part of a decode step."""
        if self.center_keys and not self.has_k_mean:
            # Softmax is invariant to adding q·mu to every score of a query, so keys may be stored
            # as k - mu for any fixed mu without changing attention; centering on the mean of the
            # first tokens removes the shared component of the keys and leaves the quantizer only
            # the part that differs between tokens (measured: 8-bit SmolLM2 perplexity +0.14% -> +0.005%).
            self.k_mean.copy_(k.float().mean(dim=1))
            self.has_k_mean = True
        dtype = resolve_window_dtype(self.window_dtype, k.dtype)
        if self.sink_k.dtype != dtype:
            for name in ("sink_k", "sink_v", "recent_k", "recent_v"):
                setattr(self, name, getattr(self, name).to(dtype))

    def attend(
        self,
        q: torch.Tensor,
        scale: Optional[float] = None,
        softcap: float = 0.0,
        sliding_window: Optional[int] = None,
        kv_start: Optional[torch.Tensor] = None,
        kv_len: Optional[int] = None,
        cache_seqlens: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        r"""Attention of the last ``Lq`` positions over the cache: one ``tq.flash_attn_vec_tq`` launch that reads
        the sinks, the codes and the recent window (one exact softmax over all of them).

        Args:
            q (torch.Tensor): ``[B, Hq, Lq, D]``, the queries of positions ``seq_len - Lq … seq_len - 1``
                (their keys must already be appended).
            scale (Optional[float]): score scale. Default: ``D ** -0.5``.
            softcap (float): logit soft-capping, 0 for off. Default: ``0.0``.
            sliding_window (Optional[int]): 0 for full attention. Default: the cache's own ``sliding_window``.
            kv_start (Optional[torch.Tensor]): int64 ``[B]``, first valid position per sequence (left
                padding). Default: ``None``.
            kv_len (Optional[int]): ``seq_len``, passed by a caller that keeps the count itself (see
                :meth:`append`). Default: ``None`` (read ``seq_len``).
            cache_seqlens (Optional[torch.Tensor]): int32 ``[B]`` on the cache's device, each sequence's
                token count (its queries included), read by the kernel; ``kv_len`` is then an upper
                bound (e.g. the capacity). Default: ``None``.

        Returns:
            ``[B, Hq, Lq, D]`` in q's dtype.
        """
        if scale is None:
            scale = self.head_dim ** -0.5
        scale, softcap = float(scale), float(softcap)
        if softcap > 0 and self.center_keys and self.has_k_mean:
            raise ValueError("TurboQuantKVCache.attend: softcap > 0 needs center_keys=False (tanh soft-capping is not "
                             "shift-invariant, so centered keys would change the scores)")
        window = self.sliding_window if sliding_window is None else sliding_window
        # A global cache never holds more than C positions, so a window wider than C is full attention
        # (the op requires sliding_window <= C). Depends on the capacity only: nothing to recompile per step.
        if not self.is_sliding and window > self.capacity:
            window = 0
        k_sink, k_recent = self._windows("k")
        v_sink, v_recent = self._windows("v")
        kv_len = self.seq_len if kv_len is None else kv_len
        return _ops.flash_attn_vec_tq(q, self.k_codes, self.k_norms, self.v_codes, self.v_norms, kv_len, scale,
                                      self.bits, window, softcap, kv_start, self.signs, None, self.v_bits, k_sink,
                                      v_sink, k_recent, v_recent, cache_seqlens)

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V :meth:`attend` uses for the positions still held: ``(k, v)``, float32 ``[B, Hkv, N, D]``
        (a full-size copy; for inspection). Sink and recent positions come from full precision; the key
        offset removed by ``center_keys`` is added back."""
        lo, hi = valid_positions(self.seq_len, self.capacity)
        return self.dequantize_range(lo, hi - lo)

    def dequantize_range(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`dequantize` of positions ``start … start+length-1`` (they must still be held): float32 ``[B, Hkv, length, D]``."""
        lo, hi = valid_positions(self.seq_len, self.capacity)
        if start < lo or start + length > hi:
            raise ValueError(f"TurboQuantKVCache.dequantize_range: positions [{start}, {start + length}) are not all held; "
                             f"the cache holds [{lo}, {hi})")
        positions = torch.arange(start, start + length, device=self.k_codes.device)
        out = []
        for which, bits in (("k", self.bits), ("v", self.v_bits)):
            codes, norms = getattr(self, f"{which}_codes"), getattr(self, f"{which}_norms")
            y = _ops.dequantize_kv(codes, norms, start, length, bits, True, self.signs)  # rotated domain
            sink, recent = self._windows(which)
            # Same source rule as the op: sinks first, then the recent ring, else the codes.
            if recent is not None:
                held = positions >= self.seq_len - self.recent_tokens
                y[:, :, held] = recent[:, :, positions[held] % self.recent_tokens].float()
            if sink is not None:
                held = positions < self.sink_tokens
                y[:, :, held] = sink[:, :, positions[held]].float()
            out.append(unrotate(y, self.signs))
        k, v = out
        if self.has_k_mean:
            k = k + self.k_mean.unsqueeze(2)
        return k, v

    def truncate(self, seq_len: int) -> None:
        """Forget the positions from ``seq_len`` on (global caches; the codes of forgotten slots are rewritten later).

        Ring slots of positions the recent window holds again after the cut were overwritten by the
        forgotten tokens: they are refilled from the codes (those positions are then read as quantized).
        """
        seq_len = max(0, min(seq_len, self.seq_len))
        W = self.recent_tokens
        lost_lo, lost_hi = max(0, seq_len - W), max(0, min(self.seq_len, seq_len + W) - W)
        if W and lost_hi > lost_lo:
            length = lost_hi - lost_lo
            slots = torch.arange(lost_lo, lost_hi, device=self.k_codes.device) % W
            for which, bits in (("k", self.bits), ("v", self.v_bits)):
                codes, norms = getattr(self, f"{which}_codes"), getattr(self, f"{which}_norms")
                y = _ops.dequantize_kv(codes, norms, lost_lo, length, bits, True, self.signs)
                ring = getattr(self, f"recent_{which}")
                ring.index_copy_(2, slots, y.to(ring.dtype))
        self.seq_len = seq_len

    def reset(self) -> None:
        """Forget every token (the buffers are zeroed and kept)."""
        self.seq_len = 0
        self.has_k_mean = False
        for name in ("k_codes", "k_norms", "v_codes", "v_norms", "k_mean", "sink_k", "sink_v", "recent_k", "recent_v"):
            getattr(self, name).zero_()

    def grow(self, capacity: int) -> None:
        """Reallocate a global cache to ``capacity`` slots, keeping its tokens (copies packed bytes only)."""
        if self.is_sliding:
            raise ValueError("TurboQuantKVCache.grow: a sliding cache is a fixed ring buffer and cannot grow")
        if capacity <= self.capacity:
            return
        for name in ("k_codes", "k_norms", "v_codes", "v_norms"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
            new[:, :, : self.seq_len] = old[:, :, : self.seq_len]
            setattr(self, name, new)

    _BATCH_BUFFERS = ("k_codes", "k_norms", "v_codes", "v_norms", "k_mean", "sink_k", "sink_v", "recent_k", "recent_v")

    def index_batch(self, indices: torch.Tensor) -> None:
        """Keep/reorder batch rows: row ``i`` becomes old row ``indices[i]`` (beam reordering, batch selection)."""
        indices = indices.to(self.k_codes.device)
        for name in self._BATCH_BUFFERS:
            setattr(self, name, getattr(self, name).index_select(0, indices).contiguous())

    def repeat_batch(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times (``repeat_interleave`` on B)."""
        for name in self._BATCH_BUFFERS:
            setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0).contiguous())


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    r"""Combine two attentions of the same queries over disjoint key sets into the attention over their union.

    Each part is ``softmax(s) @ v`` over its keys with ``lse = log Σ exp(s)``; the union's output is
    the two outputs weighted by ``exp(lse_part - lse_union)``. A part whose ``lse`` is ``-inf`` (no
    visible key) gets weight 0; a query that sees no key in either part outputs zeros.

    Args:
        out_a, out_b (torch.Tensor): ``[B, H, L, D]``.
        lse_a, lse_b (torch.Tensor): float32 ``[B, H, L]``.

    Returns:
        float32 ``[B, H, L, D]``.
    """
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = wa + wb
    total = torch.where(total > 0, total, torch.ones_like(total))
    return (out_a.float() * (wa / total).unsqueeze(-1)) + (out_b.float() * (wb / total).unsqueeze(-1))


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    sliding_window: int = 0,
    kv_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Full-precision causal attention of T new tokens over themselves (the prefill path).

    Args:
        q (torch.Tensor): ``[B, Hq, T, D]``.
        k, v (torch.Tensor): ``[B, Hkv, T, D]``; ``Hq % Hkv == 0``.
        scale, softcap, sliding_window, kv_start: as in :func:`torch_tq.flash_attn_vec_tq`.

    Returns:
        ``[B, Hq, T, D]`` in q's dtype. A query with no visible key (a padding row) returns zeros.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if scale is None:
        scale = D ** -0.5
    pos = torch.arange(T, device=q.device)
    need_mask = sliding_window > 0 or kv_start is not None or softcap > 0
    if not need_mask:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=Hq != Hkv)
    allowed = pos[None, :] <= pos[:, None]  # [T, T]
    if sliding_window > 0:
        allowed = allowed & (pos[None, :] > pos[:, None] - sliding_window)
    allowed = allowed.expand(B, 1, T, T)
    if kv_start is not None:
        allowed = allowed & (pos[None, None, None, :] >= kv_start.to(q.device)[:, None, None, None])
    group = Hq // Hkv
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = scale * q.float() @ kf.transpose(-1, -2)  # [B, Hq, T, T]
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ vf).to(q.dtype)


class TurboQuantAttention(nn.Module):
    r"""Causal attention of new tokens with a TurboQuant-compressed KV cache (the design card's nn.Module wrapper).

    * Prefill (the cache is empty): attends over the full-precision K/V of the new tokens (SDPA), then
      quantizes them into the cache.
    * Decode (the cache holds tokens): quantizes the new tokens into the cache, then calls the fused
      ``tq.flash_attn_vec_tq`` over the compressed cache (the new tokens included) — no dequantized copy:
      three launches per step.

    Projections and rotary embeddings stay with the caller: this module takes the per-head q, k, v.

    Args:
        num_heads (int): Hq.
        num_kv_heads (int): Hkv (``Hq % Hkv == 0``).
        head_dim (int): D.
        capacity (int): C, slots of the owned :class:`TurboQuantKVCache`.
        bits (int): code width. Default: ``4``.
        batch_size (int): B. Default: ``1``.
        sliding_window (int): 0 for full attention, else the window (and a ring-buffer cache). Default: ``0``.
        softcap (float): logit soft-capping, 0 for off. Default: ``0.0``.
        scale (Optional[float]): score scale. Default: ``D ** -0.5``.
        signs (Optional[torch.Tensor]): rotation signs. Default: :func:`torch_tq.hadamard_signs` ``(D)``.
        device: where the cache lives. Default: ``None``.
        sink_tokens, recent_tokens (int): positions also kept in full precision (see
            :class:`TurboQuantKVCache`). Default: ``0``.
        v_bits (Optional[int]): code width of the values. Default: ``None`` (= ``bits``).
        window_dtype (torch.dtype | str): storage dtype of the windows (see :class:`TurboQuantKVCache`).
            Default: ``"model"``.

    Shapes:
        - q: ``[B, T, Hq, D]``; k, v: ``[B, T, Hkv, D]`` (the new tokens, positions ``cache.seq_len …``).
        - kv_start: optional int64 ``[B]`` (left padding).
        - output: ``[B, T, Hq, D]`` in q's dtype.

    Examples::

        >>> attn = TurboQuantAttention(num_heads=9, num_kv_heads=3, head_dim=64, capacity=256)
        >>> out = attn(torch.randn(1, 16, 9, 64), torch.randn(1, 16, 3, 64), torch.randn(1, 16, 3, 64))  # prefill
        >>> out = attn(torch.randn(1, 1, 9, 64), torch.randn(1, 1, 3, 64), torch.randn(1, 1, 3, 64))  # decode
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        bits: int = 4,
        batch_size: int = 1,
        sliding_window: int = 0,
        softcap: float = 0.0,
        scale: Optional[float] = None,
        signs: Optional[torch.Tensor] = None,
        device: torch.device | str | None = None,
        sink_tokens: int = 0,
        recent_tokens: int = 0,
        v_bits: Optional[int] = None,
        window_dtype: torch.dtype | str = "model",
    ):
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"TurboQuantAttention: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.softcap = softcap
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.sliding_window = sliding_window
        self.cache = TurboQuantKVCache(num_kv_heads, head_dim, capacity, bits, batch_size, sliding_window, signs, device,
                                       center_keys=softcap == 0, sink_tokens=sink_tokens, recent_tokens=recent_tokens,
                                       v_bits=v_bits, window_dtype=window_dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: Optional[torch.Tensor] = None) -> torch.Tensor:
        if q.dim() != 4 or q.shape[2] != self.num_heads or q.shape[3] != self.head_dim:
            raise ValueError(f"TurboQuantAttention: q must be [B, T, Hq={self.num_heads}, D={self.head_dim}], got {list(q.shape)}")
        if k.shape != v.shape or k.dim() != 4 or k.shape[2] != self.num_kv_heads or k.shape[:2] != q.shape[:2]:
            raise ValueError(f"TurboQuantAttention: k and v must be [B, T, Hkv={self.num_kv_heads}, D] matching q's "
                             f"[B, T], got {list(k.shape)} and {list(v.shape)}")
        if self.cache.seq_len == 0:
            out = reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale,
                                      self.softcap, self.sliding_window, kv_start)
            self.cache.append(k, v)
        else:
            self.cache.append(k, v)
            out = self.cache.attend(q.transpose(1, 2), self.scale, self.softcap, self.sliding_window, kv_start)
        return out.transpose(1, 2).contiguous()

    def reset(self) -> None:
        self.cache.reset()
