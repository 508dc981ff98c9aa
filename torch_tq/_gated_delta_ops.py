"""The gated-delta-rule ops of ``torch.ops.tq``: schemas, fake kernels and documented wrappers.

Two entry points with FLA's names, argument order and shapes (``chunk_gated_delta_rule`` for
prefill, ``fused_recurrent_gated_delta_rule`` for decode), and the six stages of the chunked form
as ops of their own, so that every backend can implement, test and reuse them one by one::

    g_cum      = chunk_local_cumsum(g)                      # [B, T, HV]        float32
    A          = chunk_scaled_dot_kkt(k, g_cum, beta)       # [B, T, HV, BT]    strictly lower
    A          = solve_tril(A)                              # [B, T, HV, BT]    (I + A)^-1
    w, u       = recompute_w_u(k, v, beta, A, g_cum)        # [B, T, HV, K|V]
    h, v_new, S = chunk_fwd_h(k, w, u, g_cum, h0)           # [B, NT, HV, K, V], [B, T, HV, V], [N, HV, K, V]
    o          = chunk_fwd_o(q, k, v_new, h, g_cum, scale)  # [B, T, HV, V]

Letters: B batch, T tokens, H query/key heads, HV value heads (HV % H == 0; value head i reads
query/key head ``i // (HV / H)``), K and V head dims in (64, 128, 256), BT = 64 the chunk size,
NT the number of chunks (``ceil(T / BT)``, or its sum over the ``cu_seqlens`` sequences), N the
number of sequences (B, or ``len(cu_seqlens) - 1``). The stage ops take q and k already
l2-normalised; their outputs are float32 (float64 for float64 inputs, CPU only).

Final state: a custom-op schema cannot return ``None``, so both entry points always return two
tensors: the state ``[N, HV, K, V]`` when ``output_final_state=True`` and an empty
``[0, HV, K, V]`` tensor otherwise. The Python wrappers turn the empty one into ``None`` (FLA's
return convention).

The stage ops use chunks of BT = 64 (``chunk_local_cumsum`` takes any power of two); their
inputs may be float32/float16/bfloat16 and they accumulate in float32. Chunk rows follow FLA:
row t of ``A`` is token t's row of its chunk's matrix, chunks restart at every ``cu_seqlens``
sequence start, and a partial last chunk of L tokens is an L x L problem.

Kernels: ``torch_tq.backends.cpu.gated_delta_rule`` is registered for CPU and, being plain
PyTorch, also as the CompositeExplicitAutograd kernel, so a device without a native kernel runs
the same code on its own tensors. On CUDA the entry ops call FLA when it is installed, else the
GPU-shaped PyTorch path ``torch_tq.backends.cuda.gated_delta_torch`` (``torch_tq.backends.cuda.gated_delta_rule``). The native MPS extension
(``mps_ops/``, macOS builds) registers Metal kernels for every op under the MPS key, which takes
precedence.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _gated_delta_validation as _v
from .backends import registered_backend_error
from .backends.cpu import gated_delta_rule as _cpu
from .backends.cuda import gated_delta_rule as _cuda

NAMESPACE = "tq"

_ENTRY_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, float? scale=None, Tensor? initial_state=None, "
               "bool output_final_state=False, bool use_qk_l2norm_in_kernel=False, Tensor? cu_seqlens=None")

SCHEMAS = {
    "chunk_gated_delta_rule": f"chunk_gated_delta_rule({_ENTRY_ARGS}) -> (Tensor o, Tensor final_state)",
    "fused_recurrent_gated_delta_rule": f"fused_recurrent_gated_delta_rule({_ENTRY_ARGS}) -> (Tensor o, Tensor final_state)",
    "chunk_local_cumsum": "chunk_local_cumsum(Tensor g, int chunk_size=64, bool reverse=False, float? scale=None, "
    "Tensor? cu_seqlens=None) -> Tensor",
    "chunk_scaled_dot_kkt": "chunk_scaled_dot_kkt(Tensor k, Tensor g, Tensor beta, Tensor? cu_seqlens=None) -> Tensor",
    "solve_tril": "solve_tril(Tensor A, Tensor? cu_seqlens=None) -> Tensor",
    "recompute_w_u": "recompute_w_u(Tensor k, Tensor v, Tensor beta, Tensor A, Tensor g, Tensor? cu_seqlens=None) "
    "-> (Tensor w, Tensor u)",
    "chunk_fwd_h": "chunk_fwd_h(Tensor k, Tensor w, Tensor u, Tensor g, Tensor? initial_state=None, "
    "Tensor? cu_seqlens=None) -> (Tensor h, Tensor v_new, Tensor final_state)",
    "chunk_fwd_o": "chunk_fwd_o(Tensor q, Tensor k, Tensor v, Tensor h, Tensor g, float? scale=None, "
    "Tensor? cu_seqlens=None) -> Tensor",
}

_lib = torch.library.Library(NAMESPACE, "FRAGMENT")
for _schema in SCHEMAS.values():
    _lib.define(_schema)

for _name in SCHEMAS:
    _lib.impl(_name, getattr(_cpu, _name), "CPU")
    # The reference is plain PyTorch, so it also serves every device without a native kernel (the
    # stage ops on CUDA): a kernel registered for a backend key (MPS, CUDA) takes precedence.
    _lib.impl(_name, getattr(_cpu, _name), "CompositeExplicitAutograd")
# CUDA: FLA's kernels for the entry ops when flash-linear-attention is installed (else gated_delta_torch).
for _name in ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"):
    _lib.impl(_name, getattr(_cuda, _name), "CUDA")


def _chunk_count(B: int, T: int, cu_seqlens: Optional[torch.Tensor]):
    """NT for a fake ``h``: known from T without ``cu_seqlens``, data-dependent with it."""
    if cu_seqlens is None:
        return math.ceil(T / _v.CHUNK_SIZE)
    return torch.library.get_ctx().new_dynamic_size()


def _fake_entry(op):
    def fake(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
             use_qk_l2norm_in_kernel=False, cu_seqlens=None):
        geo = _v.check_gated_delta_rule(op, q, k, v, g, beta, scale, initial_state, cu_seqlens)
        state_dtype = _v.compute_dtype(q)
        o = q.new_empty((geo.batch, geo.tokens, geo.value_heads, geo.value_dim))
        n = geo.sequences if output_final_state else 0
        return o, q.new_empty((n, geo.value_heads, geo.head_dim, geo.value_dim), dtype=state_dtype)

    return fake


torch.library.register_fake("tq::chunk_gated_delta_rule")(_fake_entry("chunk_gated_delta_rule"))
torch.library.register_fake("tq::fused_recurrent_gated_delta_rule")(_fake_entry("fused_recurrent_gated_delta_rule"))


@torch.library.register_fake("tq::chunk_local_cumsum")
def _(g, chunk_size=64, reverse=False, scale=None, cu_seqlens=None):
    _v.check_chunk_local_cumsum(g, chunk_size, reverse, scale, cu_seqlens)
    return g.new_empty(g.shape, dtype=_v.compute_dtype(g))


@torch.library.register_fake("tq::chunk_scaled_dot_kkt")
def _(k, g, beta, cu_seqlens=None):
    geo = _v.check_chunk_scaled_dot_kkt(k, g, beta, cu_seqlens)
    return k.new_empty((geo.batch, geo.tokens, geo.value_heads, _v.CHUNK_SIZE), dtype=_v.compute_dtype(k, g, beta))


@torch.library.register_fake("tq::solve_tril")
def _(A, cu_seqlens=None):
    _v.check_solve_tril(A, cu_seqlens)
    return A.new_empty(A.shape, dtype=_v.compute_dtype(A))


@torch.library.register_fake("tq::recompute_w_u")
def _(k, v, beta, A, g, cu_seqlens=None):
    geo = _v.check_recompute_w_u(k, v, beta, A, g, cu_seqlens)
    cd = _v.compute_dtype(k, v, beta, A, g)
    return (k.new_empty((geo.batch, geo.tokens, geo.value_heads, geo.head_dim), dtype=cd),
            k.new_empty((geo.batch, geo.tokens, geo.value_heads, geo.value_dim), dtype=cd))


@torch.library.register_fake("tq::chunk_fwd_h")
def _(k, w, u, g, initial_state=None, cu_seqlens=None):
    geo = _v.check_chunk_fwd_h(k, w, u, g, initial_state, cu_seqlens)
    cd = _v.compute_dtype(k, w, u, g)
    NT = _chunk_count(geo.batch, geo.tokens, cu_seqlens)
    return (k.new_empty((geo.batch, NT, geo.value_heads, geo.head_dim, geo.value_dim), dtype=cd),
            k.new_empty((geo.batch, geo.tokens, geo.value_heads, geo.value_dim), dtype=cd),
            k.new_empty((geo.sequences, geo.value_heads, geo.head_dim, geo.value_dim), dtype=cd))


@torch.library.register_fake("tq::chunk_fwd_o")
def _(q, k, v, h, g, scale=None, cu_seqlens=None):
    geo = _v.check_chunk_fwd_o(q, k, v, h, g, scale, cu_seqlens)
    return q.new_empty((geo.batch, geo.tokens, geo.value_heads, geo.value_dim), dtype=_v.compute_dtype(q, k, v, h, g))


_DISPATCH_KEYS = {"cpu": "CPU", "meta": "Meta", "mps": "MPS", "cuda": "CUDA", "xpu": "XPU"}


def _dispatch(op: str, device: torch.device):
    """The op overload, or a clear RuntimeError when nothing implements it for ``device``."""
    device_type = torch.device(device).type
    key = _DISPATCH_KEYS.get(device_type)
    if key is None or not torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key):
        raise RuntimeError(registered_backend_error(op, device) or f"tq.{op}: no implementation for device '{device_type}'")
    return getattr(torch.ops.tq, op)


def _as_state(initial_state: Optional[torch.Tensor], q: torch.Tensor) -> Optional[torch.Tensor]:
    # FLA reads any floating state as float32; the op itself insists on the carried dtype.
    if initial_state is None:
        return None
    return initial_state.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    r"""Gated delta rule over a whole sequence, chunked (prefill). Drop-in for FLA's function.

    Per value head: ``S <- exp(g_t) S``; ``delta = beta_t (v_t - S^T k_t)``; ``S <- S + k_t delta^T``;
    ``o_t = S^T (scale * q_t)``. Computed in chunks of 64 tokens (DESIGN §5) in float32, with the
    state carried in float32.

    Args:
        q (torch.Tensor):
            queries of shape `[B, T, H, K]`, float32/float16/bfloat16, K in (64, 128, 256).
        k (torch.Tensor):
            keys of shape `[B, T, H, K]`, same dtype as q.
        v (torch.Tensor):
            values of shape `[B, T, HV, V]`, same dtype as q; HV a multiple of H (value head i reads
            query/key head ``i // (HV / H)``), V in (64, 128, 256).
        g (torch.Tensor):
            forget gates in log space (<= 0) of shape `[B, T, HV]`.
        beta (torch.Tensor):
            betas (write strengths) of shape `[B, T, HV]`.
        scale (Optional[float]):
            query scale. Default: ``None``, meaning ``K ** -0.5``.
        initial_state (Optional[torch.Tensor]):
            initial state of shape `[N, HV, K, V]` for N input sequences (N = B without
            ``cu_seqlens``); any float dtype, read as float32. Not modified. Default: ``None`` (zeros).
        output_final_state (bool):
            whether to return the final state. Default: ``False``.
        use_qk_l2norm_in_kernel (bool):
            l2-normalise q and k inside the op (``x / sqrt(sum(x^2) + 1e-6)``). Default: ``False``.
        cu_seqlens (Optional[torch.LongTensor]):
            cumulative sequence lengths `[N+1]` (int32/int64, starting at 0, non-decreasing, ending
            at T) of N sequences packed into one batch row (B must be 1). Each sequence starts from
            its own ``initial_state[n]``; states never cross sequences. Default: ``None``.

    Returns:
        o (torch.Tensor):
            outputs of shape `[B, T, HV, V]` in q's dtype.
        final_state (Optional[torch.Tensor]):
            float32 `[N, HV, K, V]` if ``output_final_state`` else ``None``.

    Examples::
        >>> B, T, H, HV, K, V = 1, 1000, 4, 8, 128, 128
        >>> q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
        >>> v = torch.randn(B, T, HV, V)
        >>> g = torch.nn.functional.logsigmoid(torch.randn(B, T, HV))
        >>> beta = torch.rand(B, T, HV)
        >>> o, ht = torch_tq.chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True,
        ...                                         use_qk_l2norm_in_kernel=True)
        # variable-length: two sequences of 300 and 700 tokens in one row, one state each
        >>> cu_seqlens = torch.tensor([0, 300, 1000])
        >>> o, ht = torch_tq.chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True,
        ...                                         cu_seqlens=cu_seqlens)  # ht: [2, HV, K, V]
    """
    o, final_state = _dispatch("chunk_gated_delta_rule", q.device)(
        q, k, v, g, beta, scale, _as_state(initial_state, q), output_final_state, use_qk_l2norm_in_kernel, cu_seqlens
    )
    return o, (final_state if output_final_state else None)


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    r"""Gated delta rule one token at a time (decode; any T). Same arguments, shapes and result as
    :func:`chunk_gated_delta_rule`, which it equals up to rounding.

    Args:
        q (torch.Tensor): queries `[B, T, H, K]`.
        k (torch.Tensor): keys `[B, T, H, K]`.
        v (torch.Tensor): values `[B, T, HV, V]`.
        g (torch.Tensor): log-space forget gates `[B, T, HV]`.
        beta (torch.Tensor): betas `[B, T, HV]`.
        scale (Optional[float]): query scale. Default: ``None`` (``K ** -0.5``).
        initial_state (Optional[torch.Tensor]): `[N, HV, K, V]`, read as float32. Default: ``None``.
        output_final_state (bool): return the final state. Default: ``False``.
        use_qk_l2norm_in_kernel (bool): l2-normalise q and k inside the op. Default: ``False``.
        cu_seqlens (Optional[torch.LongTensor]): `[N+1]` offsets of packed sequences (B = 1). Default: ``None``.

    Returns:
        o (torch.Tensor): `[B, T, HV, V]` in q's dtype.
        final_state (Optional[torch.Tensor]): float32 `[N, HV, K, V]` if ``output_final_state`` else ``None``.

    Examples::
        # one decode step for a batch of 2 carrying states from the prefill
        >>> o, state = torch_tq.fused_recurrent_gated_delta_rule(
        ...     q[:, -1:], k[:, -1:], v[:, -1:], g[:, -1:], beta[:, -1:],
        ...     initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
    """
    o, final_state = _dispatch("fused_recurrent_gated_delta_rule", q.device)(
        q, k, v, g, beta, scale, _as_state(initial_state, q), output_final_state, use_qk_l2norm_in_kernel, cu_seqlens
    )
    return o, (final_state if output_final_state else None)


def chunk_local_cumsum(
    g: torch.Tensor,
    chunk_size: int = 64,
    reverse: bool = False,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.LongTensor] = None,
) -> torch.Tensor:
    r"""Cumulative sum of the log gates within each chunk (chunks restart at every sequence start).

    Args:
        g (torch.Tensor): log gates `[B, T, HV]`.
        chunk_size (int): a power of two. Default: ``64``.
        reverse (bool): suffix sums (from the chunk's end) instead of prefix sums. Default: ``False``.
        scale (Optional[float]): multiply the result by this. Default: ``None``.
        cu_seqlens (Optional[torch.LongTensor]): `[N+1]` offsets (B = 1). Default: ``None``.

    Returns:
        float32 `[B, T, HV]`.
    """
    return _dispatch("chunk_local_cumsum", g.device)(g, chunk_size, reverse, scale, cu_seqlens)


def chunk_scaled_dot_kkt(
    k: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    cu_seqlens: Optional[torch.LongTensor] = None,
) -> torch.Tensor:
    r"""``A_ij = beta_i (k_i . k_j) exp(g_i - g_j)`` for ``j < i`` in the same chunk, else 0.

    Args:
        k (torch.Tensor): keys `[B, T, H, K]` (l2-normalised if the model does so).
        g (torch.Tensor): within-chunk cumulative log gates `[B, T, HV]` (:func:`chunk_local_cumsum`).
        beta (torch.Tensor): betas `[B, T, HV]`.
        cu_seqlens (Optional[torch.LongTensor]): `[N+1]` offsets (B = 1). Default: ``None``.

    Returns:
        float32 `[B, T, HV, BT]`: row t holds token t's row of its chunk's matrix (column j is the
        chunk's j-th token; zero from the diagonal on).
    """
    return _dispatch("chunk_scaled_dot_kkt", k.device)(k, g, beta, cu_seqlens)


def solve_tril(A: torch.Tensor, cu_seqlens: Optional[torch.LongTensor] = None) -> torch.Tensor:
    r"""``(I + A)^-1`` of every chunk's ``[BT, BT]`` matrix (only A's strictly lower triangle is read).

    Args:
        A (torch.Tensor): `[B, T, HV, BT]` as produced by :func:`chunk_scaled_dot_kkt`.
        cu_seqlens (Optional[torch.LongTensor]): `[N+1]` offsets (B = 1). Default: ``None``.

    Returns:
        float32 `[B, T, HV, BT]`, lower triangular with a unit diagonal (a partial last chunk of
        length L is the inverse of its own L x L matrix).
    """
    return _dispatch("solve_tril", A.device)(A, cu_seqlens)


def recompute_w_u(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    A: torch.Tensor,
    g: torch.Tensor,
    cu_seqlens: Optional[torch.LongTensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The WY factors of each chunk: ``w = A (beta * exp(g) * k)`` and ``u = A (beta * v)``.

    Args:
        k (torch.Tensor): keys `[B, T, H, K]`.
        v (torch.Tensor): values `[B, T, HV, V]`.
        beta (torch.Tensor): betas `[B, T, HV]`.
        A (torch.Tensor): `[B, T, HV, BT]` from :func:`solve_tril` (lower triangle, diagonal included, is read).
        g (torch.Tensor): within-chunk cumulative log gates `[B, T, HV]`.
        cu_seqlens (Optional[torch.LongTensor]): `[N+1]` offsets (B = 1). Default: ``None``.

    Returns:
        w (torch.Tensor): float32 `[B, T, HV, K]`.
        u (torch.Tensor): float32 `[B, T, HV, V]`.
    """
    return _dispatch("recompute_w_u", k.device)(k, v, beta, A, g, cu_seqlens)


def chunk_fwd_h(
    k: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    g: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.LongTensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The sequential pass over chunks. With S the state entering chunk c (``h[:, c] = S``)::

        v_new = u - w S
        S    <- exp(g_last) S + (exp(g_last - g) * k)^T v_new

    Args:
        k (torch.Tensor): keys `[B, T, H, K]`.
        w (torch.Tensor): `[B, T, HV, K]` from :func:`recompute_w_u`.
        u (torch.Tensor): `[B, T, HV, V]` from :func:`recompute_w_u`.
        g (torch.Tensor): within-chunk cumulative log gates `[B, T, HV]`.
        initial_state (Optional[torch.Tensor]): float32 `[N, HV, K, V]`. Default: ``None`` (zeros).
        cu_seqlens (Optional[torch.LongTensor]): `[N+1]` offsets (B = 1). Default: ``None``.

    Returns:
        h (torch.Tensor): float32 `[B, NT, HV, K, V]`, the state entering each chunk (with
            ``cu_seqlens``: sequence 0's chunks, then sequence 1's, ...).
        v_new (torch.Tensor): float32 `[B, T, HV, V]`.
        final_state (torch.Tensor): float32 `[N, HV, K, V]`.
    """
    return _dispatch("chunk_fwd_h", k.device)(k, w, u, g, initial_state, cu_seqlens)


def chunk_fwd_o(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    h: torch.Tensor,
    g: torch.Tensor,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.LongTensor] = None,
) -> torch.Tensor:
    r"""The chunk outputs ``o = scale [(q * exp(g)) h + ((q k^T) * exp(g_i - g_j) * [j <= i]) v]``.

    Args:
        q (torch.Tensor): queries `[B, T, H, K]` (l2-normalised if the model does so).
        k (torch.Tensor): keys `[B, T, H, K]`.
        v (torch.Tensor): the corrected values ``v_new`` `[B, T, HV, V]` from :func:`chunk_fwd_h`.
        h (torch.Tensor): chunk states `[B, NT, HV, K, V]` from :func:`chunk_fwd_h`.
        g (torch.Tensor): within-chunk cumulative log gates `[B, T, HV]`.
        scale (Optional[float]): query scale. Default: ``None`` (``K ** -0.5``).
        cu_seqlens (Optional[torch.LongTensor]): `[N+1]` offsets (B = 1). Default: ``None``.

    Returns:
        float32 `[B, T, HV, V]`.
    """
    return _dispatch("chunk_fwd_o", q.device)(q, k, v, h, g, scale, cu_seqlens)


__all__ = [
    "chunk_fwd_h",
    "chunk_fwd_o",
    "chunk_gated_delta_rule",
    "chunk_local_cumsum",
    "chunk_scaled_dot_kkt",
    "fused_recurrent_gated_delta_rule",
    "recompute_w_u",
    "solve_tril",
]
