// The first stages of the chunked gated delta rule (DESIGN §5; CPU reference:
// torch_tq/backends/cpu/gated_delta_rule.py):
//
//   chunk_local_cumsum    G = cumsum of g within each chunk (restarting at every sequence start)
//   chunk_scaled_dot_kkt  A_ij = beta_i (k_i . k_j) exp(G_i - G_j) for i > j in a chunk, else 0
//   solve_tril            (I + A)^-1 of every chunk's 64 x 64 block
//
// Rows of A follow FLA: token t's row of its chunk's matrix, column j = the chunk's j-th token. A
// partial last chunk of L tokens is an L x L problem; its rows hold zeros from column L on (as the
// CPU reference's zero padding gives), and no row outside the chunk is read or written.
#pragma once

#include "gated_delta_utils.h"

// ---- chunk_local_cumsum ----------------------------------------------------------------------

// Global chunk c of `chunk_size` tokens (any power of two, unlike gdr_chunk's fixed 64).
inline GdrChunk gdr_cumsum_chunk(uint c, uint chunk_size, uint tokens, uint sequences, uint has_cu_seqlens,
                             const device int* cu_seqlens) {
  if (has_cu_seqlens == 0) {
    const uint per_row = (tokens - 1) / chunk_size + 1;  // tokens >= 1 whenever a chunk is launched
    const uint b = c / per_row, j = c % per_row;
    return GdrChunk{b, b * tokens + j * chunk_size, min(chunk_size, tokens - j * chunk_size), j == 0 ? 1u : 0u};
  }
  uint first = 0;
  for (uint n = 0; n < sequences; ++n) {
    const uint start = uint(cu_seqlens[n]);
    const uint length = uint(cu_seqlens[n + 1]) - start;
    const uint count = length == 0 ? 0 : (length - 1) / chunk_size + 1;
    if (c < first + count) {
      const uint j = c - first;
      return GdrChunk{n, start + j * chunk_size, min(chunk_size, length - j * chunk_size), j == 0 ? 1u : 0u};
    }
    first += count;
  }
  return GdrChunk{sequences, 0, 0, 0};
}

// One simdgroup per (chunk, value head): 32 tokens per step, an inclusive simd prefix sum plus the
// running total of the previous steps. With `reverse`, step i reads the chunk's (L-1-i)-th token, so
// the same scan gives suffix sums. Lanes past the chunk's end add 0 and write nothing. A chunk size
// below 32 leaves lanes idle (rare sizes; the kernel stays one code path).
template <typename T>
[[kernel, max_total_threads_per_threadgroup(TQ_GDR_CUMSUM_SIMDGROUPS * 32)]] void chunk_local_cumsum(
    device const T* g [[buffer(0)]],
    device const int* cu_seqlens [[buffer(1)]],
    device float* out [[buffer(2)]],
    constant ChunkLocalCumsumParams& p [[buffer(3)]],
    uint2 tgid [[threadgroup_position_in_grid]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simdgroups [[simdgroups_per_threadgroup]]) {
  const uint head = tgid.y * simdgroups + sg;
  if (head >= p.value_heads) return;  // the whole simdgroup: no collective is left waiting
  const GdrChunk c = gdr_cumsum_chunk(tgid.x, p.chunk_size, p.tokens, p.sequences, p.has_cu_seqlens, cu_seqlens);
  float carry = 0.0f;
  for (uint i0 = 0; i0 < c.length; i0 += 32) {
    const uint i = i0 + lane;
    const bool valid = i < c.length;
    const uint index = (c.start + (p.reverse != 0 ? c.length - 1 - i : i)) * p.value_heads + head;
    const float x = valid ? static_cast<float>(g[index]) : 0.0f;
    const float sum = carry + simd_prefix_inclusive_sum(x);
    if (valid) out[index] = p.has_scale != 0 ? sum * p.scale : sum;
    carry = simd_broadcast(sum, 31);
  }
}

// ---- chunk_scaled_dot_kkt ---------------------------------------------------------------------

// One threadgroup per (chunk, key head), 4 simdgroups. k k^T of the chunk is computed once with
// 8x8 simdgroup matrices: only the 36 tiles at or below the diagonal, simdgroup s taking row blocks
// s and 7 - s (9 tiles each, accumulators in registers). k streams through threadgroup memory in
// slabs of 64 tokens x 32 features, converted to float32 (rows past a partial chunk are 0). The
// tiles then go to threadgroup memory and every value head of the group writes its rows of A:
// exp(G_i - G_j) * beta_i * (k_i . k_j) for j < i (masked before the exp: every exponent is a
// difference G_i - G_j with i > j), 0 elsewhere, whole 64-float rows, coalesced.
template <typename T>
[[kernel, max_total_threads_per_threadgroup(TQ_GDR_KKT_SIMDGROUPS * 32)]] void chunk_scaled_dot_kkt(
    device const T* k [[buffer(0)]],
    device const float* g [[buffer(1)]],
    device const float* beta [[buffer(2)]],
    device const int* cu_seqlens [[buffer(3)]],
    device float* A [[buffer(4)]],
    constant ChunkScaledDotKktParams& p [[buffer(5)]],
    uint2 tgid [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  constexpr uint BT = TQ_GDR_CHUNK;
  constexpr uint SLAB = 32;  // key features per slab
  constexpr uint NT = TQ_GDR_KKT_SIMDGROUPS * 32;
  static_assert(TQ_GDR_KKT_SIMDGROUPS == 4 && BT == 64, "the tile split assumes 4 simdgroups and 8 row blocks");

  threadgroup float k_slab[BT * SLAB];  // 8 KB
  threadgroup float kk[BT * BT];        // 16 KB; only tiles at or below the diagonal are written
  threadgroup float g_chunk[BT];
  threadgroup float beta_chunk[BT];

  const GdrChunk c = gdr_chunk(tgid.x, p.tokens, p.sequences, p.has_cu_seqlens, cu_seqlens);
  const uint kh = tgid.y;
  const uint rb0 = sg, rb1 = 7 - sg;  // this simdgroup's row blocks: tiles (rb0, 0..rb0), (rb1, 0..rb1)

  simdgroup_float8x8 acc0[4], acc1[8];
  for (uint cb = 0; cb < 4; ++cb) acc0[cb] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  for (uint cb = 0; cb < 8; ++cb) acc1[cb] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);

  for (uint d0 = 0; d0 < p.head_dim; d0 += SLAB) {
    for (uint e = tid; e < BT * SLAB; e += NT) {
      const uint i = e / SLAB, d = e % SLAB;
      k_slab[e] = i < c.length ? static_cast<float>(k[((c.start + i) * p.heads + kh) * p.head_dim + d0 + d]) : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint d = 0; d < SLAB; d += 8) {
      simdgroup_float8x8 a0, a1, bt;
      simdgroup_load(a0, k_slab, SLAB, ulong2(d, 8 * rb0));
      simdgroup_load(a1, k_slab, SLAB, ulong2(d, 8 * rb1));
      // Fixed trip counts with uniform predicates: the loops unroll and the accumulators keep
      // static indices (registers).
      for (uint cb = 0; cb < 8; ++cb) {
        if (cb <= rb1) {
          simdgroup_load(bt, k_slab, SLAB, ulong2(d, 8 * cb), true);  // (k of column block cb)^T
          if (cb < 4 && cb <= rb0) simdgroup_multiply_accumulate(acc0[cb], a0, bt, acc0[cb]);
          simdgroup_multiply_accumulate(acc1[cb], a1, bt, acc1[cb]);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the slab is consumed before the next load
  }
  for (uint cb = 0; cb < 4; ++cb)
    if (cb <= rb0) simdgroup_store(acc0[cb], kk, BT, ulong2(8 * cb, 8 * rb0));
  for (uint cb = 0; cb < 8; ++cb)
    if (cb <= rb1) simdgroup_store(acc1[cb], kk, BT, ulong2(8 * cb, 8 * rb1));

  const uint group = p.value_heads / p.heads;
  for (uint gi = 0; gi < group; ++gi) {
    const uint hv = kh * group + gi;
    if (tid < c.length) {
      const uint index = (c.start + tid) * p.value_heads + hv;
      g_chunk[tid] = g[index];
      beta_chunk[tid] = beta[index];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // kk (first pass) and this head's G, beta are in place
    for (uint e = tid; e < c.length * BT; e += NT) {
      const uint i = e / BT, j = e % BT;
      // The CPU reference's order: (exp(G_i - G_j) * beta_i) * (k_i . k_j).
      const float a = j < i ? exp(g_chunk[i] - g_chunk[j]) * beta_chunk[i] * kk[e] : 0.0f;
      A[((c.start + i) * p.value_heads + hv) * BT + j] = a;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // G, beta are read before the next head's load
  }
}

// ---- solve_tril -------------------------------------------------------------------------------

// One threadgroup per (chunk, value head), 4 simdgroups, the block in 16 KB of threadgroup memory,
// inverted in place by gdr_solve_tril_in_place (gated_delta_utils.h). Only A's strictly lower
// triangle within the chunk's L x L block is read; the rest of the block is 0, so the result is the
// L x L inverse padded with the identity. Rows < L are written whole: the inverse's strictly lower
// part, 1 on the diagonal, 0 above.
[[kernel, max_total_threads_per_threadgroup(TQ_GDR_SOLVE_SIMDGROUPS * 32)]] void solve_tril(
    device const float* A [[buffer(0)]],
    device const int* cu_seqlens [[buffer(1)]],
    device float* Ai [[buffer(2)]],
    constant SolveTrilParams& p [[buffer(3)]],
    uint2 tgid [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  constexpr uint BT = TQ_GDR_CHUNK;
  constexpr uint NT = TQ_GDR_SOLVE_SIMDGROUPS * 32;
  static_assert(TQ_GDR_SOLVE_SIMDGROUPS == 4 && BT == 64, "each merge level has 4 strips, one per simdgroup");

  threadgroup float m[BT * BT];

  const GdrChunk c = gdr_chunk(tgid.x, p.tokens, p.sequences, p.has_cu_seqlens, cu_seqlens);
  const uint hv = tgid.y;
  for (uint e = tid; e < BT * BT; e += NT) {
    const uint i = e / BT, j = e % BT;
    m[e] = (j < i && i < c.length) ? A[((c.start + i) * p.value_heads + hv) * BT + j] : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  gdr_solve_tril_in_place(m, tid, sg);

  for (uint e = tid; e < c.length * BT; e += NT) {
    const uint i = e / BT, col = e % BT;
    Ai[((c.start + i) * p.value_heads + hv) * BT + col] = col < i ? m[e] : (col == i ? 1.0f : 0.0f);
  }
}
