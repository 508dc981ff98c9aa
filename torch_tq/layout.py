"""Geometry of the packed TurboQuant KV cache (DESIGN §5): one place for every byte count and index formula.

Per K or V tensor of one layer:

* ``codes``  uint8   ``[B, Hkv, C, D*b/8]`` — a little-endian bitstream per row: code ``i`` occupies
  bits ``i*b … i*b+b-1`` and bit ``k`` is bit ``k % 8`` of byte ``k // 8`` (for b=4 the even
  coordinate is the low nibble).
* ``norms``  float32 ``[B, Hkv, C, D/R]`` — the L2 norm of each rotation block of R = min(D, 256)
  coordinates.

A token at absolute position ``p`` lives in slot ``p`` of a global cache (``p < C``) and in slot
``p mod C`` of a sliding-window (ring) cache.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

SUPPORTED_HEAD_DIMS = (64, 128, 256, 512)
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
# The Walsh-Hadamard rotation works on blocks of at most 256 coordinates: one Metal simdgroup
# (32 lanes x 8 values) holds a block in registers.
MAX_ROTATION_BLOCK = 256
# Seed of the default sign vector; part of the storage format (a cache must be decoded with the
# signs it was encoded with).
DEFAULT_SIGN_SEED = 0x7197


def rotation_block(head_dim: int) -> int:
    """R = min(D, 256): the size of one Walsh-Hadamard block."""
    return min(head_dim, MAX_ROTATION_BLOCK)


def norm_blocks(head_dim: int) -> int:
    """D / R: the number of norms stored per vector."""
    return head_dim // rotation_block(head_dim)


def row_bytes(head_dim: int, bits: int) -> int:
    """D * b / 8: the bytes of packed codes per vector (exact for every supported D and b)."""
    return head_dim * bits // 8


def num_levels(bits: int) -> int:
    return 1 << bits


def cache_slot(position: int, capacity: int) -> int:
    """The slot of absolute position ``position`` (ring buffer; identical to ``position`` in a global cache)."""
    return position % capacity


def valid_positions(kv_len: int, capacity: int) -> tuple[int, int]:
    """Half-open range ``[lo, kv_len)`` of positions still held by a cache after ``kv_len`` tokens."""
    return max(0, kv_len - capacity), kv_len


def ring_write_slots(num_tokens: int, write_pos: int, capacity: int, is_sliding: bool) -> tuple[int, torch.Tensor]:
    """(index of the first token kept, slot of each kept token) for a write of ``num_tokens`` at ``write_pos``.

    A ring (sliding) write of more than C tokens keeps only the last C; a global write is validated
    to fit (``write_pos + T <= C``) before this is called.
    """
    first = max(0, num_tokens - capacity) if is_sliding else 0
    positions = torch.arange(write_pos + first, write_pos + num_tokens)
    return first, positions % capacity


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[..., D]`` (values < 2^bits) into the bitstream ``[..., D*bits/8]`` uint8.

    Every 8 consecutive codes fill exactly ``bits`` bytes, so each group is assembled as one
    little-endian 64-bit word and split into bytes.
    """
    head_dim = codes.shape[-1]
    groups = codes.to(torch.int64).reshape(*codes.shape[:-1], head_dim // 8, 8)
    code_shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (groups << code_shifts).sum(-1, keepdim=True)  # [..., D/8, 1]; the fields do not overlap
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    packed = (word >> byte_shifts) & 0xFF  # [..., D/8, bits]
    return packed.to(torch.uint8).reshape(*codes.shape[:-1], row_bytes(head_dim, bits))


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[..., D*bits/8]`` uint8 → int64 codes ``[..., D]``."""
    nbytes = packed.shape[-1]
    if 8 % bits == 0:
        # Byte-aligned widths: each byte holds 8/bits whole codes; stay in uint8 (fast on CPU).
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*packed.shape[:-1], nbytes * 8 // bits).to(torch.int64)
    groups = packed.to(torch.int64).reshape(*packed.shape[:-1], nbytes // bits, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (groups << byte_shifts).sum(-1, keepdim=True)  # [..., D/8, 1]
    code_shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (word >> code_shifts) & ((1 << bits) - 1)  # [..., D/8, 8]
    return codes.reshape(*packed.shape[:-1], nbytes * 8 // bits)


def hadamard_signs(head_dim: int, seed: int = DEFAULT_SIGN_SEED, device=None) -> torch.Tensor:
    """The fixed pseudo-random ±1 float32 sign vector ``s`` of length D applied before the rotation.

    Without it the plain Hadamard transform does not decorrelate structured real K/V well
    (DESIGN §5); every op applies it when its ``signs`` argument is ``None`` (:func:`resolve_signs`). Raises ``ValueError`` for a
    head_dim the ops do not support, so the mistake shows here and not at the first op call.
    """
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"tq.hadamard_signs: head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    gen = torch.Generator().manual_seed(seed + head_dim)
    bits = torch.randint(0, 2, (head_dim,), generator=gen)
    return (1.0 - 2.0 * bits.to(torch.float32)).to(device)


_canonical_signs: dict[tuple[int, torch.device], torch.Tensor] = {}


def resolve_signs(signs: torch.Tensor | None, head_dim: int, device) -> torch.Tensor:
    """The sign vector an op applies: ``signs`` when given, else the canonical :func:`hadamard_signs` of ``head_dim``.

    ``signs=None`` means the canonical signs on every op and backend, so a cache written and read
    with the default agrees, and one written with ``hadamard_signs(D)`` reads correctly without it.
    The plain Walsh-Hadamard transform takes an explicit ``torch.ones(D)``. One tensor per
    (head_dim, device) is kept, so a decode step (or a CUDA graph) never re-creates it.
    """
    if signs is not None:
        return signs
    key = (head_dim, torch.device(device))
    cached = _canonical_signs.get(key)
    if cached is None:
        cached = _canonical_signs[key] = hadamard_signs(head_dim, device=key[1])
    return cached


class QuantizedKV(NamedTuple):
    """One packed K or V tensor of a layer: ``codes`` ``[B, Hkv, C, D*b/8]`` uint8 and ``norms`` ``[B, Hkv, C, D/R]`` float32."""

    codes: torch.Tensor
    norms: torch.Tensor


def allocate_quantized_kv(
    batch_size: int,
    num_kv_heads: int,
    capacity: int,
    head_dim: int,
    bits: int = 4,
    device: torch.device | str | None = None,
) -> QuantizedKV:
    """Allocate a zeroed, correctly shaped and typed ``(codes, norms)`` pair for one K or V cache.

    Raises ``ValueError`` for an unsupported ``head_dim`` or ``bits`` or a non-positive size.
    """
    for name, value in (("batch_size", batch_size), ("num_kv_heads", num_kv_heads), ("capacity", capacity)):
        if value < 1:
            raise ValueError(f"tq.allocate_quantized_kv: {name} must be >= 1, got {value}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"tq.allocate_quantized_kv: head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"tq.allocate_quantized_kv: bits must be one of {SUPPORTED_BITS}, got {bits}")
    codes = torch.zeros(batch_size, num_kv_heads, capacity, row_bytes(head_dim, bits), dtype=torch.uint8, device=device)
    norms = torch.zeros(batch_size, num_kv_heads, capacity, norm_blocks(head_dim), dtype=torch.float32, device=device)
    return QuantizedKV(codes, norms)


def quantized_nbytes(batch_size: int, num_kv_heads: int, capacity: int, head_dim: int, bits: int) -> int:
    """Bytes of one packed K or V cache (codes + norms)."""
    per_slot = row_bytes(head_dim, bits) + 4 * norm_blocks(head_dim)
    return batch_size * num_kv_heads * capacity * per_slot
