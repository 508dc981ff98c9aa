"""Argument validation of the gated-delta-rule ops, shared by the fake kernels and every backend.

Each ``check_<op>`` raises ``ValueError("tq.<op>: <rule>, got <value>")`` and returns the geometry
the implementations need. Shape and dtype rules are checked everywhere, fake tensors included; the
rules on the *values* of ``cu_seqlens`` (start at 0, non-decreasing, end at T) need the data, so
``check_cu_seqlens_values`` runs in the real kernels only.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch

from ._validation import _check_rank, _check_same_device, _fail, _shape

# Head dims K (queries/keys) and V (values) the kernels are written for.
GDR_HEAD_DIMS = (64, 128, 256)
# Chunk length of the chunked form; the stage tensors A and h carry it in their shapes.
CHUNK_SIZE = 64
# float64 is accepted on CPU (computed in float64, the reference precision of the tests); the
# other backends have no float64 and reject it through their device.
GDR_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_NAMES = "float32, float16, bfloat16 or float64"


class GatedDeltaGeometry(NamedTuple):
    batch: int
    tokens: int
    heads: int
    value_heads: int
    head_dim: int
    value_dim: int
    sequences: int


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 when any of ``tensors`` is float64, else float32: the accumulation dtype, and the dtype
    of the state and of the stage outputs. The entry ops decide on q alone (q, k and v share a dtype)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in GDR_FLOAT_DTYPES:
        _fail(op, f"{name} must be {_DTYPE_NAMES}, got {t.dtype}")


def _expect_shape(op: str, name: str, t: torch.Tensor, shape: Sequence[int], letters: str) -> None:
    if tuple(t.shape) != tuple(shape):
        _fail(op, f"{name} must have shape {letters} = [{', '.join(str(s) for s in shape)}], got {_shape(t)}")


def _check_dims(op: str, K: int, V: Optional[int] = None) -> None:
    if K not in GDR_HEAD_DIMS:
        _fail(op, f"head dim K must be one of {GDR_HEAD_DIMS}, got {K}")
    if V is not None and V not in GDR_HEAD_DIMS:
        _fail(op, f"value head dim V must be one of {GDR_HEAD_DIMS}, got {V}")


def _check_heads(op: str, H: int, HV: int) -> None:
    if H < 1 or HV % H != 0:
        _fail(op, f"value heads HV={HV} must be a multiple of query/key heads H={H}")


def _check_cu_seqlens(op: str, cu_seqlens: Optional[torch.Tensor], B: int) -> int:
    """Shape and dtype of ``cu_seqlens``; returns N, the number of sequences (B without it)."""
    if cu_seqlens is None:
        return B
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        _fail(op, f"cu_seqlens must have shape [N+1] with N >= 1, got shape {_shape(cu_seqlens)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        _fail(op, f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if B != 1:
        _fail(op, f"cu_seqlens requires batch size B=1 (flatten the sequences into one), got B={B}")
    return cu_seqlens.shape[0] - 1


def check_cu_seqlens_values(op: str, cu_seqlens: Optional[torch.Tensor], T: int) -> list[int]:
    """The value rules of ``cu_seqlens``; returns the offsets as a list (one device read)."""
    if cu_seqlens is None:
        return []
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        _fail(op, f"cu_seqlens must start at 0, got {offsets[0]}")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        _fail(op, f"cu_seqlens must be non-decreasing, got {offsets}")
    if offsets[-1] != T:
        _fail(op, f"cu_seqlens must end at T={T}, got {offsets[-1]}")
    return offsets


def _check_state(op: str, name: str, state: Optional[torch.Tensor], shape: Sequence[int], input_dtype: torch.dtype) -> None:
    if state is None:
        return
    _check_rank(op, name, state, 4, "[N, HV, K, V]")
    _expect_shape(op, name, state, shape, "[N, HV, K, V]")
    expected = torch.float64 if input_dtype == torch.float64 else torch.float32
    if state.dtype != expected:
        _fail(op, f"{name} must be {str(expected).replace('torch.', '')} (the state is carried in "
                  f"{str(expected).replace('torch.', '')}), got {state.dtype}")


def _check_gate(op: str, name: str, t: torch.Tensor, B: int, T: int, HV: int) -> None:
    _check_rank(op, name, t, 3, "[B, T, HV]")
    _check_float(op, name, t)
    _expect_shape(op, name, t, (B, T, HV), "[B, T, HV]")


def check_gated_delta_rule(op: str, q, k, v, g, beta, scale, initial_state, cu_seqlens) -> GatedDeltaGeometry:
    """Rules shared by ``chunk_gated_delta_rule`` and ``fused_recurrent_gated_delta_rule``."""
    _check_rank(op, "q", q, 4, "[B, T, H, K]")
    _check_rank(op, "k", k, 4, "[B, T, H, K]")
    _check_rank(op, "v", v, 4, "[B, T, HV, V]")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(op, name, t)
    if not (q.dtype == k.dtype == v.dtype):
        _fail(op, f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    B, T, H, K = q.shape
    _expect_shape(op, "k", k, q.shape, "[B, T, H, K] (the shape of q)")
    if tuple(v.shape[:2]) != (B, T):
        _fail(op, f"v must have [B, T] = [{B}, {T}] to match q, got shape {_shape(v)}")
    HV, V = v.shape[2], v.shape[3]
    if T < 1:
        _fail(op, f"q must hold T >= 1 tokens, got T={T}")
    _check_dims(op, K, V)
    _check_heads(op, H, HV)
    _check_gate(op, "g", g, B, T, HV)
    _check_gate(op, "beta", beta, B, T, HV)
    _check_same_device(op, {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": initial_state,
                            "cu_seqlens": cu_seqlens})
    if scale is not None and not math.isfinite(scale):
        _fail(op, f"scale must be finite (None means K^-0.5), got {scale}")
    N = _check_cu_seqlens(op, cu_seqlens, B)
    _check_state(op, "initial_state", initial_state, (N, HV, K, V), q.dtype)
    return GatedDeltaGeometry(B, T, H, HV, K, V, N)


def check_chunk_local_cumsum(g, chunk_size: int, reverse: bool, scale, cu_seqlens) -> tuple[int, int, int]:
    op = "chunk_local_cumsum"
    _check_rank(op, "g", g, 3, "[B, T, HV]")
    _check_float(op, "g", g)
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        _fail(op, f"chunk_size must be a power of two, got {chunk_size}")
    if scale is not None and not math.isfinite(scale):
        _fail(op, f"scale must be finite, got {scale}")
    _check_same_device(op, {"g": g, "cu_seqlens": cu_seqlens})
    B, T, HV = g.shape
    _check_cu_seqlens(op, cu_seqlens, B)
    return B, T, HV


def _check_keys(op: str, name: str, k) -> tuple[int, int, int, int]:
    _check_rank(op, name, k, 4, "[B, T, H, K]")
    _check_float(op, name, k)
    B, T, H, K = k.shape
    _check_dims(op, K)
    return B, T, H, K


def _check_value_heads(op: str, name: str, t, B: int, T: int, letters: str) -> int:
    """A value-head tensor ``[B, T, HV]`` or ``[B, T, HV, X]``; returns HV."""
    _check_rank(op, name, t, len(letters.split(",")), letters)
    _check_float(op, name, t)
    if tuple(t.shape[:2]) != (B, T):
        _fail(op, f"{name} must have [B, T] = [{B}, {T}] to match k, got shape {_shape(t)}")
    return t.shape[2]


def _check_chunk_matrix(op: str, name: str, A, B: int, T: int, HV: int) -> None:
    _check_rank(op, name, A, 4, "[B, T, HV, BT]")
    _check_float(op, name, A)
    _expect_shape(op, name, A, (B, T, HV, CHUNK_SIZE), "[B, T, HV, BT]")


def check_chunk_scaled_dot_kkt(k, g, beta, cu_seqlens) -> GatedDeltaGeometry:
    op = "chunk_scaled_dot_kkt"
    B, T, H, K = _check_keys(op, "k", k)
    HV = _check_value_heads(op, "beta", beta, B, T, "[B, T, HV]")
    _check_heads(op, H, HV)
    _check_gate(op, "g", g, B, T, HV)
    _check_same_device(op, {"k": k, "g": g, "beta": beta, "cu_seqlens": cu_seqlens})
    N = _check_cu_seqlens(op, cu_seqlens, B)
    return GatedDeltaGeometry(B, T, H, HV, K, 0, N)


def check_solve_tril(A, cu_seqlens) -> GatedDeltaGeometry:
    op = "solve_tril"
    _check_rank(op, "A", A, 4, "[B, T, HV, BT]")
    _check_float(op, "A", A)
    B, T, HV, BT = A.shape
    if BT != CHUNK_SIZE:
        _fail(op, f"A last dim must be the chunk size BT={CHUNK_SIZE}, got {BT}")
    _check_same_device(op, {"A": A, "cu_seqlens": cu_seqlens})
    N = _check_cu_seqlens(op, cu_seqlens, B)
    return GatedDeltaGeometry(B, T, 0, HV, 0, 0, N)


def check_recompute_w_u(k, v, beta, A, g, cu_seqlens) -> GatedDeltaGeometry:
    op = "recompute_w_u"
    B, T, H, K = _check_keys(op, "k", k)
    HV = _check_value_heads(op, "v", v, B, T, "[B, T, HV, V]")
    V = v.shape[3]
    _check_dims(op, K, V)
    _check_heads(op, H, HV)
    _check_gate(op, "beta", beta, B, T, HV)
    _check_chunk_matrix(op, "A", A, B, T, HV)
    _check_gate(op, "g", g, B, T, HV)
    _check_same_device(op, {"k": k, "v": v, "beta": beta, "A": A, "g": g, "cu_seqlens": cu_seqlens})
    N = _check_cu_seqlens(op, cu_seqlens, B)
    return GatedDeltaGeometry(B, T, H, HV, K, V, N)


def check_chunk_fwd_h(k, w, u, g, initial_state, cu_seqlens) -> GatedDeltaGeometry:
    op = "chunk_fwd_h"
    B, T, H, K = _check_keys(op, "k", k)
    HV = _check_value_heads(op, "u", u, B, T, "[B, T, HV, V]")
    V = u.shape[3]
    _check_dims(op, K, V)
    _check_heads(op, H, HV)
    _check_rank(op, "w", w, 4, "[B, T, HV, K]")
    _check_float(op, "w", w)
    _expect_shape(op, "w", w, (B, T, HV, K), "[B, T, HV, K]")
    _check_gate(op, "g", g, B, T, HV)
    _check_same_device(op, {"k": k, "w": w, "u": u, "g": g, "initial_state": initial_state, "cu_seqlens": cu_seqlens})
    N = _check_cu_seqlens(op, cu_seqlens, B)
    _check_state(op, "initial_state", initial_state, (N, HV, K, V), compute_dtype(k, w, u, g))
    return GatedDeltaGeometry(B, T, H, HV, K, V, N)


def check_chunk_fwd_o(q, k, v, h, g, scale, cu_seqlens) -> GatedDeltaGeometry:
    op = "chunk_fwd_o"
    B, T, H, K = _check_keys(op, "q", q)
    _check_rank(op, "k", k, 4, "[B, T, H, K]")
    _check_float(op, "k", k)
    _expect_shape(op, "k", k, q.shape, "[B, T, H, K] (the shape of q)")
    HV = _check_value_heads(op, "v", v, B, T, "[B, T, HV, V]")
    V = v.shape[3]
    _check_dims(op, K, V)
    _check_heads(op, H, HV)
    _check_rank(op, "h", h, 5, "[B, NT, HV, K, V]")
    _check_float(op, "h", h)
    if h.shape[0] != B or tuple(h.shape[2:]) != (HV, K, V):
        _fail(op, f"h must have shape [B, NT, HV, K, V] = [{B}, NT, {HV}, {K}, {V}], got {_shape(h)}")
    if cu_seqlens is None and h.shape[1] != math.ceil(T / CHUNK_SIZE):
        _fail(op, f"h must hold NT = ceil(T/BT) = {math.ceil(T / CHUNK_SIZE)} chunk states, got {h.shape[1]}")
    _check_gate(op, "g", g, B, T, HV)
    if scale is not None and not math.isfinite(scale):
        _fail(op, f"scale must be finite (None means K^-0.5), got {scale}")
    _check_same_device(op, {"q": q, "k": k, "v": v, "h": h, "g": g, "cu_seqlens": cu_seqlens})
    N = _check_cu_seqlens(op, cu_seqlens, B)
    return GatedDeltaGeometry(B, T, H, HV, K, V, N)
