"""One table of invalid inputs and the message each backend must give (DESIGN: same error everywhere).

Each case builds the keyword arguments of one ``torch.ops.tq`` op from a valid baseline with one
thing wrong. Backends other than the CPU reference (the MPS plans through the simulator, CUDA)
run the same table.
"""

from __future__ import annotations

import torch

import torch_tq


def quantize_args(B=1, T=3, Hkv=2, D=64, C=8, bits=4, write_pos=0, is_sliding=False, src_dtype=torch.float32):
    codes, norms = torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits)
    return dict(src=torch.randn(B, T, Hkv, D).to(src_dtype), codes=codes, norms=norms, write_pos=write_pos,
                is_sliding=is_sliding, bits=bits, signs=torch_tq.hadamard_signs(D))


def attention_args(B=1, Hq=4, Hkv=2, Lq=1, D=64, C=8, kv_len=5, bits=4, sliding_window=0, softcap=0.0):
    k_codes, k_norms = torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits)
    v_codes, v_norms = torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits)
    k_norms.uniform_(0.5, 2)
    v_norms.uniform_(0.5, 2)
    return dict(q=torch.randn(B, Hq, Lq, D), k_codes=k_codes, k_norms=k_norms, v_codes=v_codes, v_norms=v_norms,
                kv_len=kv_len, scale=D**-0.5, bits=bits, sliding_window=sliding_window, softcap=softcap,
                kv_start=None, signs=torch_tq.hadamard_signs(D))


def dequantize_args(B=1, Hkv=2, D=64, C=8, bits=4, start=0, length=4):
    codes, norms = torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits)
    return dict(codes=codes, norms=norms, start=start, length=length, bits=bits, rotated=False,
                signs=torch_tq.hadamard_signs(D))


def copy_args(B=1, T=3, Hkv=2, D=64, C=8, write_pos=0, is_sliding=False):
    return dict(src=torch.randn(B, T, Hkv, D), cache=torch.zeros(B, Hkv, C, D), write_pos=write_pos,
                is_sliding=is_sliding)


def _with(args, **changes):
    args.update(changes)
    return args


# (id, op, build() -> kwargs, exact message)
BAD_INPUTS = [
    ("quantize-src-rank", "hadamard_quantize_kv", lambda: _with(quantize_args(), src=torch.randn(3, 2, 64)),
     "tq.hadamard_quantize_kv: src must have rank 4 [B, T, Hkv, D], got shape [3, 2, 64]"),
    ("quantize-src-dtype", "hadamard_quantize_kv", lambda: _with(quantize_args(), src=torch.randn(1, 3, 2, 64).double()),
     "tq.hadamard_quantize_kv: src must be float32, float16 or bfloat16, got torch.float64"),
    ("quantize-head-dim", "hadamard_quantize_kv", lambda: _with(quantize_args(), src=torch.randn(1, 3, 2, 96)),
     "tq.hadamard_quantize_kv: head_dim must be one of (64, 128, 256, 512), got 96"),
    ("quantize-bits", "hadamard_quantize_kv", lambda: _with(quantize_args(), bits=7),
     "tq.hadamard_quantize_kv: bits must be one of (2, 3, 4, 5, 6, 8), got 7"),
    ("quantize-codes-dtype", "hadamard_quantize_kv", lambda: _with(quantize_args(), codes=torch.zeros(1, 2, 8, 32, dtype=torch.int8)),
     "tq.hadamard_quantize_kv: codes must be uint8, got torch.int8"),
    ("quantize-norms-dtype", "hadamard_quantize_kv", lambda: _with(quantize_args(), norms=torch.zeros(1, 2, 8, 1, dtype=torch.float16)),
     "tq.hadamard_quantize_kv: norms must be float32, got torch.float16"),
    ("quantize-codes-row-bytes", "hadamard_quantize_kv", lambda: _with(quantize_args(bits=3), codes=torch.zeros(1, 2, 8, 32, dtype=torch.uint8)),
     "tq.hadamard_quantize_kv: codes last dim 32 does not fit src's head_dim=64 at bits=3 (needs D*bits/8 = 24); "
     "it is a cache of head_dim=64 at bits=4"),
    ("quantize-norms-blocks", "hadamard_quantize_kv", lambda: _with(quantize_args(D=512), norms=torch.zeros(1, 2, 8, 1)),
     "tq.hadamard_quantize_kv: norms last dim must be D/R = 2 for head_dim=512, got 1"),
    ("quantize-heads-mismatch", "hadamard_quantize_kv", lambda: _with(quantize_args(), src=torch.randn(1, 3, 3, 64)),
     "tq.hadamard_quantize_kv: codes must have [B, Hkv] = [1, 3] to match src, got [1, 2]"),
    ("quantize-src-transposed", "hadamard_quantize_kv", lambda: _with(quantize_args(Hkv=2, C=16), src=torch.randn(1, 2, 5, 64)),
     "tq.hadamard_quantize_kv: src must be [B, T, Hkv, D] with [B, Hkv] = [1, 2] like codes, got shape [1, 2, 5, 64]; "
     "did you pass [B, Hkv, T, D]?"),
    ("quantize-global-overflow", "hadamard_quantize_kv", lambda: quantize_args(T=3, C=8, write_pos=6),
     "tq.hadamard_quantize_kv: write of T=3 tokens at write_pos=6 overflows the global cache capacity C=8 "
     "(needs write_pos + T <= C; use is_sliding=True for a ring buffer)"),
    ("quantize-negative-pos", "hadamard_quantize_kv", lambda: quantize_args(write_pos=-1),
     "tq.hadamard_quantize_kv: write_pos must be >= 0, got -1"),
    ("quantize-noncontiguous", "hadamard_quantize_kv",
     lambda: _with(quantize_args(), codes=torch.zeros(1, 8, 2, 32, dtype=torch.uint8).transpose(1, 2)),
     "tq.hadamard_quantize_kv: codes must be contiguous (cache tensors are written in place), got strides (512, 32, 64, 1)"),
    ("quantize-offset-shape", "hadamard_quantize_kv", lambda: _with(quantize_args(), offset=torch.zeros(1, 1, 2, 64)),
     "tq.hadamard_quantize_kv: offset must have shape [B, Hkv, D] = [1, 2, 64], got [1, 1, 2, 64]"),
    ("quantize-offset-dtype", "hadamard_quantize_kv", lambda: _with(quantize_args(), offset=torch.zeros(1, 2, 64).half()),
     "tq.hadamard_quantize_kv: offset must be float32, got torch.float16"),
    ("quantize-recent-empty", "hadamard_quantize_kv", lambda: _with(quantize_args(), recent=torch.zeros(1, 2, 0, 64)),
     "tq.hadamard_quantize_kv: recent must hold between 1 and C=8 positions, got 0"),
    ("quantize-sink-shape", "hadamard_quantize_kv", lambda: _with(quantize_args(), sink=torch.zeros(1, 3, 4, 64)),
     "tq.hadamard_quantize_kv: sink must have [B, Hkv, *, D] = [1, 2, *, 64], got [1, 3, 4, 64]"),
    ("quantize-recent-noncontiguous", "hadamard_quantize_kv",
     lambda: _with(quantize_args(), recent=torch.zeros(1, 4, 2, 64).transpose(1, 2)),
     "tq.hadamard_quantize_kv: recent must be contiguous (cache tensors are written in place), got strides (512, 64, 128, 1)"),
    ("quantize-signs-shape", "hadamard_quantize_kv", lambda: _with(quantize_args(), signs=torch.ones(32)),
     "tq.hadamard_quantize_kv: signs must have shape [D] = [64], got [32]"),
    ("dequantize-length", "dequantize_kv", lambda: dequantize_args(C=8, length=9),
     "tq.dequantize_kv: length must be in [0, C=8] (positions alias beyond the capacity), got 9"),
    ("dequantize-bits", "dequantize_kv", lambda: _with(dequantize_args(), bits=1),
     "tq.dequantize_kv: bits must be one of (2, 3, 4, 5, 6, 8), got 1"),
    ("attn-head-dim", "flash_attn_vec_tq", lambda: _with(attention_args(), q=torch.randn(1, 4, 1, 96)),
     "tq.flash_attn_vec_tq: head_dim must be one of (64, 128, 256, 512), got 96"),
    ("attn-gqa-ratio", "flash_attn_vec_tq", lambda: attention_args(Hq=5, Hkv=2),
     "tq.flash_attn_vec_tq: query heads Hq=5 must be a multiple of KV heads Hkv=2"),
    ("attn-lq-gt-kv-len", "flash_attn_vec_tq", lambda: attention_args(Lq=4, kv_len=3),
     "tq.flash_attn_vec_tq: kv_len=3 must be >= Lq=4 (the queries are the last Lq positions)"),
    ("attn-wrapped-full", "flash_attn_vec_tq", lambda: attention_args(C=8, kv_len=9),
     "tq.flash_attn_vec_tq: kv_len=9 exceeds the cache capacity C=8: the cache has wrapped, which is only valid "
     "with 0 < sliding_window <= C (full attention needs tokens that are gone)"),
    ("attn-window-gt-capacity", "flash_attn_vec_tq", lambda: attention_args(C=8, sliding_window=9),
     "tq.flash_attn_vec_tq: sliding_window=9 exceeds the cache capacity C=8"),
    ("attn-wrapped-window-lq", "flash_attn_vec_tq", lambda: attention_args(C=8, kv_len=12, Lq=2, sliding_window=8),
     "tq.flash_attn_vec_tq: kv_len=12 exceeds the cache capacity C=8 and the first of Lq=2 queries needs "
     "sliding_window=8 positions: sliding_window + Lq - 1 must be <= C"),
    ("attn-v-shape", "flash_attn_vec_tq",
     lambda: _with(attention_args(), v_codes=torch.zeros(1, 2, 9, 32, dtype=torch.uint8), v_norms=torch.zeros(1, 2, 9, 1)),
     "tq.flash_attn_vec_tq: v_codes shape [1, 2, 9, 32] must match k_codes shape [1, 2, 8, 32] in [B, Hkv, C]"),
    ("attn-v-bits", "flash_attn_vec_tq", lambda: _with(attention_args(), v_bits=7),
     "tq.flash_attn_vec_tq: v_bits must be one of (2, 3, 4, 5, 6, 8) (or None = bits), got 7"),
    ("attn-v-bits-codes-mismatch", "flash_attn_vec_tq", lambda: _with(attention_args(bits=4), v_bits=2),
     "tq.flash_attn_vec_tq: v_codes last dim 32 does not fit q's head_dim=64 at bits=2 (needs D*bits/8 = 16); "
     "it is a cache of head_dim=128 at bits=2 or head_dim=64 at bits=4"),
    ("attn-sink-pair", "flash_attn_vec_tq", lambda: _with(attention_args(), k_sink=torch.randn(1, 2, 4, 64)),
     "tq.flash_attn_vec_tq: k_sink and v_sink must be given together, got only k_sink"),
    ("attn-recent-shape", "flash_attn_vec_tq",
     lambda: _with(attention_args(), k_recent=torch.randn(1, 2, 4, 128), v_recent=torch.randn(1, 2, 4, 128)),
     "tq.flash_attn_vec_tq: k_recent must have [B, Hkv, *, D] = [1, 2, *, 64], got [1, 2, 4, 128]"),
    ("attn-recent-empty", "flash_attn_vec_tq",
     lambda: _with(attention_args(), k_recent=torch.randn(1, 2, 0, 64), v_recent=torch.randn(1, 2, 0, 64)),
     "tq.flash_attn_vec_tq: k_recent must hold between 1 and C=8 positions, got 0"),
    ("attn-sink-gt-capacity", "flash_attn_vec_tq",
     lambda: _with(attention_args(), k_sink=torch.randn(1, 2, 9, 64), v_sink=torch.randn(1, 2, 9, 64)),
     "tq.flash_attn_vec_tq: k_sink must hold between 0 and C=8 positions, got 9"),
    ("attn-recent-dtype", "flash_attn_vec_tq",
     lambda: _with(attention_args(), k_recent=torch.randn(1, 2, 4, 64), v_recent=torch.randn(1, 2, 4, 64).double()),
     "tq.flash_attn_vec_tq: v_recent must be float32, float16 or bfloat16, got torch.float64"),
    ("attn-recent-v-shape", "flash_attn_vec_tq",
     lambda: _with(attention_args(), k_recent=torch.randn(1, 2, 4, 64), v_recent=torch.randn(1, 2, 3, 64)),
     "tq.flash_attn_vec_tq: v_recent shape [1, 2, 3, 64] must equal k_recent shape [1, 2, 4, 64]"),
    ("attn-k-norms-dtype", "flash_attn_vec_tq", lambda: _with(attention_args(), k_norms=torch.zeros(1, 2, 8, 1, dtype=torch.bfloat16)),
     "tq.flash_attn_vec_tq: k_norms must be float32, got torch.bfloat16"),
    ("attn-kv-start-dtype", "flash_attn_vec_tq", lambda: _with(attention_args(), kv_start=torch.zeros(1, dtype=torch.int32)),
     "tq.flash_attn_vec_tq: kv_start must be int64, got torch.int32"),
    ("attn-bits-codes-mismatch", "flash_attn_vec_tq", lambda: _with(attention_args(bits=4), bits=2),
     "tq.flash_attn_vec_tq: k_codes last dim 32 does not fit q's head_dim=64 at bits=2 (needs D*bits/8 = 16); "
     "it is a cache of head_dim=128 at bits=2 or head_dim=64 at bits=4"),
    ("attn-q-head-dim-vs-cache", "flash_attn_vec_tq", lambda: _with(attention_args(D=128), q=torch.randn(1, 4, 1, 64)),
     "tq.flash_attn_vec_tq: k_codes last dim 64 does not fit q's head_dim=64 at bits=4 (needs D*bits/8 = 32); "
     "it is a cache of head_dim=128 at bits=4 or head_dim=64 at bits=8"),
    ("attn-codes-no-supported-reading", "flash_attn_vec_tq",
     lambda: _with(attention_args(), k_codes=torch.zeros(1, 2, 8, 33, dtype=torch.uint8)),
     "tq.flash_attn_vec_tq: k_codes last dim 33 does not fit q's head_dim=64 at bits=4 (needs D*bits/8 = 32)"),
    *[(f"attn-scale-{name}", "flash_attn_vec_tq", lambda value=value: _with(attention_args(), scale=value),
       f"tq.flash_attn_vec_tq: scale must be a finite number > 0, got {text}")
      for name, value, text in [("nan", float("nan"), "nan"), ("inf", float("inf"), "inf"), ("zero", 0.0, "0.0"),
                                ("negative", -0.125, "-0.125")]],
    ("attn-softcap", "flash_attn_vec_tq", lambda: attention_args(softcap=-1.0),
     "tq.flash_attn_vec_tq: softcap must be >= 0 (0 = off), got -1.0"),
    ("copy-cache-shape", "kv_cache_copy", lambda: _with(copy_args(), cache=torch.zeros(1, 2, 8, 128)),
     "tq.kv_cache_copy: cache must have [B, Hkv, *, D] = [1, 2, *, 64] to match src, got [1, 2, 8, 128]"),
    ("copy-src-transposed", "kv_cache_copy", lambda: _with(copy_args(), src=torch.randn(1, 2, 3, 64)),
     "tq.kv_cache_copy: src must be [B, T, Hkv, D] with [B, Hkv] = [1, 2] like cache, got shape [1, 2, 3, 64]; "
     "did you pass [B, Hkv, T, D]?"),
    ("copy-cache-dtype", "kv_cache_copy", lambda: _with(copy_args(), cache=torch.zeros(1, 2, 8, 64, dtype=torch.int32)),
     "tq.kv_cache_copy: cache must be float32, float16 or bfloat16, got torch.int32"),
    ("copy-global-overflow", "kv_cache_copy", lambda: copy_args(T=5, C=8, write_pos=4),
     "tq.kv_cache_copy: write of T=5 tokens at write_pos=4 overflows the global cache capacity C=8 "
     "(needs write_pos + T <= C; use is_sliding=True for a ring buffer)"),
]
