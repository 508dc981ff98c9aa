"""The gated delta rule's entry ops in plain PyTorch, shaped for a GPU (CUDA without FLA).

Same schema and semantics as the CPU reference (``torch_tq.backends.cpu.gated_delta_rule``, the
executable specification, whose packing, validation and intra-chunk helpers this module reuses),
computed in float32 (float64 for float64 inputs) with a float32 state. It differs in shape only:
eager PyTorch on a GPU spends its time launching kernels, so the work is arranged into few, large
batched ops, and the sequential parts do as little per step as the math allows.

Chunked form. Everything that does not depend on the state is computed for all chunks of a segment
at once (``_segment``): the decay matrices, ``A = beta k k^T``, the triangular solve
``[w | u] = (I + A)^-1 [beta exp(G) k | beta v]`` for every chunk in one call, and then the two
affine maps that the state pass applies per chunk. With ``S`` the state entering chunk c::

    o      = qg S + attn (u - w S)                     = (qg - attn w) S + attn u
    S_next = exp(G_last) S + kd^T (u - w S)            = (exp(G_last) I - kd^T w) S + kd^T u

(``qg = q exp(G)``, ``kd = k exp(G_last - G)``, ``attn`` the masked, decayed ``q k^T``). Stacking the
two maps, ``[o; S_next] = M S + R0`` with ``M = [qg - attn w; exp(G_last) I - kd^T w]`` and
``R0 = [attn u; kd^T u]``, both ``[BT + K, ...]`` per chunk and head, built for all chunks with two
batched matmuls of ``E = [attn; kd^T]``. The state pass is then ONE kernel per chunk: an in-place
``baddbmm_`` of ``R0[c]`` (every sequence and value head at once), whose bottom rows are the next
chunk's state and top rows the chunk's output. All matmuls run in float32 (as the reference's,
they would round to TF32 only where a user enables it); the chunks of a segment are bounded by
``SEGMENT_HEAD_CHUNKS`` so memory does not grow with T beyond the inputs and the output.

Recurrent form (decode). Per token five kernels (``k^T S``, delta, decay, rank-1 update, ``q^T S``),
every sequence and value head at once; the inputs are prepared for all tokens first.
"""

from __future__ import annotations

from typing import Optional

import torch

from ... import _gated_delta_validation as _v
from ..cpu import gated_delta_rule as _ref

BT = _v.CHUNK_SIZE
# Chunks x (sequences x value heads) per segment of the chunked form. The segment's tensors take
# about 0.43 MB per chunk and head in float32 (K = V = 128), so 2048 bounds them near 0.9 GB; at
# Qwen3-Next's 32 value heads that is 64 chunks (4096 tokens) per segment.
SEGMENT_HEAD_CHUNKS = 2048
# How the unit-lower-triangular systems ``(I + tril(L, -1)) X = rhs`` of all chunks are solved
# (``L [..., BT, BT]``, ``rhs [..., BT, D]``): one batched torch.linalg.solve_triangular (cuBLAS'
# batched trsm on CUDA), or the reference's blocked inverse (a few dozen batched matmuls) times rhs.
# Both are timed by ``benchmarks/gated_delta.py --device cuda``.
_SOLVERS = {
    "triangular": lambda L, rhs: torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True),
    "blocked": lambda L, rhs: _ref.solve_tril_chunks(L) @ rhs,
}
SOLVES = tuple(_SOLVERS)
DEFAULT_SOLVE = "triangular"


def _segment(qc, kc, v_chunks, beta_chunks, Gc, betac, S: torch.Tensor, out: torch.Tensor, solve: str) -> torch.Tensor:
    """One segment of the chunked form; returns the state after it.

    qc, kc ``[NC, N, H, BT, K]`` (q already scaled and normalised), ``v_chunks`` / ``beta_chunks`` the
    chunk-major views ``[NC, N, HV, BT, V|1]`` of v and beta, Gc / betac ``[NC, N, HV, BT]``, S
    ``[N * HV, K, V]`` (read only). Writes the outputs into ``out [N, NC, BT, HV, V]``.
    """
    NC, N, HV, _ = Gc.shape
    H, K, V = kc.shape[2], kc.shape[-1], v_chunks.shape[-1]
    G, NH = HV // H, N * HV
    cd = kc.dtype
    grouped = (NC, N, H, G)  # value head i of a sequence = (key head i // G, member i % G)

    # The intra-chunk matrices, for every chunk at once (key-head products broadcast to value heads).
    decay = _ref._decay_matrix(Gc, strict=False)
    L = _ref.kkt_chunks(kc, Gc, betac, decay)  # [NC, N, HV, BT, BT]: beta_i k_i.k_j exp(G_i - G_j), i > j
    eG = Gc.exp()
    G_last = Gc[..., -1:]
    rhs = torch.empty(NC, N, HV, BT, K + V, dtype=cd, device=kc.device)
    torch.mul(kc.unsqueeze(3), (betac * eG).view(*grouped, BT, 1), out=rhs.view(*grouped, BT, K + V)[..., :K])
    torch.mul(v_chunks, beta_chunks, out=rhs[..., K:])
    wu = _SOLVERS[solve](L, rhs).view(NC * NH, BT, K + V)  # [w | u]

    # E = [attn; kd^T] per chunk and value head: the rows of the output, then of the next state.
    E = torch.empty(NC, N, HV, BT + K, BT, dtype=cd, device=kc.device)
    E6 = E.view(*grouped, BT + K, BT)
    _ref._attention_chunks(qc, kc, Gc, decay, out=E6[..., :BT, :])
    torch.mul(kc.unsqueeze(3), (G_last - Gc).exp().view(*grouped, BT, 1), out=E6[..., BT:, :].transpose(-1, -2))
    E = E.view(NC * NH, BT + K, BT)
    R = torch.bmm(E, wu[..., K:])  # R0 = [attn u; kd^T u], completed in place by the state pass
    M = torch.bmm(E, wu[..., :K]).neg_()  # -[attn w; kd^T w] ...
    M6 = M.view(*grouped, BT + K, K)
    M6[..., :BT, :].addcmul_(qc.unsqueeze(3), eG.view(*grouped, BT, 1))  # ... + [q exp(G); 0]
    M6[..., BT:, :].diagonal(dim1=-2, dim2=-1).add_(G_last.exp().view(*grouped, 1))  # ... + [0; exp(G_last) I]

    # The state pass: one kernel per chunk. R[c] = [o; S_next] = M[c] S + R0[c].
    R = R.view(NC, NH, BT + K, V)
    for R_c, M_c in zip(R.unbind(0), M.view(NC, NH, BT + K, K).unbind(0)):
        R_c.baddbmm_(M_c, S)
        S = R_c[:, BT:]
    out.copy_(R.view(NC, N, HV, BT + K, V)[..., :BT, :].permute(1, 0, 3, 2, 4))
    return S


def chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale: float, initial_state, output_final_state: bool,
                               use_qk_l2norm_in_kernel: bool, cu_seqlens,
                               solve: str = DEFAULT_SOLVE) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked form on resolved arguments (validated by the caller), like the reference's."""
    if solve not in SOLVES:
        raise ValueError(f"solve must be one of {SOLVES}, got {solve!r}")
    cd = _v.compute_dtype(q)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    pk = _ref._packing(B, T, cu_seqlens, BT, q.device, "chunk_gated_delta_rule")
    N, NC = pk.N, pk.NC
    l2 = use_qk_l2norm_in_kernel
    # q's scale and the l2 norms, once, as in the reference; v and beta stay views until a segment reads them.
    q32, k32 = q.to(cd), k.to(cd)
    qc = _ref._chunks_times(pk, q32, _ref._qk_factor(q32, l2, scale, cd), cd)
    kc = _ref._chunks_times(pk, k32, _ref._qk_factor(k32, l2, 1.0, cd), cd)
    beta_cd = beta.to(cd)
    v_chunks, beta_chunks = _ref._chunk_major(pk, v), _ref._chunk_major(pk, beta_cd.unsqueeze(-1))
    Gc = _ref.local_cumsum_chunks(_ref._to_chunks(pk.pack(g.to(cd))))
    betac = _ref._to_chunks(pk.pack(beta_cd))
    S = _ref._state_or_zeros(initial_state, N, HV, K, V, cd, q.device).reshape(N * HV, K, V)
    o = torch.empty(N, NC, BT, HV, V, dtype=q.dtype, device=q.device)
    step = max(1, SEGMENT_HEAD_CHUNKS // max(1, N * HV))
    for c0 in range(0, NC, step):
        seg = slice(c0, c0 + step)
        S = _segment(qc[seg], kc[seg], v_chunks[seg], beta_chunks[seg], Gc[seg], betac[seg], S, o[:, seg], solve)
    o = pk.unpack(o.view(N, pk.Tp, HV, V))
    if not output_final_state:
        return o, S.new_empty(0, HV, K, V)
    # A copy in every case: S is a view of the last segment's buffer, or the caller's initial_state.
    return o, S.reshape(N, HV, K, V).clone(memory_format=torch.contiguous_format)


def fused_recurrent_gated_delta_rule_fwd(q, k, v, g, beta, scale: float, initial_state, output_final_state: bool,
                                         use_qk_l2norm_in_kernel: bool, cu_seqlens) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence on resolved arguments, one token at a time, five kernels per token::

        kS = k^T S;  delta = beta v - beta exp(g) kS;  S = exp(g) S;  S += k delta^T;  o = q^T S

    (the reference's ``S = exp(g) S; delta = beta (v - S^T k); S += k delta^T; o = S^T q``, reading the
    state after the update instead of expanding it). Everything that does not depend on the state
    is computed for all tokens first; ``scale`` is applied to the output, with its cast to q's dtype.
    """
    cd = _v.compute_dtype(q)
    B, T, H, K = q.shape
    if T == 1 and cu_seqlens is None:
        return _decode_step(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cd)
    HV, V = v.shape[2], v.shape[3]
    G = HV // H
    pk = _ref._packing(B, T, cu_seqlens, 1, q.device, "fused_recurrent_gated_delta_rule")
    N, Tp, NH = pk.N, pk.Tp, pk.N * HV
    # k and q in one tensor: one cast, one normalisation, one copy to time-major rows per value head.
    kq = torch.stack((k, q), dim=3, out=torch.empty(B, T, H, 2, K, dtype=cd, device=q.device))
    if use_qk_l2norm_in_kernel:
        kq = _ref.l2norm(kq)
    kq = pk.pack(kq).unsqueeze(3).expand(N, Tp, H, G, 2, K).transpose(0, 1).reshape(Tp, NH, 2, K)
    k_rows, q_rows = kq[:, :, 0:1].unbind(0), kq[:, :, 1:2].unbind(0)  # [NH, 1, K] per token

    def time_major(x):  # [B, T, HV, D] -> [Tp, N * HV, 1, D]
        return pk.pack(x).transpose(0, 1).reshape(Tp, NH, 1, x.shape[-1])

    beta_cd = beta.to(cd).unsqueeze(-1)
    decay = time_major(g.to(cd).unsqueeze(-1)).exp()  # [Tp, NH, 1, 1]
    beta_decay = (decay * time_major(beta_cd)).unbind(0)
    beta_v = time_major(torch.mul(v, beta_cd)).unbind(0)  # computed in float32 (beta_cd is)
    decay = decay.unbind(0)
    fresh = initial_state is None  # whether S is this function's own tensor (else the caller's: read only)
    S = torch.zeros(NH, K, V, dtype=cd, device=q.device) if fresh else initial_state.to(cd).reshape(NH, K, V)
    o = torch.empty(Tp, NH, 1, V, dtype=cd, device=q.device)
    for t in range(Tp):
        kS = torch.bmm(k_rows[t], S)
        delta = torch.addcmul(beta_v[t], beta_decay[t], kS, value=-1)
        S = S.mul_(decay[t]) if fresh else torch.mul(S, decay[t])
        fresh = True
        S.baddbmm_(k_rows[t].transpose(1, 2), delta)
        torch.bmm(q_rows[t], S, out=o[t])
    o = torch.mul(o.view(Tp, N, HV, V).transpose(0, 1), scale,
                  out=torch.empty(N, Tp, HV, V, dtype=q.dtype, device=q.device))
    if not output_final_state:
        return pk.unpack(o), o.new_empty(0, HV, K, V, dtype=cd)
    return pk.unpack(o), (S if fresh else S.clone()).reshape(N, HV, K, V)  # no token ran: not the caller's tensor


def _decode_step(q, k, v, g, beta, scale: float, initial_state, output_final_state: bool, l2: bool,
                 cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per sequence (T = 1, no cu_seqlens: a decode step), the recurrence's five kernels after
    five to nine of preparation, with none of the per-token bookkeeping of the general loop: a decode
    step's cost on a GPU is its launches and the Python around them.
    """
    B, _, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    NH = B * HV
    kq = torch.stack((k[:, 0], q[:, 0]), dim=2, out=torch.empty(B, H, 2, K, dtype=cd, device=q.device))
    if l2:
        kq = _ref.l2norm(kq)
    kq = kq.unsqueeze(2).expand(B, H, HV // H, 2, K).reshape(NH, 2, K)  # rows per value head
    k_row, q_row = kq[:, 0:1], kq[:, 1:2]  # [NH, 1, K]
    if initial_state is None:
        S = torch.zeros(NH, K, V, dtype=cd, device=q.device)
    else:
        S = initial_state.to(cd).reshape(NH, K, V)
    decay = g.reshape(NH, 1, 1).to(cd).exp()
    kS = torch.bmm(k_row, S)
    # delta = beta (v - exp(g) k^T S), in float32 (the promoted dtype of the addcmul).
    delta = torch.addcmul(v.reshape(NH, 1, V), decay, kS, value=-1).mul_(beta.reshape(NH, 1, 1).to(cd))
    S = torch.mul(S, decay).baddbmm_(k_row.transpose(1, 2), delta)  # a new tensor: the caller's state is kept
    o = torch.bmm(q_row, S)
    out = torch.mul(o.view(B, 1, HV, V), scale, out=torch.empty(B, 1, HV, V, dtype=q.dtype, device=q.device))
    if not output_final_state:
        return out, o.new_empty(0, HV, K, V, dtype=cd)
    return out, S.reshape(B, HV, K, V)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, cu_seqlens=None, solve: str = DEFAULT_SOLVE):
    """``tq.chunk_gated_delta_rule``'s GPU-shaped PyTorch kernel (any device; CUDA runs it when FLA is absent)."""
    _v.check_gated_delta_rule("chunk_gated_delta_rule", q, k, v, g, beta, scale, initial_state, cu_seqlens)
    return chunk_gated_delta_rule_fwd(q, k, v, g, beta, _ref._resolve_scale(scale, q.shape[-1]), initial_state,
                                      output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, solve)


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                     use_qk_l2norm_in_kernel=False, cu_seqlens=None):
    """``tq.fused_recurrent_gated_delta_rule``'s GPU-shaped PyTorch kernel (any device; CUDA runs it when FLA is absent)."""
    _v.check_gated_delta_rule("fused_recurrent_gated_delta_rule", q, k, v, g, beta, scale, initial_state, cu_seqlens)
    return fused_recurrent_gated_delta_rule_fwd(q, k, v, g, beta, _ref._resolve_scale(scale, q.shape[-1]),
                                                initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens)
