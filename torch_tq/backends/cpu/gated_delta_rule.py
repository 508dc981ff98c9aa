"""CPU reference of the gated delta rule (DESIGN §5): the chunked pipeline stage by stage, and the recurrence.

Plain PyTorch, computed in float32 (float64 when an input is float64) with the state carried in
that dtype. The chunked form is vectorized over sequences, heads and chunks; only the state pass
loops, once per chunk. The recurrent form loops over tokens. No device-specific code: the same
functions run on any device that has no native kernel (see ``_gated_delta_ops``).

Every stage works on one internal layout: a sequence axis N (the batch rows, or the ``cu_seqlens``
sequences) with each sequence zero-padded to whole chunks, chunk-major, ``[NC, N, Hx, BT, D]``
(so the state pass reads contiguous slices). A padded token has k = v = q = 0, beta = 0 and a raw
gate g = 0 (so its cumulative gate equals the last real token's in its chunk, and an all-padding
chunk does not decay the state): it adds nothing to A, w, u or the state, and its outputs are
dropped. That is how a partial last chunk and ``cu_seqlens`` are handled exactly, and why states
never leak between sequences. GVA: value head i reads query/key head ``i // (HV / H)``; the
key-side products (k kᵀ, q kᵀ) are computed once per key head and broadcast over its HV / H
value heads.

The stage ops follow FLA's decomposition (and are what a native backend implements one by one);
the entry op ``chunk_gated_delta_rule`` fuses ``recompute_w_u``, ``chunk_fwd_h`` and
``chunk_fwd_o`` into one pass (``fused_chunk_pass``) that never stores w, u or the chunk states,
and runs ``SEGMENT_CHUNKS`` chunks at a time so its memory does not grow with T beyond the inputs
and the output.

The ``<op>`` functions at the bottom are the ``torch.ops.tq`` kernels: validation, then the math
(``chunk_gated_delta_rule_fwd`` / ``fused_recurrent_gated_delta_rule_fwd`` for the entry ops, which
take resolved arguments and also accept float64, and the ``*_chunks`` functions for the stages).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ... import _gated_delta_validation as _v

BT = _v.CHUNK_SIZE
L2NORM_EPS = 1e-6
# Diagonal blocks of the unit-lower-triangular inverse are solved by forward substitution at this
# size, then merged pairwise (8 -> 16 -> 32 -> 64): a few batched matmuls instead of 63 dependent
# steps (8 measured fastest on CPU; the result does not depend on it beyond rounding).
_SOLVE_BLOCK = 8
# The entry op runs the pipeline on this many chunks at a time, carrying the state between
# segments: exact (chunks only interact through the state) and it bounds the memory of the
# [.., BT, BT] matrices and chunk states to O(segment) instead of O(T).
SEGMENT_CHUNKS = 16


class _Packing:
    """Maps the token axis of ``[B, T, ...]`` to per-sequence, chunk-padded rows ``[N, Tp, ...]``.

    ``Tp`` is the longest sequence rounded up to ``block``. Without ``cu_seqlens`` the N = B rows
    are the batch rows; with it (B = 1) row n holds tokens ``cu_seqlens[n] … cu_seqlens[n+1]-1``.
    """

    def __init__(self, B: int, T: int, offsets: list[int], block: int, device: torch.device):
        if offsets:
            starts, lengths = offsets[:-1], [b - a for a, b in zip(offsets, offsets[1:])]
        else:
            starts, lengths = [b * T for b in range(B)], [T] * B
        self.B, self.T, self.N, self.block = B, T, len(lengths), block
        self.chunks = [math.ceil(n / block) for n in lengths]
        self.NC = max(self.chunks, default=0)
        self.Tp = self.NC * block
        self.trivial = not offsets and T == self.Tp
        if self.trivial:
            return
        pos = torch.arange(self.Tp, device=device)
        length = torch.tensor(lengths, dtype=torch.long, device=device)
        self.valid = pos[None, :] < length[:, None]  # [N, Tp]
        # Slots of a sequence's last, partial chunk (edge-filled); later, all-padding chunks stay 0.
        self.in_chunk = pos[None, :] < torch.tensor(self.chunks, dtype=torch.long, device=device)[:, None] * block
        # A padded slot reads the sequence's last real token (its cumulative gate is the chunk's last).
        last = (length - 1).clamp(min=0)
        index = torch.tensor(starts, dtype=torch.long, device=device)[:, None] + torch.minimum(pos[None, :], last[:, None])
        self.index = index.clamp(max=max(B * T - 1, 0)).flatten()
        self.rows = self.valid.flatten().nonzero().squeeze(1)
        # Position of each sequence's chunks in the [N * NC] grid, in sequence order.
        self.chunk_rows = torch.tensor([n * self.NC + c for n, nc in enumerate(self.chunks) for c in range(nc)],
                                       device=device, dtype=torch.long)

    def pack(self, x: torch.Tensor, edge: bool = False) -> torch.Tensor:
        """``[B, T, *rest]`` -> ``[N, Tp, *rest]``; padded slots are 0, or, with ``edge``, repeat the last
        real token within its chunk (a cumulative gate then keeps the chunk's last value)."""
        rest = x.shape[2:]
        if self.trivial:
            return x.reshape(self.N, self.Tp, *rest)
        y = x.reshape(self.B * self.T, *rest).index_select(0, self.index).view(self.N, self.Tp, *rest)
        keep = self.in_chunk if edge else self.valid
        return torch.where(keep.view(self.N, self.Tp, *([1] * len(rest))), y, y.new_zeros(()))

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """``[N, Tp, *rest]`` -> ``[B, T, *rest]``, dropping the padded slots."""
        rest = y.shape[2:]
        if self.trivial:
            return y.reshape(self.B, self.T, *rest)
        return y.reshape(self.N * self.Tp, *rest).index_select(0, self.rows).view(self.B, self.T, *rest)

    def pack_states(self, h: torch.Tensor) -> torch.Tensor:
        """Chunk states in FLA order ``[B, NT, *rest]`` -> ``[N, NC, *rest]`` (padded chunks are 0)."""
        rest = h.shape[2:]
        if not hasattr(self, "chunk_rows"):
            return h
        out = h.new_zeros(self.N * self.NC, *rest)
        out.index_copy_(0, self.chunk_rows, h.reshape(-1, *rest))
        return out.view(self.N, self.NC, *rest)

    def unpack_states(self, h: torch.Tensor) -> torch.Tensor:
        """``[N, NC, *rest]`` -> FLA order ``[B, NT, *rest]``: each sequence's chunks, sequences one after another."""
        rest = h.shape[2:]
        if not hasattr(self, "chunk_rows"):
            return h
        return h.reshape(self.N * self.NC, *rest).index_select(0, self.chunk_rows).view(self.B, -1, *rest)


def _packing(B: int, T: int, cu_seqlens: Optional[torch.Tensor], block: int, device, op: str) -> _Packing:
    return _Packing(B, T, _v.check_cu_seqlens_values(op, cu_seqlens, T), block, device)


def _to_chunks(y: torch.Tensor) -> torch.Tensor:
    """``[N, Tp, Hx, *D]`` -> contiguous chunk-major ``[NC, N, Hx, BT, *D]``."""
    N, Tp, Hx = y.shape[:3]
    return y.reshape(N, Tp // BT, BT, Hx, *y.shape[3:]).permute(1, 0, 3, 2, *range(4, y.dim() + 1)).contiguous()


def _from_chunks(c: torch.Tensor) -> torch.Tensor:
    """``[NC, N, Hx, BT, *D]`` -> ``[N, Tp, Hx, *D]``."""
    NC, N, Hx = c.shape[:3]
    return c.permute(1, 0, 3, 2, *range(4, c.dim())).reshape(N, NC * BT, Hx, *c.shape[4:])


def _groups(value_heads: torch.Tensor, key_heads: int) -> torch.Tensor:
    """View a value-head tensor ``[NC, N, HV, ...]`` as ``[NC, N, H, HV/H, ...]`` (value head i reads key
    head i // (HV/H)), so that key-head tensors ``[NC, N, H, 1, ...]`` broadcast against it."""
    NC, N, HV = value_heads.shape[:3]
    return value_heads.view(NC, N, key_heads, HV // key_heads, *value_heads.shape[3:])


def _decay_matrix(Gc: torch.Tensor, strict: bool) -> torch.Tensor:
    """``exp(G_i - G_j)`` for ``i > j`` (``i >= j`` unless ``strict``), else 0: ``[..., BT] -> [..., BT, BT]``.

    The mask is applied to the exponent, before exp, so only differences ``<= 0`` are exponentiated.
    """
    n = Gc.shape[-1]
    keep = torch.ones(n, n, dtype=torch.bool, device=Gc.device).tril(-1 if strict else 0)
    return (Gc[..., :, None] - Gc[..., None, :]).masked_fill_(~keep, float("-inf")).exp_()


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + 1e-6)`` over the last dim (FLA's and transformers' q/k normalisation)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


def local_cumsum_chunks(gc: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    if reverse:
        return gc.flip(-1).cumsum(-1).flip(-1)
    return gc.cumsum(-1)


def _per_value_head(x_key: torch.Tensor, scale_value: torch.Tensor) -> torch.Tensor:
    """``x[key head of i] * scale[i]`` for every value head i: ``[NC, N, H, BT, D] x [NC, N, HV, BT] -> [NC, N, HV, BT, D]``."""
    H = x_key.shape[2]
    return (x_key.unsqueeze(3) * _groups(scale_value.unsqueeze(-1), H)).flatten(2, 3)


def kkt_chunks(kc: torch.Tensor, Gc: torch.Tensor, betac: torch.Tensor, decay: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``A_ij = beta_i (k_i . k_j) exp(G_i - G_j)`` for i > j, else 0. kc ``[NC, N, H, BT, K]``,
    Gc/betac ``[NC, N, HV, BT]`` -> ``[NC, N, HV, BT, BT]``. ``decay`` may pass in the inclusive
    ``_decay_matrix(Gc, strict=False)`` already computed for the output stage."""
    H = kc.shape[2]
    kk = kc @ kc.transpose(-1, -2)  # [NC, N, H, BT, BT]: once per key head
    if decay is None:
        decay = _decay_matrix(Gc, strict=True)
    A = (_groups(decay * betac[..., :, None], H) * kk.unsqueeze(3)).flatten(2, 3)
    A.diagonal(dim1=-2, dim2=-1).zero_()
    return A


def _forward_substitution(L: torch.Tensor) -> torch.Tensor:
    """``(I + L)^-1`` of small strictly-lower ``L [..., b, b]``, one row at a time."""
    b = L.shape[-1]
    T = torch.eye(b, dtype=L.dtype, device=L.device).expand(L.shape).clone()
    for i in range(1, b):
        T[..., i, :i] = -(L[..., i : i + 1, :i] @ T[..., :i, :i]).squeeze(-2)
    return T


def solve_tril_chunks(A: torch.Tensor) -> torch.Tensor:
    """``(I + tril(A, -1))^-1`` of every ``[BT, BT]`` matrix of ``A [..., BT, BT]`` (only the strictly
    lower triangle of A is read). Block inverse: invert the diagonal blocks by forward substitution,
    then merge neighbours with ``[[I + L11, 0], [L21, I + L22]]^-1 = [[T1, 0], [-T2 L21 T1, T2]]``."""
    n = A.shape[-1]
    batch = A.shape[:-2]
    L = A.tril(-1).reshape(-1, n, n)
    M = L.shape[0]
    s = _SOLVE_BLOCK if n % _SOLVE_BLOCK == 0 and n & (n - 1) == 0 else n
    m = n // s
    diag = L.view(M, m, s, m, s).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # [M, m, s, s]
    T = _forward_substitution(diag)
    while s < n:
        m = n // s
        blocks = L.view(M, m, s, m, s)
        # A21 of pair p: rows of block 2p+1, columns of block 2p.
        A21 = blocks[:, 1::2, :, 0::2, :].diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # [M, m/2, s, s]
        T1, T2 = T[:, 0::2], T[:, 1::2]
        merged = T.new_zeros(M, m // 2, 2 * s, 2 * s)
        merged[..., :s, :s] = T1
        merged[..., s:, s:] = T2
        merged[..., s:, :s] = -(T2 @ A21 @ T1)
        T, s = merged, 2 * s
    return T.view(*batch, n, n)


def recompute_w_u_chunks(kc, vc, betac, Ai, Gc) -> tuple[torch.Tensor, torch.Tensor]:
    """``w = Ai (beta * exp(G) * k)``, ``u = Ai (beta * v)`` per chunk: ``[NC, N, HV, BT, K|V]``."""
    return Ai @ _per_value_head(kc, betac * Gc.exp()), Ai @ (vc * betac[..., None])


def fwd_h_chunks(kc, w, u, Gc, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The state pass, one step per chunk c (S is the state entering the chunk, ``h[c] = S``)::

        v_new = u - w S
        S     = exp(G_last) S + (exp(G_last - G) * k)^T v_new

    Inputs chunk-major ``[NC, N, Hx, BT, D]``, h0 ``[N, HV, K, V]``. Returns h ``[NC, N, HV, K, V]``,
    v_new ``[NC, N, HV, BT, V]`` and the final S ``[N, HV, K, V]``.
    """
    NC, N, HV, _, K = w.shape
    V = u.shape[-1]
    NH = N * HV
    G_last = Gc[..., -1:]  # [NC, N, HV, 1]
    kd = _per_value_head(kc, (G_last - Gc).exp())  # [NC, N, HV, BT, K]
    chunk_decay = G_last.exp().view(NC, NH, 1, 1)
    h = w.new_empty(NC, N, HV, K, V)
    v_new = w.new_empty(NC, N, HV, BT, V)
    S = h0.reshape(NH, K, V).to(w.dtype, copy=True)
    for c in range(NC):
        h[c].view(NH, K, V).copy_(S)
        vn = v_new[c].view(NH, BT, V)
        torch.baddbmm(u[c].view(NH, BT, V), w[c].view(NH, BT, K), S, alpha=-1, out=vn)
        S.mul_(chunk_decay[c]).baddbmm_(kd[c].view(NH, BT, K).transpose(1, 2), vn)
    return h, v_new, S.view(N, HV, K, V)


def fused_chunk_pass(qc, kc, vb, Gc, betac, Ai, attn, h0: torch.Tensor, out: torch.Tensor, c0: int = 0) -> torch.Tensor:
    """The entry op's state pass: ``recompute_w_u``, ``chunk_fwd_h`` and ``chunk_fwd_o`` in one loop
    over chunks, without forming w, u or the chunk states. Per chunk, with ``kb = beta exp(G) k`` and
    ``qg = q exp(G)`` built in a small buffer (from the key-head q, k)::

        [kb S; qg S] = [kb; qg] S               (one matmul)
        v_new = Ai (beta v - kb S)              (= u - w S)
        o     = qg S + attn v_new
        S     = exp(G_last) S + (exp(G_last - G) k)^T v_new

    qc, kc ``[NC, N, H, BT, K]``, vb = beta * v ``[NC, N, HV, BT, V]``, Gc/betac ``[NC, N, HV, BT]``,
    Ai/attn ``[NC, N, HV, BT, BT]`` (attn: the masked, decayed ``q k^T``). Writes chunk c's outputs
    into token-major ``out [N, NC_total, BT, HV, V]`` at chunk ``c0 + c``; returns the final state.
    """
    NC, N, HV, _ = Gc.shape
    H, K, V = kc.shape[2], kc.shape[-1], vb.shape[-1]
    G, NH = HV // H, N * HV
    eG = Gc.exp()
    G_last = Gc[..., -1:]
    k_scale = (betac * eG).view(NC, N, H, G, BT, 1)
    q_scale = eG.view(NC, N, H, G, BT, 1)
    k_decay = (G_last - Gc).exp().view(NC, N, H, G, BT, 1)
    chunk_decay = G_last.exp().view(NC, NH, 1, 1)
    kq = kc.new_empty(N, H, G, 2 * BT, K)
    kd = kc.new_empty(N, H, G, BT, K)
    S = h0.reshape(NH, K, V).to(kc.dtype, copy=True)
    for c in range(NC):
        k_c = kc[c].unsqueeze(2)  # [N, H, 1, BT, K], shared by the value heads of a group
        torch.mul(k_c, k_scale[c], out=kq[..., :BT, :])
        torch.mul(qc[c].unsqueeze(2), q_scale[c], out=kq[..., BT:, :])
        r = torch.bmm(kq.view(NH, 2 * BT, K), S)
        vn = torch.bmm(Ai[c].view(NH, BT, BT), vb[c].view(NH, BT, V) - r[:, :BT])
        o_c = torch.baddbmm(r[:, BT:], attn[c].view(NH, BT, BT), vn)
        out[:, c0 + c].copy_(o_c.view(N, HV, BT, V).transpose(1, 2))
        torch.mul(k_c, k_decay[c], out=kd)
        S.mul_(chunk_decay[c]).baddbmm_(kd.view(NH, BT, K).transpose(1, 2), vn)
    return S.view(N, HV, K, V)


def fwd_o_chunks(qc, kc, v_new, h, Gc, scale: float, decay: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``o = scale [(q * exp(G)) S + ((q k^T) * exp(G_i - G_j) * [i >= j]) v_new]`` per chunk: ``[NC, N, HV, BT, V]``."""
    o = _per_value_head(qc, Gc.exp()) @ h
    o += _attention_chunks(qc, kc, Gc, decay) @ v_new
    return o.mul_(scale)


def _attention_chunks(qc, kc, Gc, decay: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(q k^T) * exp(G_i - G_j) * [i >= j]``: ``[NC, N, HV, BT, BT]`` (q k^T once per key head).
    ``out`` may be a ``[NC, N, H, HV/H, BT, BT]`` view to write into (it is returned as given)."""
    H = qc.shape[2]
    qk = qc @ kc.transpose(-1, -2)  # [NC, N, H, BT, BT]
    if decay is None:
        decay = _decay_matrix(Gc, strict=False)
    if out is not None:
        return torch.mul(_groups(decay, H), qk.unsqueeze(3), out=out)
    return (_groups(decay, H) * qk.unsqueeze(3)).flatten(2, 3)


def _state_or_zeros(initial_state, N, HV, K, V, dtype, device) -> torch.Tensor:
    if initial_state is None:
        return torch.zeros(N, HV, K, V, dtype=dtype, device=device)
    return initial_state.to(dtype)


def _final(S: torch.Tensor, output_final_state: bool) -> torch.Tensor:
    # Without output_final_state the op returns an empty [0, HV, K, V] state (the wrapper returns None).
    return S if output_final_state else S.new_empty(0, *S.shape[1:])


def _chunk_major(pk: _Packing, t: torch.Tensor) -> torch.Tensor:
    """The packed ``[B, T, Hx, D]`` as a chunk-major view ``[NC, N, Hx, BT, D]`` (a copy only where packing needs one)."""
    return pk.pack(t).view(pk.N, pk.NC, BT, t.shape[2], t.shape[-1]).permute(1, 0, 3, 2, 4)


def _chunks_times(pk: _Packing, x: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x * factor`` in the packed, chunk-major layout, in one pass: ``[B, T, Hx, D] -> [NC, N, Hx, BT, D]``.

    ``factor`` is ``[B, T, Hx, 1]`` in ``dtype`` (so the product is computed in ``dtype``).
    """
    out = torch.empty(pk.NC, pk.N, x.shape[2], BT, x.shape[3], dtype=dtype, device=x.device)
    return torch.mul(_chunk_major(pk, x), _chunk_major(pk, factor), out=out)


def _qk_factor(x: torch.Tensor, l2: bool, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``scale / sqrt(sum(x^2) + 1e-6)`` per row (``scale`` without l2), ``[B, T, H, 1]`` in ``dtype``
    (x is already in ``dtype``)."""
    if not l2:
        return torch.full((*x.shape[:-1], 1), scale, dtype=dtype, device=x.device)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return norm.square_().add_(L2NORM_EPS).rsqrt_().mul_(scale)


def chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale: float, initial_state, output_final_state: bool,
                               use_qk_l2norm_in_kernel: bool, cu_seqlens) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked pipeline: cumsum -> kkt -> solve_tril -> the fused w/u, state and output pass.

    Runs SEGMENT_CHUNKS chunks at a time; the chunk states are never stored (the output reads each
    state inside the pass), unlike the ``chunk_fwd_h`` / ``chunk_fwd_o`` stage ops. q's scale and
    l2-normalisation, beta * v and the move to the chunk-major layout are each one pass.
    """
    op = "chunk_gated_delta_rule"
    cd = _v.compute_dtype(q)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    pk = _packing(B, T, cu_seqlens, BT, q.device, op)
    l2 = use_qk_l2norm_in_kernel
    # Both output terms are linear in q: scaling q once scales the output.
    # Converted once (a no-op in float32): the norm and the product both read the converted copy.
    q32, k32 = q.to(cd), k.to(cd)
    qc = _chunks_times(pk, q32, _qk_factor(q32, l2, scale, cd), cd)
    kc = _chunks_times(pk, k32, _qk_factor(k32, l2, 1.0, cd), cd)
    beta_cd = beta.to(cd)
    vb = _chunks_times(pk, v, beta_cd.unsqueeze(-1), cd)
    Gc = local_cumsum_chunks(_to_chunks(pk.pack(g.to(cd))))
    betac = _to_chunks(pk.pack(beta_cd))
    S = _state_or_zeros(initial_state, pk.N, HV, K, V, cd, q.device)
    o = torch.empty(pk.N, pk.NC, BT, HV, V, dtype=cd, device=q.device)
    for c0 in range(0, pk.NC, SEGMENT_CHUNKS):
        seg = slice(c0, c0 + SEGMENT_CHUNKS)
        q_s, k_s, vb_s, G_s, b_s = (x[seg] for x in (qc, kc, vb, Gc, betac))
        decay = _decay_matrix(G_s, strict=False)
        Ai = solve_tril_chunks(kkt_chunks(k_s, G_s, b_s, decay))
        attn = _attention_chunks(q_s, k_s, G_s, decay)
        S = fused_chunk_pass(q_s, k_s, vb_s, G_s, b_s, Ai, attn, S, out=o, c0=c0)
    return pk.unpack(o.view(pk.N, pk.Tp, HV, V)).to(q.dtype), _final(S, output_final_state)


def fused_recurrent_gated_delta_rule_fwd(q, k, v, g, beta, scale: float, initial_state, output_final_state: bool,
                                         use_qk_l2norm_in_kernel: bool, cu_seqlens) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence, one token at a time, every sequence and head at once::

        S = exp(g_t) S;  delta = beta_t (v_t - S^T k_t);  S = S + k_t delta^T;  o_t = S^T (scale q_t)
    """
    op = "fused_recurrent_gated_delta_rule"
    cd = _v.compute_dtype(q)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    G = HV // H
    if T == 1 and cu_seqlens is None:
        return _decode_step(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cd)
    pk = _packing(B, T, cu_seqlens, 1, q.device, op)
    N, Tp = pk.N, pk.Tp
    q32, k32 = q.to(cd), k.to(cd)
    if use_qk_l2norm_in_kernel:
        q32, k32 = l2norm(q32), l2norm(k32)
    q32 = q32 * scale

    def per_value_head(x):  # [B, T, H, K] -> time-major [Tp, N*HV, 1, K]
        x = pk.pack(x).unsqueeze(3).expand(N, Tp, H, G, K)
        return x.reshape(N, Tp, HV, K).transpose(0, 1).reshape(Tp, N * HV, 1, K)

    ks = per_value_head(k32)
    # One read of S per token gives both k^T S and q^T S (of the state before the decay):
    # o_t = exp(g_t) q^T S + (q . k) delta, since S_t = exp(g_t) S + k delta^T.
    kq = torch.cat((ks, per_value_head(q32)), dim=2)  # [Tp, N*HV, 2, K]
    qk = (kq[:, :, 0:1] * kq[:, :, 1:2]).sum(-1, keepdim=True)  # [Tp, N*HV, 1, 1]
    vs = pk.pack(v.to(cd)).transpose(0, 1).reshape(Tp, N * HV, 1, V)
    decay = pk.pack(g.to(cd)).exp().transpose(0, 1).reshape(Tp, N * HV, 1, 1)
    betas = pk.pack(beta.to(cd)).transpose(0, 1).reshape(Tp, N * HV, 1, 1)
    S = _state_or_zeros(initial_state, N, HV, K, V, cd, q.device).reshape(N * HV, K, V)
    o = q32.new_empty(Tp, N * HV, 1, V)
    for t in range(Tp):
        kS, qS = torch.bmm(kq[t], S).split(1, dim=1)
        delta = (vs[t] - decay[t] * kS).mul_(betas[t])
        torch.addcmul(decay[t] * qS, qk[t], delta, out=o[t])
        # The first step writes a new tensor, so initial_state is never modified.
        S = S * decay[t] if t == 0 else S.mul_(decay[t])
        S.baddbmm_(ks[t].transpose(1, 2), delta)
    o = o.view(Tp, N, HV, V).transpose(0, 1)
    return pk.unpack(o).to(q.dtype).contiguous(), _final(S.view(N, HV, K, V), output_final_state)


def _decode_step(q, k, v, g, beta, scale, initial_state, output_final_state, l2, cd):
    """``fused_recurrent_gated_delta_rule_fwd`` for one token and no ``cu_seqlens`` (decode), with
    the same math and fewer small ops: the state is read once for ``k^T S`` and ``q^T S``, then
    written once decayed and once updated."""
    B, _, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    G, NH = HV // H, B * HV
    q1, k1 = q[:, 0].to(cd), k[:, 0].to(cd)  # [B, H, K]
    if l2:
        q1 = q1 * torch.rsqrt((q1 * q1).sum(-1, keepdim=True) + L2NORM_EPS)
        k1 = k1 * torch.rsqrt((k1 * k1).sum(-1, keepdim=True) + L2NORM_EPS)
    kq = torch.stack((k1, q1 * scale), dim=2)  # [B, H, 2, K]
    qk = (kq[:, :, 0] * kq[:, :, 1]).sum(-1, keepdim=True)  # [B, H, 1]
    kq = kq.unsqueeze(2).expand(B, H, G, 2, K).reshape(NH, 2, K)
    qk = qk.unsqueeze(2).expand(B, H, G, 1).reshape(NH, 1, 1)
    S = _state_or_zeros(initial_state, B, HV, K, V, cd, q.device).reshape(NH, K, V)
    r = torch.bmm(kq, S)  # [N*HV, 2, V]: k^T S, q^T S
    decay = g[:, 0].to(cd).exp().reshape(NH, 1, 1)
    delta = (v[:, 0].to(cd).reshape(NH, 1, V) - decay * r[:, :1]).mul_(beta[:, 0].to(cd).reshape(NH, 1, 1))
    o = torch.addcmul(decay * r[:, 1:], qk, delta)
    S = (S * decay).baddbmm_(kq[:, :1].transpose(1, 2), delta)
    return o.view(B, 1, HV, V).to(q.dtype), _final(S.view(B, HV, K, V), output_final_state)


def _resolve_scale(scale: Optional[float], K: int) -> float:
    return K**-0.5 if scale is None else scale


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, cu_seqlens=None):
    _v.check_gated_delta_rule("chunk_gated_delta_rule", q, k, v, g, beta, scale, initial_state, cu_seqlens)
    return chunk_gated_delta_rule_fwd(q, k, v, g, beta, _resolve_scale(scale, q.shape[-1]), initial_state,
                                      output_final_state, use_qk_l2norm_in_kernel, cu_seqlens)


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                     use_qk_l2norm_in_kernel=False, cu_seqlens=None):
    _v.check_gated_delta_rule("fused_recurrent_gated_delta_rule", q, k, v, g, beta, scale, initial_state, cu_seqlens)
    return fused_recurrent_gated_delta_rule_fwd(q, k, v, g, beta, _resolve_scale(scale, q.shape[-1]), initial_state,
                                                output_final_state, use_qk_l2norm_in_kernel, cu_seqlens)


def chunk_local_cumsum(g, chunk_size=64, reverse=False, scale=None, cu_seqlens=None):
    B, T, HV = _v.check_chunk_local_cumsum(g, chunk_size, reverse, scale, cu_seqlens)
    pk = _packing(B, T, cu_seqlens, chunk_size, g.device, "chunk_local_cumsum")
    gp = pk.pack(g.to(_v.compute_dtype(g)))
    gc = local_cumsum_chunks(gp.view(pk.N, pk.NC, chunk_size, HV).transpose(2, 3), reverse).transpose(2, 3)
    if scale is not None:
        gc = gc * scale
    return pk.unpack(gc.reshape(pk.N, pk.Tp, HV))


def chunk_scaled_dot_kkt(k, g, beta, cu_seqlens=None):
    geo = _v.check_chunk_scaled_dot_kkt(k, g, beta, cu_seqlens)
    cd = _v.compute_dtype(k, g, beta)
    pk = _packing(geo.batch, geo.tokens, cu_seqlens, BT, k.device, "chunk_scaled_dot_kkt")
    kc = _to_chunks(pk.pack(k.to(cd)))
    Gc = _to_chunks(pk.pack(g.to(cd), edge=True))
    A = kkt_chunks(kc, Gc, _to_chunks(pk.pack(beta.to(cd))))
    return pk.unpack(_from_chunks(A))


def solve_tril(A, cu_seqlens=None):
    geo = _v.check_solve_tril(A, cu_seqlens)
    pk = _packing(geo.batch, geo.tokens, cu_seqlens, BT, A.device, "solve_tril")
    Ac = _to_chunks(pk.pack(A.to(_v.compute_dtype(A))))
    return pk.unpack(_from_chunks(solve_tril_chunks(Ac)))


def recompute_w_u(k, v, beta, A, g, cu_seqlens=None):
    geo = _v.check_recompute_w_u(k, v, beta, A, g, cu_seqlens)
    cd = _v.compute_dtype(k, v, beta, A, g)
    pk = _packing(geo.batch, geo.tokens, cu_seqlens, BT, k.device, "recompute_w_u")
    kc, vc, betac = (_to_chunks(pk.pack(x.to(cd))) for x in (k, v, beta))
    Ai = _to_chunks(pk.pack(A.to(cd))).tril()
    w, u = recompute_w_u_chunks(kc, vc, betac, Ai, _to_chunks(pk.pack(g.to(cd), edge=True)))
    return pk.unpack(_from_chunks(w)), pk.unpack(_from_chunks(u))


def chunk_fwd_h(k, w, u, g, initial_state=None, cu_seqlens=None):
    geo = _v.check_chunk_fwd_h(k, w, u, g, initial_state, cu_seqlens)
    cd = _v.compute_dtype(k, w, u, g)
    pk = _packing(geo.batch, geo.tokens, cu_seqlens, BT, k.device, "chunk_fwd_h")
    kc, wc, uc = (_to_chunks(pk.pack(x.to(cd))) for x in (k, w, u))
    Gc = _to_chunks(pk.pack(g.to(cd), edge=True))
    h0 = _state_or_zeros(initial_state, pk.N, geo.value_heads, geo.head_dim, geo.value_dim, cd, k.device)
    h, v_new, S = fwd_h_chunks(kc, wc, uc, Gc, h0)
    return pk.unpack_states(h.transpose(0, 1)), pk.unpack(_from_chunks(v_new)), S


def chunk_fwd_o(q, k, v, h, g, scale=None, cu_seqlens=None):
    op = "chunk_fwd_o"
    geo = _v.check_chunk_fwd_o(q, k, v, h, g, scale, cu_seqlens)
    cd = _v.compute_dtype(q, k, v, h, g)
    pk = _packing(geo.batch, geo.tokens, cu_seqlens, BT, q.device, op)
    if cu_seqlens is not None and h.shape[1] != len(pk.chunk_rows):
        _v._fail(op, f"h must hold NT = {len(pk.chunk_rows)} chunk states (ceil(length/BT) per sequence of "
                     f"cu_seqlens), got {h.shape[1]}")
    qc, kc, vc = (_to_chunks(pk.pack(x.to(cd))) for x in (q, k, v))
    Gc = _to_chunks(pk.pack(g.to(cd), edge=True))
    hc = pk.pack_states(h.to(cd)).transpose(0, 1)
    o = fwd_o_chunks(qc, kc, vc, hc, Gc, _resolve_scale(scale, geo.head_dim))
    return pk.unpack(_from_chunks(o))
