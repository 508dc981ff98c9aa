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
from .layout import (
    SUPPORTED_BITS,
    SUPPORTED_HEAD_DIMS,
    allocate_quantized_kv,
    hadamard_signs,
    quantized_nbytes,
    valid_positions,
)

__all__ = ["TurboQuantAttention", "TurboQuantKVCache", "reference_attention"]


class TurboQuantKVCache(nn.Module):
    r"""The TurboQuant-compressed K and V of one attention layer, global or sliding-window (ring buffer).

    Token ``p`` (absolute position) lives in slot ``p`` of a global cache and in slot ``p mod C`` of a
    sliding cache (DESIGN §5). Every write rotates with the sign vector ``signs`` (default
    :func:`torch_tq.hadamard_signs`), which is part of the storage format; reads pass the same signs.

    Args:
        num_kv_heads (int): Hkv.
        head_dim (int): D, one of (64, 128, 256, 512).
        capacity (int): C, the number of slots. A sliding cache needs ``C >= sliding_window`` (and
            ``C >= sliding_window + Lq - 1`` to attend ``Lq`` queries at once after it has wrapped).
        bits (int): code width b in (2, 3, 4, 5, 6, 8). Default: ``4``.
        batch_size (int): B. Default: ``1``.
        sliding_window (int): 0 for a global cache; ``> 0`` makes the cache a ring buffer whose
            :meth:`attend` defaults to this window. Default: ``0``.
        signs (Optional[torch.Tensor]): float32 ``[D]`` of ±1 applied before the rotation.
            Default: ``None``, meaning :func:`torch_tq.hadamard_signs` ``(D)``.
        device: where the buffers live. Default: ``None`` (the default device).
        center_keys (bool): store keys minus their mean over the first appended tokens (exact for
            attention without soft-capping, more accurate after quantization). Default: ``True``.
        norm_correction (bool): rescale each new token's stored norm so that its decoded vector has
            the true norm (decodes only the new tokens). Default: ``True``.

    Shapes:
        - k_codes, v_codes (buffers): uint8 ``[B, Hkv, C, D*b/8]``, a little-endian bitstream per row.
        - k_norms, v_norms (buffers): float32 ``[B, Hkv, C, D/R]``.
        - signs (buffer): float32 ``[D]``.
        - k_mean (buffer): float32 ``[B, 1, Hkv, D]``, the key offset (zeros without ``center_keys``).
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
    ):
        super().__init__()
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"TurboQuantKVCache: head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"TurboQuantKVCache: bits must be one of {SUPPORTED_BITS}, got {bits}")
        if sliding_window < 0:
            raise ValueError(f"TurboQuantKVCache: sliding_window must be >= 0 (0 = global cache), got {sliding_window}")
        if sliding_window > capacity:
            raise ValueError(
                f"TurboQuantKVCache: a sliding cache needs capacity >= sliding_window, got capacity={capacity}, "
                f"sliding_window={sliding_window}"
            )
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.bits = bits
        self.sliding_window = sliding_window
        # Tokens written so far (absolute position of the next token).
        self.seq_len = 0
        k = allocate_quantized_kv(batch_size, num_kv_heads, capacity, head_dim, bits, device=device)
        v = allocate_quantized_kv(batch_size, num_kv_heads, capacity, head_dim, bits, device=device)
        self.register_buffer("k_codes", k.codes)
        self.register_buffer("k_norms", k.norms)
        self.register_buffer("v_codes", v.codes)
        self.register_buffer("v_norms", v.norms)
        if signs is None:
            signs = hadamard_signs(head_dim)
        if signs.shape != (head_dim,):
            raise ValueError(f"TurboQuantKVCache: signs must have shape [D] = [{head_dim}], got {list(signs.shape)}")
        self.register_buffer("signs", signs.to(device=k.codes.device, dtype=torch.float32).contiguous())
        self.center_keys = center_keys
        self.norm_correction = norm_correction
        # Per-(sequence, KV head) key offset subtracted before quantization; set by the first append.
        self.register_buffer("k_mean", torch.zeros(batch_size, 1, num_kv_heads, head_dim, device=k.codes.device))
        self.has_k_mean = False

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
    def nbytes(self) -> int:
        """Bytes allocated for K and V (codes + norms) at the current capacity."""
        return 2 * quantized_nbytes(self.batch_size, self.num_kv_heads, self.capacity, self.head_dim, self.bits)

    @property
    def nbytes_used(self) -> int:
        """Bytes of K and V (codes + norms) for the positions held, ignoring spare capacity."""
        return 2 * quantized_nbytes(self.batch_size, self.num_kv_heads, self.num_valid, self.head_dim, self.bits)

    def extra_repr(self) -> str:
        kind = f"sliding_window={self.sliding_window}" if self.is_sliding else "global"
        return (f"B={self.batch_size}, Hkv={self.num_kv_heads}, D={self.head_dim}, C={self.capacity}, "
                f"bits={self.bits}, {kind}, seq_len={self.seq_len}")

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        r"""Quantize ``T`` new tokens into the next slots (positions ``seq_len … seq_len+T-1``).

        Args:
            k, v (torch.Tensor): ``[B, T, Hkv, D]``, float32/float16/bfloat16.

        Raises ``ValueError`` when a global cache would overflow its capacity (see :meth:`grow`).
        """
        if k.shape != v.shape:
            raise ValueError(f"TurboQuantKVCache.append: k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
        if k.dim() != 4:
            raise ValueError(f"TurboQuantKVCache.append: k must be [B, T, Hkv, D], got shape {list(k.shape)}")
        T = k.shape[1]
        if not self.is_sliding and self.seq_len + T > self.capacity:
            raise ValueError(
                f"TurboQuantKVCache.append: {T} new tokens after {self.seq_len} overflow the global cache capacity "
                f"C={self.capacity}; call grow() first or allocate a larger capacity"
            )
        if T == 0:
            return
        if self.center_keys:
            # Softmax is invariant to adding q·mu to every score of a query, so keys may be stored
            # as k - mu for any fixed mu without changing attention; centering on the mean of the
            # first tokens removes the shared component of the keys and leaves the quantizer only
            # the part that differs between tokens (measured: 8-bit SmolLM2 perplexity +0.14% -> +0.005%).
            if not self.has_k_mean:
                self.k_mean.copy_(k.float().mean(dim=1, keepdim=True))
                self.has_k_mean = True
            k = k - self.k_mean.to(k.dtype)
        _ops.hadamard_quantize_kv(k.contiguous(), self.k_codes, self.k_norms, self.seq_len, self.is_sliding, self.bits, self.signs)
        _ops.hadamard_quantize_kv(v.contiguous(), self.v_codes, self.v_norms, self.seq_len, self.is_sliding, self.bits, self.signs)
        if self.norm_correction:
            self._correct_norms(self.seq_len, T)
        self.seq_len += T

    def _correct_norms(self, start: int, num_tokens: int) -> None:
        """Rescale the stored norms of the tokens just written so each decoded block has the true norm.

        The decoded block ``c[codes] * n / sqrt(R)`` has norm ``n * ||c[codes]|| / sqrt(R)``, not ``n``;
        storing ``n * n / ||decoded||`` instead makes it exactly ``n`` (the decode formula is unchanged).
        Only the new tokens are decoded (``[B, Hkv, T, D]``), never the cache.
        """
        first = max(0, num_tokens - self.capacity) if self.is_sliding else 0
        length = num_tokens - first
        slots = (torch.arange(start + first, start + num_tokens, device=self.k_norms.device) % self.capacity)
        R = self.head_dim // self.k_norms.shape[-1]
        for codes, norms in ((self.k_codes, self.k_norms), (self.v_codes, self.v_norms)):
            y = _ops.dequantize_kv(codes, norms, start + first, length, self.bits, True, self.signs)  # [B, Hkv, T', D]
            decoded = torch.linalg.vector_norm(y.reshape(*y.shape[:3], -1, R), dim=-1)  # [B, Hkv, T', D/R]
            n = norms.index_select(2, slots)
            fixed = torch.where(decoded > 0, n * n / decoded.clamp_min(torch.finfo(torch.float32).tiny), n)
            norms.index_copy_(2, slots, fixed)

    def attend(
        self,
        q: torch.Tensor,
        scale: Optional[float] = None,
        softcap: float = 0.0,
        sliding_window: Optional[int] = None,
        kv_start: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        r"""Fused decode attention of the last ``Lq`` positions over the compressed cache (``tq.flash_attn_vec_tq``).

        Args:
            q (torch.Tensor): ``[B, Hq, Lq, D]``, the queries of positions ``seq_len - Lq … seq_len - 1``
                (their keys must already be appended).
            scale (Optional[float]): score scale. Default: ``D ** -0.5``.
            softcap (float): logit soft-capping, 0 for off. Default: ``0.0``.
            sliding_window (Optional[int]): 0 for full attention. Default: the cache's own ``sliding_window``.
            kv_start (Optional[torch.Tensor]): int64 ``[B]``, first valid position per sequence (left
                padding). Default: ``None``.

        Returns:
            ``[B, Hq, Lq, D]`` in q's dtype.
        """
        if scale is None:
            scale = self.head_dim ** -0.5
        if softcap > 0 and self.center_keys and self.has_k_mean:
            raise ValueError("TurboQuantKVCache.attend: softcap > 0 needs center_keys=False (tanh soft-capping is not "
                             "shift-invariant, so centered keys would change the scores)")
        window = self.sliding_window if sliding_window is None else sliding_window
        # A window covering every cached position is full attention; this keeps a global cache smaller
        # than a model's (large) window valid for the op, which requires sliding_window <= C.
        if window >= self.seq_len and not self.is_sliding:
            window = 0
        return _ops.flash_attn_vec_tq(q, self.k_codes, self.k_norms, self.v_codes, self.v_norms, self.seq_len,
                                      float(scale), self.bits, window, float(softcap), kv_start, self.signs)

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode the positions still held: ``(k, v)``, float32 ``[B, Hkv, N, D]`` (a full-size copy; for inspection).

        The key offset removed by ``center_keys`` is added back.
        """
        lo, hi = valid_positions(self.seq_len, self.capacity)
        return self.dequantize_range(lo, hi - lo)

    def dequantize_range(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode positions ``start … start+length-1`` (they must still be held): float32 ``[B, Hkv, length, D]``."""
        lo, hi = valid_positions(self.seq_len, self.capacity)
        if start < lo or start + length > hi:
            raise ValueError(f"TurboQuantKVCache.dequantize_range: positions [{start}, {start + length}) are not all held; "
                             f"the cache holds [{lo}, {hi})")
        k = _ops.dequantize_kv(self.k_codes, self.k_norms, start, length, self.bits, False, self.signs)
        v = _ops.dequantize_kv(self.v_codes, self.v_norms, start, length, self.bits, False, self.signs)
        if self.has_k_mean:
            k = k + self.k_mean.transpose(1, 2)
        return k, v

    def reset(self) -> None:
        """Forget every token (the buffers are zeroed and kept)."""
        self.seq_len = 0
        self.has_k_mean = False
        for t in (self.k_codes, self.k_norms, self.v_codes, self.v_norms, self.k_mean):
            t.zero_()

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

    def index_batch(self, indices: torch.Tensor) -> None:
        """Keep/reorder batch rows: row ``i`` becomes old row ``indices[i]`` (beam reordering, batch selection)."""
        indices = indices.to(self.k_codes.device)
        for name in ("k_codes", "k_norms", "v_codes", "v_norms", "k_mean"):
            setattr(self, name, getattr(self, name).index_select(0, indices).contiguous())

    def repeat_batch(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times (``repeat_interleave`` on B)."""
        for name in ("k_codes", "k_norms", "v_codes", "v_norms", "k_mean"):
            setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0).contiguous())


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
      ``tq.flash_attn_vec_tq`` over the compressed cache (the new tokens included) — no dequantized copy.

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
                                       center_keys=softcap == 0)

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
