"""tq.kv_cache_copy through its plan and the MSL simulator, against the CPU reference."""

import itertools

import pytest
import torch

import _plans

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# id, B, T, Hkv, D, C, write_pos, is_sliding
CASES = [
    ("global-append", 2, 3, 2, 64, 8, 4, False),
    ("sliding-wrap", 1, 5, 3, 40, 8, 6, True),
    ("sliding-T-gt-C", 2, 11, 2, 16, 4, 9, True),
]


@pytest.mark.parametrize("src_dtype, cache_dtype", list(itertools.product(DTYPES, DTYPES)),
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES[:1], ids=lambda c: c[0])
def test_kv_cache_copy_dtypes(case, src_dtype, cache_dtype):
    _check(case, src_dtype, cache_dtype)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_kv_cache_copy_ring(case):
    _check(case, torch.float32, torch.float16)


def test_kv_cache_copy_strided_src():
    """A transposed view as src (the .mm makes it contiguous) writes the same values."""
    src = torch.randn(1, 2, 5, 32).transpose(1, 2)  # [B, T=5, Hkv=2, D], non-contiguous
    cache = torch.full((1, 2, 8, 32), float("nan"))
    ref = cache.clone()
    torch.ops.tq.kv_cache_copy(src, ref, 1, False)
    _plans.run("kv_cache_copy", src=src, cache=cache, write_pos=1, is_sliding=False)
    assert torch.equal(cache.nan_to_num(7.0), ref.nan_to_num(7.0))


def _check(case, src_dtype, cache_dtype):
    _, B, T, Hkv, D, C, write_pos, is_sliding = case
    src = (torch.randn(B, T, Hkv, D) * 3).to(src_dtype)
    # NaN marks the slots that must stay untouched; both sides start from the same cache.
    cache = torch.full((B, Hkv, C, D), float("nan"), dtype=cache_dtype)
    ref = cache.clone()
    torch.ops.tq.kv_cache_copy(src, ref, write_pos, is_sliding)
    _plans.run("kv_cache_copy", src=src, cache=cache, write_pos=write_pos, is_sliding=is_sliding)
    assert torch.equal(cache.isnan(), ref.isnan())
    assert torch.equal(cache.nan_to_num(0.0), ref.nan_to_num(0.0))
