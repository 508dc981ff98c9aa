"""One table of invalid inputs for the gated-delta-rule ops and the exact message each backend must give.

Each case builds the keyword arguments of one ``torch.ops.tq`` op from a valid baseline with one
thing wrong. Backends other than the CPU reference run the same table.
"""

from __future__ import annotations

import torch


def rule_args(B=1, T=5, H=2, HV=4, K=64, V=64, dtype=torch.float32, cu_seqlens=None, initial_state=False):
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    return dict(
        q=torch.randn(B, T, H, K, dtype=dtype), k=torch.randn(B, T, H, K, dtype=dtype),
        v=torch.randn(B, T, HV, V, dtype=dtype),
        g=-torch.nn.functional.softplus(torch.randn(B, T, HV)), beta=torch.rand(B, T, HV),
        scale=None, initial_state=torch.randn(N, HV, K, V) if initial_state else None, output_final_state=True,
        use_qk_l2norm_in_kernel=True, cu_seqlens=None if cu_seqlens is None else torch.tensor(cu_seqlens),
    )


def _with(args, **changes):
    args.update(changes)
    return args


def _stage_args(B=1, T=5, H=2, HV=4, K=64, V=64):
    return dict(
        q=torch.randn(B, T, H, K), k=torch.randn(B, T, H, K), v=torch.randn(B, T, HV, V),
        g=-torch.rand(B, T, HV), beta=torch.rand(B, T, HV), A=torch.randn(B, T, HV, 64),
        w=torch.randn(B, T, HV, K), u=torch.randn(B, T, HV, V), h=torch.randn(B, (T + 63) // 64, HV, K, V),
    )


def kkt_args(**kw):
    a = _stage_args(**kw)
    return dict(k=a["k"], g=a["g"], beta=a["beta"], cu_seqlens=None)


def solve_args(**kw):
    return dict(A=_stage_args(**kw)["A"], cu_seqlens=None)


def wu_args(**kw):
    a = _stage_args(**kw)
    return dict(k=a["k"], v=a["v"], beta=a["beta"], A=a["A"], g=a["g"], cu_seqlens=None)


def h_args(**kw):
    a = _stage_args(**kw)
    return dict(k=a["k"], w=a["w"], u=a["u"], g=a["g"], initial_state=None, cu_seqlens=None)


def o_args(**kw):
    a = _stage_args(**kw)
    return dict(q=a["q"], k=a["k"], v=a["v"], h=a["h"], g=a["g"], scale=None, cu_seqlens=None)


def cumsum_args(**kw):
    return dict(g=_stage_args(**kw)["g"], chunk_size=64, reverse=False, scale=None, cu_seqlens=None)


CGDR = "chunk_gated_delta_rule"
RGDR = "fused_recurrent_gated_delta_rule"
P = "tq.chunk_gated_delta_rule: "

# (id, op, build() -> kwargs, exact message)
BAD_INPUTS = [
    ("rule-q-rank", CGDR, lambda: _with(rule_args(), q=torch.randn(5, 2, 64)),
     P + "q must have rank 4 [B, T, H, K], got shape [5, 2, 64]"),
    ("rule-q-dtype", CGDR, lambda: _with(rule_args(), q=torch.randint(0, 3, (1, 5, 2, 64))),
     P + "q must be float32, float16, bfloat16 or float64, got torch.int64"),
    ("rule-mixed-dtypes", CGDR, lambda: rule_args() | dict(k=torch.randn(1, 5, 2, 64, dtype=torch.bfloat16)),
     P + "q, k and v must share one dtype, got q torch.float32, k torch.bfloat16, v torch.float32"),
    ("rule-k-shape", CGDR, lambda: _with(rule_args(), k=torch.randn(1, 5, 1, 64)),
     P + "k must have shape [B, T, H, K] (the shape of q) = [1, 5, 2, 64], got [1, 5, 1, 64]"),
    ("rule-v-tokens", CGDR, lambda: _with(rule_args(), v=torch.randn(1, 6, 4, 64)),
     P + "v must have [B, T] = [1, 5] to match q, got shape [1, 6, 4, 64]"),
    ("rule-head-dim", CGDR, lambda: rule_args(K=96),
     P + "head dim K must be one of (64, 128, 256), got 96"),
    ("rule-value-dim", CGDR, lambda: rule_args(V=512),
     P + "value head dim V must be one of (64, 128, 256), got 512"),
    ("rule-gva-ratio", CGDR, lambda: rule_args(H=3, HV=4),
     P + "value heads HV=4 must be a multiple of query/key heads H=3"),
    ("rule-g-shape", CGDR, lambda: _with(rule_args(), g=torch.randn(1, 5, 2)),
     P + "g must have shape [B, T, HV] = [1, 5, 4], got [1, 5, 2]"),
    ("rule-beta-rank", CGDR, lambda: _with(rule_args(), beta=torch.rand(1, 5, 4, 1)),
     P + "beta must have rank 3 [B, T, HV], got shape [1, 5, 4, 1]"),
    ("rule-state-shape", CGDR, lambda: _with(rule_args(B=2), initial_state=torch.zeros(1, 4, 64, 64)),
     P + "initial_state must have shape [N, HV, K, V] = [2, 4, 64, 64], got [1, 4, 64, 64]"),
    ("rule-state-dtype", RGDR, lambda: _with(rule_args(), initial_state=torch.zeros(1, 4, 64, 64, dtype=torch.float16)),
     "tq.fused_recurrent_gated_delta_rule: initial_state must be float32 (the state is carried in float32), "
     "got torch.float16"),
    ("rule-varlen-batch", CGDR, lambda: rule_args(B=2) | dict(cu_seqlens=torch.tensor([0, 5])),
     P + "cu_seqlens requires batch size B=1 (flatten the sequences into one), got B=2"),
    ("rule-varlen-dtype", CGDR, lambda: rule_args() | dict(cu_seqlens=torch.tensor([0.0, 5.0])),
     P + "cu_seqlens must be int32 or int64, got torch.float32"),
    ("rule-varlen-short", RGDR, lambda: rule_args() | dict(cu_seqlens=torch.tensor([5])),
     "tq.fused_recurrent_gated_delta_rule: cu_seqlens must have shape [N+1] with N >= 1, got shape [1]"),
    ("rule-varlen-start", CGDR, lambda: rule_args(cu_seqlens=[1, 3, 5]),
     P + "cu_seqlens must start at 0, got 1"),
    ("rule-varlen-order", CGDR, lambda: rule_args(cu_seqlens=[0, 4, 2, 5]),
     P + "cu_seqlens must be non-decreasing, got [0, 4, 2, 5]"),
    ("rule-varlen-end", RGDR, lambda: rule_args(cu_seqlens=[0, 2, 4]),
     "tq.fused_recurrent_gated_delta_rule: cu_seqlens must end at T=5, got 4"),
    ("rule-varlen-states", CGDR, lambda: rule_args(cu_seqlens=[0, 2, 5]) | dict(initial_state=torch.zeros(1, 4, 64, 64)),
     P + "initial_state must have shape [N, HV, K, V] = [2, 4, 64, 64], got [1, 4, 64, 64]"),
    ("cumsum-chunk-size", "chunk_local_cumsum", lambda: _with(cumsum_args(), chunk_size=48),
     "tq.chunk_local_cumsum: chunk_size must be a power of two, got 48"),
    ("kkt-gva", "chunk_scaled_dot_kkt", lambda: _with(kkt_args(), k=torch.randn(1, 5, 3, 64)),
     "tq.chunk_scaled_dot_kkt: value heads HV=4 must be a multiple of query/key heads H=3"),
    ("solve-chunk", "solve_tril", lambda: _with(solve_args(), A=torch.randn(1, 5, 4, 32)),
     "tq.solve_tril: A last dim must be the chunk size BT=64, got 32"),
    ("wu-A-shape", "recompute_w_u", lambda: _with(wu_args(), A=torch.randn(1, 5, 2, 64)),
     "tq.recompute_w_u: A must have shape [B, T, HV, BT] = [1, 5, 4, 64], got [1, 5, 2, 64]"),
    ("h-w-shape", "chunk_fwd_h", lambda: _with(h_args(), w=torch.randn(1, 5, 4, 128)),
     "tq.chunk_fwd_h: w must have shape [B, T, HV, K] = [1, 5, 4, 64], got [1, 5, 4, 128]"),
    ("o-h-chunks", "chunk_fwd_o", lambda: _with(o_args(T=70), h=torch.randn(1, 1, 4, 64, 64)),
     "tq.chunk_fwd_o: h must hold NT = ceil(T/BT) = 2 chunk states, got 1"),
]
