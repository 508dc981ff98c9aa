// Helpers shared by the gated-delta-rule kernels (DESIGN §5; CPU reference:
// torch_tq/backends/cpu/gated_delta_rule.py).
//
// Token rows: every [B, T, ...] tensor is read as B*T rows. Sequences are the B batch rows, or,
// with cu_seqlens (B = 1), the spans cu_seqlens[n] .. cu_seqlens[n+1]-1. Chunks of
// TQ_GDR_CHUNK tokens restart at every sequence start; a sequence's last chunk may be partial,
// and a sequence of length 0 has no chunk. The global chunk index c (0 .. NT-1, sequences in
// order) is the NT axis of h [B, NT, HV, K, V] (B = 1 with cu_seqlens, else NT = B*ceil(T/64)
// rows laid out as [B, ceil(T/64)]).
#pragma once

#include "utils.h"
#include "params.h"

// One sequence: its first token row in the flattened B*T axis and its length.
struct GdrSequence {
  uint start;
  uint length;
};

// Sequence n. `cu_seqlens` (int32, host-converted) is read only when has_cu_seqlens != 0.
inline GdrSequence gdr_sequence(uint n, uint tokens, uint has_cu_seqlens, const device int* cu_seqlens) {
  if (has_cu_seqlens == 0) return GdrSequence{n * tokens, tokens};
  const uint start = uint(cu_seqlens[n]);
  return GdrSequence{start, uint(cu_seqlens[n + 1]) - start};
}

// One chunk: its sequence, its first token row (flattened B*T axis), its length (1..64).
struct GdrChunk {
  uint sequence;
  uint start;
  uint length;
  uint first_of_sequence;  // 1 for the sequence's first chunk
};

// Global chunk c. Without cu_seqlens: B rows of ceil(T/64) chunks. With it: a linear scan over
// the N sequences (N is small; every thread of a threadgroup computes the same answer).
inline GdrChunk gdr_chunk(uint c, uint tokens, uint sequences, uint has_cu_seqlens, const device int* cu_seqlens) {
  if (has_cu_seqlens == 0) {
    const uint per_row = (tokens + TQ_GDR_CHUNK - 1) / TQ_GDR_CHUNK;
    const uint b = c / per_row, j = c % per_row;
    return GdrChunk{b, b * tokens + j * TQ_GDR_CHUNK, min(uint(TQ_GDR_CHUNK), tokens - j * TQ_GDR_CHUNK), j == 0 ? 1u : 0u};
  }
  uint first = 0;  // global index of sequence n's first chunk
  for (uint n = 0; n < sequences; ++n) {
    const uint start = uint(cu_seqlens[n]);
    const uint length = uint(cu_seqlens[n + 1]) - start;
    const uint count = (length + TQ_GDR_CHUNK - 1) / TQ_GDR_CHUNK;
    if (c < first + count) {
      const uint j = c - first;
      return GdrChunk{n, start + j * TQ_GDR_CHUNK, min(uint(TQ_GDR_CHUNK), length - j * TQ_GDR_CHUNK), j == 0 ? 1u : 0u};
    }
    first += count;
  }
  return GdrChunk{sequences, 0, 0, 0};  // c >= NT: no chunk (the plan never launches one)
}

// ---- the blocked inverse of solve_tril and the fused entry kernel ---------------------------

// One merge level of the blocked inverse, in place in `m` (64 x 64, holding T - I: the strictly
// lower part of the inverse where already known, of A elsewhere below the diagonal). For every
// pair of S x S diagonal blocks with inverses T1 (top) and T2 (bottom),
//   [[I + L11, 0], [A21, I + L22]]^-1 = [[T1, 0], [-T2 A21 T1, T2]],
// so A21 is replaced by -T2 A21 T1. The 4 work units are 8-row strips of the A21 blocks (64 / (2S)
// pairs x S / 8 strips), one per simdgroup 0 .. 3 (further simdgroups of a larger threadgroup only
// take the barriers); a strip of X = T2 A21 stays in registers across the barrier that lets every
// strip read A21 before any is overwritten.
template <uint S, typename M>
inline void gdr_solve_tril_merge(M m, uint sg) {
  constexpr uint BT = TQ_GDR_CHUNK;
  constexpr uint TILES = S / 8;
  const uint a = sg % TILES;           // strip within the block
  const uint o = 2 * S * (sg / TILES);  // first row and column of the pair
  const uint r2 = o + S;                // first row and column of T2 (= first row of A21)
  const bool works = sg < 4;  // uniform within the simdgroup
  simdgroup_float8x8 x[TILES], n, b;
  if (works) {
    // X[a, :] = A21[a, :] + sum_{c <= a} N2[a, c] A21[c, :], N2 = T2 - I (zero above its diagonal).
    for (uint cb = 0; cb < TILES; ++cb) simdgroup_load(x[cb], m, BT, ulong2(o + 8 * cb, r2 + 8 * a));
    for (uint cr = 0; cr < TILES; ++cr) {
      if (cr <= a) {  // uniform within the simdgroup
        simdgroup_load(n, m, BT, ulong2(r2 + 8 * cr, r2 + 8 * a));
        for (uint cb = 0; cb < TILES; ++cb) {
          simdgroup_load(b, m, BT, ulong2(o + 8 * cb, r2 + 8 * cr));
          simdgroup_multiply_accumulate(x[cb], n, b, x[cb]);
        }
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (works) {
    // Y[a, cb] = -(X T1)[a, cb] = -X[a, cb] - sum_{c >= cb} X[a, c] N1[c, cb], N1 = T1 - I.
    for (uint cb = 0; cb < TILES; ++cb) {
      x[cb].thread_elements()[0] = -x[cb].thread_elements()[0];
      x[cb].thread_elements()[1] = -x[cb].thread_elements()[1];
    }
    for (uint cb = 0; cb < TILES; ++cb) {
      simdgroup_float8x8 y = x[cb];
      for (uint cr = cb; cr < TILES; ++cr) {
        simdgroup_load(n, m, BT, ulong2(o + 8 * cb, o + 8 * cr));
        simdgroup_multiply_accumulate(y, x[cr], n, y);
      }
      simdgroup_store(y, m, BT, ulong2(o + 8 * cb, r2 + 8 * a));
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// (I + L)^-1 of the 64 x 64 block in `m` (threadgroup memory, row-major), in place: `m` holds L,
// strictly lower (0 on and above the diagonal), and gets T - I, the strictly lower part of the
// inverse (0 on and above the diagonal). Like the CPU reference: the eight 8 x 8 diagonal blocks are
// inverted by forward substitution (threads 0 .. 63, one per block column, the column in
// registers), then merged 8 -> 16 -> 32 -> 64 with simdgroup matrices by simdgroups 0 .. 3. Every
// thread of the threadgroup (at least 4 simdgroups) calls it: it holds barriers, the first of them
// after m is read, the last after it is written.
template <typename M>
inline void gdr_solve_tril_in_place(M m, uint tid, uint sg) {
  constexpr uint BT = TQ_GDR_CHUNK;
  // Column j of block blk of T = (I + L)^-1, rows j+1..7 by forward substitution
  // T[r][j] = -sum_{q < r} L[r][q] T[q][j] (T[j][j] = 1, T[q][j] = 0 above).
  const uint blk = (tid / 8) % 8, j = tid % 8, o = 8 * blk;
  float column[8];
  for (uint r = 0; r < 8; ++r) column[r] = r == j ? 1.0f : 0.0f;
  if (tid < 64) {
    for (uint r = 1; r < 8; ++r) {
      float s = 0.0f;
      for (uint q = 0; q < r; ++q) s += m[(o + r) * BT + o + q] * column[q];
      if (r > j) column[r] = -s;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid < 64) {
    for (uint r = 0; r < 8; ++r)
      if (r > j) m[(o + r) * BT + o + j] = column[r];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  gdr_solve_tril_merge<8>(m, sg);
  gdr_solve_tril_merge<16>(m, sg);
  gdr_solve_tril_merge<32>(m, sg);
}
