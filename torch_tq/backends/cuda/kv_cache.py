"""Triton kernel of ``tq.kv_cache_copy`` for the CUDA dispatch key: full-precision KV-cache writes with ring semantics."""

from __future__ import annotations

import triton
import triton.language as tl

from ... import _validation
from .turboquant import _cast


@triton.jit
def kv_cache_copy_fwd_kernel(
    src_ptr, cache_ptr, n_rows, t_lo, T, Hkv, C, write_pos, D,
    stride_sb, stride_st, stride_sh, stride_sd,
    BLOCK_D: tl.constexpr, ROWS: tl.constexpr, IS_SLIDING: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    rows = i_p * ROWS + tl.arange(0, ROWS)  # flat over (b, t - t_lo, h), h fastest
    row_ok = rows < n_rows
    n_t = T - t_lo
    h = rows % Hkv
    t = (rows // Hkv) % n_t + t_lo
    b = rows // Hkv // n_t
    p = write_pos + t
    if IS_SLIDING:
        slot = p % C
    else:
        slot = p
    d = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (d < D)[None, :]
    x = tl.load(src_ptr + b[:, None] * stride_sb + t[:, None] * stride_st + h[:, None] * stride_sh + d[None, :] * stride_sd,
                mask=ok)
    tl.store(cache_ptr + ((b * Hkv + h) * C + slot)[:, None] * D + d[None, :], _cast(x.to(tl.float32), cache_ptr.dtype.element_ty), mask=ok)


def kv_cache_copy_fwd(src, cache, write_pos: int, is_sliding: bool) -> None:
    B, T, Hkv, D = src.shape
    C = cache.shape[2]
    # A ring write of more than C tokens keeps only the last C.
    t_lo = max(0, T - C) if is_sliding else 0
    n_rows = B * (T - t_lo) * Hkv
    if n_rows == 0 or D == 0:
        return
    block_d = triton.next_power_of_2(D)
    rows = max(1, min(64, 4096 // block_d))
    kv_cache_copy_fwd_kernel[(triton.cdiv(n_rows, rows),)](
        src, cache, n_rows, t_lo, T, Hkv, C, write_pos, D, *src.stride(),
        BLOCK_D=block_d,
        ROWS=rows,
        IS_SLIDING=bool(is_sliding),
        num_warps=4,
    )


def kv_cache_copy(src, cache, write_pos: int, is_sliding: bool = False) -> None:
    _validation.check_kv_cache_copy(src, cache, write_pos, is_sliding)
    kv_cache_copy_fwd(src, cache, int(write_pos), is_sliding)
