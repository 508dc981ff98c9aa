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

__all__ = ["TurboQuantAttention", "TurboQuantKVCache", "merge_attention", "reference_attention"]


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
        sink_tokens (int): keep the K/V of the first ``sink_tokens`` positions also in full precision
            (the dtype of the first appended K/V) and attend to them from there, merging with the
            compressed positions through the op's log-sum-exp. The first tokens ("attention sinks")
            take a large share of the attention of every query, so their quantization error weighs
            on every output. These are absolute positions: in a left-padded batch a padded row's
            sinks are padding (masked by ``kv_start``), so its own first tokens stay quantized.
            Global caches only. Default: ``0``.
        recent_tokens (int): keep the newest tokens in full precision: the newest ``recent_tokens``
            of earlier calls and up to ``recent_tokens`` of the latest call (so a decode chunk also
            sees itself in full precision, and at most ``2 * recent_tokens`` tokens are held this
            way); older ones are quantized as they leave. Global caches only. Default: ``0``.

    Shapes:
        - k_codes, v_codes (buffers): uint8 ``[B, Hkv, C, D*b/8]``, a little-endian bitstream per row.
        - k_norms, v_norms (buffers): float32 ``[B, Hkv, C, D/R]``.
        - signs (buffer): float32 ``[D]``.
        - k_mean (buffer): float32 ``[B, 1, Hkv, D]``, the key offset (zeros without ``center_keys``).
        - sink_k, sink_v (buffers): ``[B, Hkv, sink_tokens, D]``, the first positions in full precision
          (keys centered like the compressed ones).
        - recent_k, recent_v (buffers): ``[B, Hkv, num_recent, D]``, the positions not quantized yet.
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
        for name, value in (("sink_tokens", sink_tokens), ("recent_tokens", recent_tokens)):
            if value < 0:
                raise ValueError(f"TurboQuantKVCache: {name} must be >= 0, got {value}")
            if value > 0 and sliding_window > 0:
                raise ValueError(f"TurboQuantKVCache: {name} needs a global cache (sliding-window caches quantize every token)")
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
        self.sink_tokens = sink_tokens
        self.register_buffer("sink_k", torch.zeros(batch_size, num_kv_heads, sink_tokens, head_dim, device=k.codes.device))
        self.register_buffer("sink_v", torch.zeros_like(self.sink_k))
        # Positions [0, quantized_len) are in the codes; [quantized_len, seq_len) only in recent_k/recent_v.
        self.recent_tokens = recent_tokens
        self.quantized_len = 0
        self.register_buffer("recent_k", torch.zeros(batch_size, num_kv_heads, 0, head_dim, device=k.codes.device))
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
        """How many of the first positions are attended in full precision: ``min(sink_tokens, seq_len)``."""
        return min(self.sink_tokens, self.seq_len)

    @property
    def num_recent(self) -> int:
        """How many of the newest positions are not quantized yet (held in full precision only)."""
        return self.seq_len - self.quantized_len

    @property
    def nbytes(self) -> int:
        """Bytes allocated for K and V: codes + norms at the current capacity, and the full-precision tokens."""
        codes = 2 * quantized_nbytes(self.batch_size, self.num_kv_heads, self.capacity, self.head_dim, self.bits)
        return codes + self._full_precision_nbytes(self.sink_tokens)

    @property
    def nbytes_used(self) -> int:
        """Bytes of K and V for the positions held (codes + norms, and the full-precision tokens), without spare capacity."""
        lo, hi = valid_positions(self.quantized_len, self.capacity)
        codes = 2 * quantized_nbytes(self.batch_size, self.num_kv_heads, hi - lo, self.head_dim, self.bits)
        return codes + self._full_precision_nbytes(self.num_sinks)

    def _full_precision_nbytes(self, sinks: int) -> int:
        per_token = 2 * self.batch_size * self.num_kv_heads * self.head_dim
        return per_token * (sinks * self.sink_k.element_size() + self.num_recent * self.recent_k.element_size())

    def extra_repr(self) -> str:
        kind = f"sliding_window={self.sliding_window}" if self.is_sliding else "global"
        extra = "".join(f", {name}={getattr(self, name)}" for name in ("sink_tokens", "recent_tokens") if getattr(self, name))
        return (f"B={self.batch_size}, Hkv={self.num_kv_heads}, D={self.head_dim}, C={self.capacity}, "
                f"bits={self.bits}, {kind}, seq_len={self.seq_len}{extra}")

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        r"""Add ``T`` new tokens (positions ``seq_len … seq_len+T-1``).

        Without ``recent_tokens`` they are quantized into their slots at once. With it they join the
        full-precision window, and the tokens that leave it are quantized (see ``recent_tokens``).

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
        if self.seq_len == 0:
            # Full precision means the dtype of the model's K/V.
            self.sink_k, self.sink_v = self.sink_k.to(k.dtype), self.sink_v.to(v.dtype)
            self.recent_k, self.recent_v = self.recent_k.to(k.dtype), self.recent_v.to(v.dtype)
        if self.seq_len < self.sink_tokens:
            n = min(T, self.sink_tokens - self.seq_len)
            self.sink_k[:, :, self.seq_len : self.seq_len + n] = k[:, :n].transpose(1, 2)
            self.sink_v[:, :, self.seq_len : self.seq_len + n] = v[:, :n].transpose(1, 2)
        if self.recent_tokens == 0:
            self._quantize(k, v, self.seq_len)
        else:
            self.recent_k = torch.cat((self.recent_k, k.transpose(1, 2).to(self.recent_k.dtype)), dim=2)
            self.recent_v = torch.cat((self.recent_v, v.transpose(1, 2).to(self.recent_v.dtype)), dim=2)
            # Keep the newest recent_tokens of earlier calls and up to recent_tokens of this one, so a
            # decode chunk attends to itself in full precision while a long prefill is quantized now.
            leaving = self.num_recent + T - self.recent_tokens - min(T, self.recent_tokens)
            if leaving > 0:
                self._quantize(self.recent_k[:, :, :leaving].transpose(1, 2), self.recent_v[:, :, :leaving].transpose(1, 2),
                               self.quantized_len)
                self.recent_k, self.recent_v = self.recent_k[:, :, leaving:], self.recent_v[:, :, leaving:]
        self.seq_len += T

    def _quantize(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Encode ``k``, ``v`` ``[B, T, Hkv, D]`` (keys already centered) at positions ``start …``."""
        T = k.shape[1]
        _ops.hadamard_quantize_kv(k.contiguous(), self.k_codes, self.k_norms, start, self.is_sliding, self.bits, self.signs)
        _ops.hadamard_quantize_kv(v.contiguous(), self.v_codes, self.v_norms, start, self.is_sliding, self.bits, self.signs)
        if self.norm_correction:
            self._correct_norms(start, T)
        self.quantized_len = start + T

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
        r"""Attention of the last ``Lq`` positions over the cache: the fused ``tq.flash_attn_vec_tq`` over the codes.

        With ``sink_tokens``/``recent_tokens``, the positions held in full precision are attended
        separately and merged exactly with the op's output through its log-sum-exp.

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
        scale, softcap = float(scale), float(softcap)
        if softcap > 0 and self.center_keys and self.has_k_mean:
            raise ValueError("TurboQuantKVCache.attend: softcap > 0 needs center_keys=False (tanh soft-capping is not "
                             "shift-invariant, so centered keys would change the scores)")
        window = self.sliding_window if sliding_window is None else sliding_window
        # A window covering every cached position is full attention; this keeps a global cache smaller
        # than a model's (large) window valid for the op, which requires sliding_window <= C.
        if window >= self.seq_len and not self.is_sliding:
            window = 0
        if self.sink_tokens == 0 and self.recent_tokens == 0:
            return _ops.flash_attn_vec_tq(q, self.k_codes, self.k_norms, self.v_codes, self.v_norms, self.seq_len,
                                          scale, self.bits, window, softcap, kv_start, self.signs)
        parts = [p for p in (self._attend_codes(q, scale, softcap, window, kv_start),
                             self._attend_full_precision(q, scale, softcap, window, kv_start)) if p is not None]
        out, lse = parts[0]
        if len(parts) == 2:
            out = merge_attention(out, lse, *parts[1])
        return out.to(q.dtype)

    def _query_positions(self, Lq: int, device) -> torch.Tensor:
        return torch.arange(self.seq_len - Lq, self.seq_len, device=device)

    def _attend_codes(self, q, scale: float, softcap: float, window: int, kv_start) -> Optional[tuple]:
        """``tq.flash_attn_vec_tq`` over the quantized positions that are not sinks: (output, lse), or None if there are none."""
        first = min(self.num_sinks, self.quantized_len)  # sinks are attended in full precision
        if self.quantized_len == first:
            return None
        B, Hq, Lq, D = q.shape
        start = kv_start
        if first > 0:
            start = torch.full((B,), first, dtype=torch.int64, device=q.device)
            if kv_start is not None:
                start = torch.maximum(start, kv_start.to(q.device))
        codes = (self.k_codes, self.k_norms, self.v_codes, self.v_norms, self.quantized_len)
        out = q.new_zeros(B, Hq, Lq, D)
        lse = torch.full((B, Hq, Lq), -math.inf, device=q.device)

        def op(queries, sliding_window):  # -> (output, lse) of queries that are the last positions of the codes
            part_lse = torch.empty(queries.shape[:3], dtype=torch.float32, device=q.device)
            part = _ops.flash_attn_vec_tq(queries, *codes, scale, self.bits, sliding_window, softcap, start, self.signs,
                                          part_lse)
            return part, part_lse

        # Queries whose own position is quantized are the last `inside` positions of the codes: causal as usual.
        inside = max(0, min(Lq, self.quantized_len - (self.seq_len - Lq)))
        if inside > 0:
            out[:, :, :inside], lse[:, :, :inside] = op(q[:, :, :inside], window)
        if inside == Lq:
            return out, lse
        # Every quantized position is older than the other queries, so all of them are causally visible:
        # one call with those queries as single-query heads (head h*L + i still maps to KV head
        # h // (Hq / Hkv)). A window differs per query, then each query is its own call.
        later = q[:, :, inside:]
        L = Lq - inside
        if window == 0:
            part, part_lse = op(later.reshape(B, Hq * L, 1, D), 0)
            out[:, :, inside:], lse[:, :, inside:] = part.reshape(B, Hq, L, D), part_lse.reshape(B, Hq, L)
            return out, lse
        for i, pos in enumerate(self._query_positions(Lq, "cpu").tolist()[inside:], start=inside):
            # Query i sees positions > pos - window; as a query at position quantized_len - 1 that is
            # a window of window - (pos - quantized_len + 1).
            w = window - (pos - self.quantized_len + 1)
            if w > 0:
                out[:, :, i : i + 1], lse[:, :, i : i + 1] = op(q[:, :, i : i + 1], w)
        return out, lse

    def _attend_full_precision(self, q, scale: float, softcap: float, window: int, kv_start) -> Optional[tuple]:
        """Attention over the sink and recent positions (float32): (output, lse), or None if there are none."""
        sinks = min(self.num_sinks, self.quantized_len)  # sinks still in the recent window are counted there
        k = torch.cat((self.sink_k[:, :, :sinks], self.recent_k), dim=2).float()
        if k.shape[2] == 0:
            return None
        v = torch.cat((self.sink_v[:, :, :sinks], self.recent_v), dim=2).float()
        j = torch.cat((torch.arange(sinks), torch.arange(self.quantized_len, self.seq_len))).to(q.device)
        B, Hq, Lq, D = q.shape
        Hkv = self.num_kv_heads
        scores = scale * torch.einsum("bhgld,bhnd->bhgln", q.float().reshape(B, Hkv, Hq // Hkv, Lq, D), k)
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        pos = self._query_positions(Lq, q.device)[:, None]
        allowed = j[None, :] <= pos  # [Lq, N]
        if window > 0:
            allowed = allowed & (j[None, :] > pos - window)
        allowed = allowed.expand(B, Lq, j.numel())
        if kv_start is not None:
            allowed = allowed & (j[None, None, :] >= kv_start.to(q.device)[:, None, None])
        scores = scores.masked_fill(~allowed[:, None, None], -math.inf)
        lse = torch.logsumexp(scores, dim=-1)  # -inf for a query that sees none of these positions
        probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
        out = torch.einsum("bhgln,bhnd->bhgld", probs, v)
        return out.reshape(B, Hq, Lq, D), lse.reshape(B, Hq, Lq)

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
        stop = start + length
        coded = max(0, min(stop, self.quantized_len) - start)
        k = _ops.dequantize_kv(self.k_codes, self.k_norms, start, coded, self.bits, False, self.signs)
        v = _ops.dequantize_kv(self.v_codes, self.v_norms, start, coded, self.bits, False, self.signs)
        sinks = min(self.num_sinks, self.quantized_len)
        if start < sinks:
            n = min(sinks, stop) - start
            k[:, :, :n], v[:, :, :n] = self.sink_k[:, :, start : start + n], self.sink_v[:, :, start : start + n]
        if stop > self.quantized_len:
            first = max(start, self.quantized_len) - self.quantized_len
            k = torch.cat((k, self.recent_k[:, :, first : stop - self.quantized_len].float()), dim=2)
            v = torch.cat((v, self.recent_v[:, :, first : stop - self.quantized_len].float()), dim=2)
        if self.has_k_mean:
            k = k + self.k_mean.transpose(1, 2)
        return k, v

    def truncate(self, seq_len: int) -> None:
        """Forget the positions from ``seq_len`` on (global caches; the codes of forgotten slots are rewritten later)."""
        seq_len = max(0, min(seq_len, self.seq_len))
        if seq_len >= self.quantized_len:
            keep = seq_len - self.quantized_len
            self.recent_k, self.recent_v = self.recent_k[:, :, :keep], self.recent_v[:, :, :keep]
        else:
            self.quantized_len = seq_len
            self.recent_k, self.recent_v = self.recent_k[:, :, :0], self.recent_v[:, :, :0]
        self.seq_len = seq_len

    def reset(self) -> None:
        """Forget every token (the buffers are zeroed and kept)."""
        self.seq_len = 0
        self.quantized_len = 0
        self.has_k_mean = False
        for t in (self.k_codes, self.k_norms, self.v_codes, self.v_norms, self.k_mean, self.sink_k, self.sink_v):
            t.zero_()
        self.recent_k, self.recent_v = self.recent_k[:, :, :0], self.recent_v[:, :, :0]

    def grow(self, capacity: int) -> None:
        """Reallocate a global cache to ``capacity`` slots, keeping its tokens (copies packed bytes only)."""
        if self.is_sliding:
            raise ValueError("TurboQuantKVCache.grow: a sliding cache is a fixed ring buffer and cannot grow")
        if capacity <= self.capacity:
            return
        for name in ("k_codes", "k_norms", "v_codes", "v_norms"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
            new[:, :, : self.quantized_len] = old[:, :, : self.quantized_len]
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
        sink_tokens, recent_tokens (int): positions also kept in full precision (global attention
            only; see :class:`TurboQuantKVCache`). Default: ``0``.

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
                                       center_keys=softcap == 0, sink_tokens=sink_tokens, recent_tokens=recent_tokens)

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
