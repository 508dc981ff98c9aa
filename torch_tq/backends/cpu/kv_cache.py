"""CPU reference of ``tq.kv_cache_copy``: full-precision KV-cache writes with ring-buffer semantics."""

from __future__ import annotations

from ... import _validation
from ...layout import ring_write_slots


def kv_cache_copy(src, cache, write_pos: int, is_sliding: bool = False) -> None:
    _validation.check_kv_cache_copy(src, cache, write_pos, is_sliding)
    first, slots = ring_write_slots(src.shape[1], write_pos, cache.shape[2], is_sliding)
    # [B, T', Hkv, D] -> [B, Hkv, T', D], cast on write.
    cache.index_copy_(2, slots.to(cache.device), src[:, first:].transpose(1, 2).to(cache.dtype))
