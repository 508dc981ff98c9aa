"""Bit packing and cache geometry against the bit-by-bit oracle."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_tq
from _oracle import pack_bits, unpack_bits
from torch_tq.layout import SUPPORTED_BITS, SUPPORTED_HEAD_DIMS, norm_blocks, pack_codes, row_bytes, unpack_codes


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(SUPPORTED_BITS), rows=st.integers(1, 4), groups=st.integers(1, 4), data=st.data())
def test_pack_codes_round_trip(bits, rows, groups, data):
    # D*bits must be a multiple of 8: every 8 codes fill exactly `bits` bytes.
    D = 8 * groups
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=rows * D, max_size=rows * D))
    codes = torch.tensor(values, dtype=torch.int64).reshape(rows, D)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, D * bits // 8)
    assert torch.equal(packed, pack_bits(codes, bits))
    assert torch.equal(unpack_codes(packed, bits), codes)
    assert torch.equal(unpack_bits(packed, bits), codes)


def test_four_bit_even_coordinate_is_low_nibble():
    codes = torch.tensor([[0x3, 0xA] * 4])
    assert pack_codes(codes, 4)[0, 0].item() == 0xA3


@pytest.mark.parametrize("D", SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_allocate_quantized_kv_shapes(D, bits):
    codes, norms = torch_tq.allocate_quantized_kv(2, 3, 5, D, bits)
    assert codes.shape == (2, 3, 5, D * bits // 8) and codes.dtype == torch.uint8
    assert norms.shape == (2, 3, 5, max(1, D // 256)) and norms.dtype == torch.float32
    assert row_bytes(D, bits) == D * bits // 8 and norm_blocks(D) == max(1, D // 256)
    assert torch_tq.quantized_nbytes(2, 3, 5, D, bits) == codes.numel() + 4 * norms.numel()


@pytest.mark.parametrize("kwargs, message", [
    (dict(head_dim=96), "head_dim must be one of (64, 128, 256, 512), got 96"),
    (dict(bits=7), "bits must be one of (2, 3, 4, 5, 6, 8), got 7"),
    (dict(capacity=0), "capacity must be >= 1, got 0"),
])
def test_allocate_quantized_kv_rejects(kwargs, message):
    args = dict(batch_size=1, num_kv_heads=2, capacity=4, head_dim=64, bits=4) | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        torch_tq.allocate_quantized_kv(**args)


def test_hadamard_signs_are_fixed_plus_minus_one():
    s = torch_tq.hadamard_signs(128)
    assert s.dtype == torch.float32 and s.shape == (128,)
    assert set(s.tolist()) == {-1.0, 1.0}
    assert torch.equal(s, torch_tq.hadamard_signs(128)), "default signs are part of the storage format"


@pytest.mark.parametrize("head_dim", [96, 32, 1024, 0])
def test_hadamard_signs_rejects_unsupported_head_dim(head_dim):
    with pytest.raises(ValueError, match=rf"^tq.hadamard_signs: head_dim must be one of \(64, 128, 256, 512\), got {head_dim}$"):
        torch_tq.hadamard_signs(head_dim)
