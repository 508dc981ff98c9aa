// tq.recompute_w_u, tq.chunk_fwd_h and tq.chunk_fwd_o: the matrix stages of the chunked gated delta
// rule (DESIGN §5; CPU reference torch_tq/backends/cpu/gated_delta_rule.py: recompute_w_u_chunks,
// fwd_h_chunks, fwd_o_chunks). G below is the within-chunk cumulative gate (the op input `g`).
//
//   recompute_w_u   w = A (beta exp(G) k),  u = A (beta v)                      per chunk
//   chunk_fwd_h     h[c] = S;  v_new = u - w S;  S = exp(G_last) S + k^T (exp(G_last - G) v_new)
//   chunk_fwd_o     o = scale [(exp(G) q) S + ((q k^T) exp(G_i - G_j) [i >= j]) v_new]
//
// Shared layout: a threadgroup of TQ_GDR_CHUNK_SIMDGROUPS (4) simdgroups computes a 64-row chunk x
// 32-column output tile with 8x8 simdgroup_matrix products (chunk_fwd_h: 8 simdgroups, 64 columns);
// simdgroup s owns the tile's columns 8s .. 8s+7, i.e. one matrix per 8-row block. Operands every
// simdgroup reads (A, w, k, q) are staged in threadgroup memory as float32, zero past the chunk's
// last token; operands a simdgroup needs alone (its columns of u, v_new, h and of the state) go
// straight between device memory and its matrices. A partial chunk reads and writes only its own
// token rows: its padded rows are zero, as in the CPU reference, so they add nothing to any product.
#pragma once

#include "gated_delta_utils.h"

#if defined(TQ_MSL_SIM)
#define GDR_UNROLL
#else
#define GDR_UNROLL _Pragma("clang loop unroll(full)")
#endif

// Row and first column of the two consecutive elements a lane holds in an 8x8 simdgroup_matrix
// (thread_elements(); Apple's layout, the one MLX's MMA fragments use).
inline uint gdr_frag_row(uint lane) { return ((lane / 4) & 4) + (lane / 2) % 4; }
inline uint gdr_frag_col(uint lane) { return ((lane / 4) & 2) * 2 + (lane % 2) * 2; }

// The 8x8 block at (row, col) of a row-major float tile in threadgroup memory with ld columns, or
// its transpose. The pointer carries the offset (matrix_origin stays 0, unambiguous with transpose).
template <typename Tile>
inline simdgroup_float8x8 gdr_tile_block(Tile tile, uint ld, uint row, uint col, bool transpose = false) {
  simdgroup_float8x8 m;
  simdgroup_load(m, tile + row * ld + col, ld, ulong2(0, 0), transpose);
  return m;
}

// Multiplies the lane's two elements (they share one row) by f.
inline void gdr_scale_elements(thread simdgroup_float8x8& m, float f) {
  m.thread_elements()[0] *= f;
  m.thread_elements()[1] *= f;
}

// Rows row0 .. row0+7, columns 0 .. 7 of a row-major float matrix in device memory (row stride
// ld); rows >= valid read as zero. A whole block is one simdgroup_load; the block holding the end
// of a partial chunk is read lane by lane so that no row past the chunk is touched.
inline simdgroup_float8x8 gdr_load_rows(device const float* src, uint ld, uint row0, uint valid, uint lane) {
  simdgroup_float8x8 m;
  if (row0 + 8 <= valid) {
    simdgroup_load(m, src + row0 * ld, ld);
  } else {
    const uint r = row0 + gdr_frag_row(lane);
    const uint at = r * ld + gdr_frag_col(lane);
    const bool ok = r < valid;
    m.thread_elements()[0] = ok ? src[at] : 0.0f;
    m.thread_elements()[1] = ok ? src[at + 1] : 0.0f;
  }
  return m;
}

// Stores rows row0 .. row0+7 (those < valid) of an 8x8 block to device memory (row stride ld),
// converted to O.
template <typename O>
inline void gdr_store_rows(simdgroup_float8x8 m, device O* dst, uint ld, uint row0, uint valid, uint lane) {
  if constexpr (is_same_v<O, float>) {
    if (row0 + 8 <= valid) {
      simdgroup_store(m, dst + row0 * ld, ld);
      return;
    }
  }
  const uint r = row0 + gdr_frag_row(lane);
  if (r < valid) {
    const uint at = r * ld + gdr_frag_col(lane);
    dst[at] = O(m.thread_elements()[0]);
    dst[at + 1] = O(m.thread_elements()[1]);
  }
}

// tile[r][c] = factor * src[r * ld + c] as float for the chunk's rows r < valid, 0 for padded rows;
// a [64, COLS] tile written by all THREADS threads, consecutive threads reading consecutive columns.
template <int COLS, uint THREADS = TQ_GDR_CHUNK_SIMDGROUPS * 32, typename T, typename Tile>
inline void gdr_stage_rows(Tile tile, device const T* src, uint ld, uint valid, float factor, uint tid) {
  for (uint e = tid; e < TQ_GDR_CHUNK * COLS; e += THREADS) {
    const uint r = e / COLS, c = e % COLS;
    tile[e] = r < valid ? factor * float(src[r * ld + c]) : 0.0f;
  }
}

// Same with a per-row factor (threadgroup array, already 0 for padded rows).
template <int COLS, typename T, typename Tile, typename Factors>
inline void gdr_stage_scaled_rows(Tile tile, device const T* src, uint ld, uint valid, Factors factors, uint tid) {
  constexpr uint THREADS = TQ_GDR_CHUNK_SIMDGROUPS * 32;
  for (uint e = tid; e < TQ_GDR_CHUNK * COLS; e += THREADS) {
    const uint r = e / COLS, c = e % COLS;
    tile[e] = r < valid ? float(src[r * ld + c]) * factors[r] : 0.0f;
  }
}

// Global index of sequence n's first chunk (the NT axis of h).
inline uint gdr_first_chunk(uint n, uint chunks_per_row, uint has_cu_seqlens, const device int* cu_seqlens) {
  if (has_cu_seqlens == 0) return n * chunks_per_row;
  uint first = 0;
  for (uint i = 0; i < n; ++i) {
    first += (uint(cu_seqlens[i + 1] - cu_seqlens[i]) + TQ_GDR_CHUNK - 1) / TQ_GDR_CHUNK;
  }
  return first;
}

// ---- recompute_w_u ------------------------------------------------------------------------------
// One threadgroup per (chunk, value head). A's lower triangle (diagonal included; the rest is
// never read, as the reference's tril()) is staged once (16 KB); then each 32-column tile of
// beta exp(G) k (-> w) and of beta v (-> u) is staged (8 KB) and multiplied: simdgroup s forms the
// 8 row blocks of its 8 columns, row block rb summing the rb + 1 blocks of A's lower triangle.
template <typename TK, typename TV>
[[kernel, max_total_threads_per_threadgroup(TQ_GDR_CHUNK_SIMDGROUPS * 32)]] void recompute_w_u(
    device const TK* k [[buffer(0)]],
    device const TV* v [[buffer(1)]],
    device const float* beta [[buffer(2)]],
    device const float* A [[buffer(3)]],
    device const float* g [[buffer(4)]],
    device const int* cu_seqlens [[buffer(5)]],
    device float* w [[buffer(6)]],
    device float* u [[buffer(7)]],
    constant GdrChunkParams& p [[buffer(8)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr uint BT = TQ_GDR_CHUNK;
  constexpr uint COLS = TQ_GDR_CHUNK_COLUMNS;
  constexpr uint THREADS = TQ_GDR_CHUNK_SIMDGROUPS * 32;
  threadgroup float a_tile[BT * BT];
  threadgroup float b_tile[BT * COLS];
  threadgroup float k_factor[BT];  // beta exp(G) per row, 0 for padded rows
  threadgroup float v_factor[BT];  // beta

  const GdrChunk chunk = gdr_chunk(tgid.x, p.tokens, p.sequences, p.has_cu_seqlens, cu_seqlens);
  const uint hv = tgid.y;
  const uint kh = hv / p.group;
  const uint HV = p.value_heads, K = p.head_dim, V = p.value_dim;
  const uint len = chunk.length;

  device const float* a_rows = A + (chunk.start * HV + hv) * BT;
  for (uint e = tid; e < BT * BT; e += THREADS) {
    const uint i = e / BT, j = e % BT;
    a_tile[e] = (i < len && j <= i) ? a_rows[i * HV * BT + j] : 0.0f;
  }
  if (tid < BT) {
    const bool ok = tid < len;
    const uint at = (chunk.start + tid) * HV + hv;
    const float b = ok ? beta[at] : 0.0f;
    k_factor[tid] = ok ? b * exp(g[at]) : 0.0f;
    v_factor[tid] = b;
  }

  const uint k_tiles = K / COLS;
  const uint tiles = k_tiles + V / COLS;
  for (uint t = 0; t < tiles; ++t) {
    const bool is_w = t < k_tiles;
    // A and the factors are staged (t = 0); the previous tile's readers are done (t > 0).
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (is_w) {
      gdr_stage_scaled_rows<COLS>(b_tile, k + (chunk.start * p.heads + kh) * K + t * COLS, p.heads * K, len, k_factor,
                                  tid);
    } else {
      gdr_stage_scaled_rows<COLS>(b_tile, v + (chunk.start * HV + hv) * V + (t - k_tiles) * COLS, HV * V, len,
                                  v_factor, tid);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    simdgroup_float8x8 b_frag[8];
    GDR_UNROLL
    for (uint tb = 0; tb < 8; ++tb) {
      b_frag[tb] = gdr_tile_block(b_tile, COLS, tb * 8, sg * 8);
    }
    const uint ld = is_w ? HV * K : HV * V;
    device float* out = is_w ? w + (chunk.start * HV + hv) * K + t * COLS + sg * 8
                             : u + (chunk.start * HV + hv) * V + (t - k_tiles) * COLS + sg * 8;
    GDR_UNROLL
    for (uint rb = 0; rb < 8; ++rb) {
      if (rb * 8 >= len) break;  // rows past the chunk's end are not written
      simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      GDR_UNROLL
      for (uint tb = 0; tb <= rb; ++tb) {
        simdgroup_multiply_accumulate(acc, gdr_tile_block(a_tile, BT, rb * 8, tb * 8), b_frag[tb], acc);
      }
      gdr_store_rows(acc, out, ld, rb * 8, len, lane);
    }
  }
}

// ---- chunk_fwd_h --------------------------------------------------------------------------------
// One threadgroup of TQ_GDR_FWD_H_SIMDGROUPS (8) simdgroups per (64 value columns, value head,
// sequence), walking the sequence's chunks in order. The state S [K, 64] stays in registers for the
// whole sequence: simdgroup s holds its 8 columns as K/8 matrices. Per chunk: S is stored to h;
// v_new = u - w S starts from the simdgroup's columns of u and accumulates -w (staged 64 columns at
// a time) times S; its rows are stored, scaled by exp(G_last - G) (the reference scales k by it:
// the same product), and S = exp(G_last) S + k^T v_new with k staged 64 columns at a time and read
// transposed. No simdgroup needs another's columns, so the state never goes through threadgroup
// memory.
// Tile width: every threadgroup stages all of the chunk's w and k rows (the same rows for each of
// the V / 64 column tiles and, for k, for each of the HV / H value heads of a key head), so the
// device reads of k and w grow with the number of column tiles. 64 columns over 8 simdgroups
// (rather than 32 over 4) halve them (k is read V / 64 x HV / H times, w V / 64 times: once each
// at V = 64 without GVA) at the same registers per thread (each simdgroup still owns 8 state
// columns: K/8 + 8 matrices) and the same threadgroup memory (one 64 x 64 float slice + 64 gates,
// 16.25 KB), with twice the threads staging each slice. The price: half as many threadgroups
// (V / 64 x HV x N) for the sequential chunk walk, and barriers across 8 simdgroups instead of 4.
// 128 columns would halve the re-reads again, but with 512-thread threadgroups whose threads each
// still hold K/4 + 16 floats of S and v_new (80 at K = 256): a register budget they may not have.
template <typename TK, int K>
[[kernel, max_total_threads_per_threadgroup(TQ_GDR_FWD_H_SIMDGROUPS * 32)]] void chunk_fwd_h(
    device const TK* k [[buffer(0)]],
    device const float* w [[buffer(1)]],
    device const float* u [[buffer(2)]],
    device const float* g [[buffer(3)]],
    device const float* initial_state [[buffer(4)]],
    device const int* cu_seqlens [[buffer(5)]],
    device float* h [[buffer(6)]],
    device float* v_new [[buffer(7)]],
    device float* final_state [[buffer(8)]],
    constant GdrChunkParams& p [[buffer(9)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr uint BT = TQ_GDR_CHUNK;
  constexpr uint SLICE = 64;  // columns of w or k staged at once
  constexpr uint THREADS = TQ_GDR_FWD_H_SIMDGROUPS * 32;
  constexpr uint KB = K / 8;
  static_assert(K % SLICE == 0, "K must be a multiple of the staged slice");
  threadgroup float slice[BT * SLICE];
  threadgroup float gate[BT];

  const uint column = tgid.x * TQ_GDR_FWD_H_COLUMNS + sg * 8;
  const uint hv = tgid.y;
  const uint n = tgid.z;
  const uint kh = hv / p.group;
  const uint H = p.heads, HV = p.value_heads, V = p.value_dim;
  const GdrSequence seq = gdr_sequence(n, p.tokens, p.has_cu_seqlens, cu_seqlens);
  uint chunk_index = gdr_first_chunk(n, p.chunks_per_row, p.has_cu_seqlens, cu_seqlens);

  // S[kb] = rows 8kb .. 8kb+7 of the simdgroup's 8 state columns.
  const uint state_at = (n * HV + hv) * K * V + column;
  simdgroup_float8x8 S[KB];
  GDR_UNROLL
  for (uint kb = 0; kb < KB; ++kb) {
    if (p.has_initial_state != 0) {
      simdgroup_load(S[kb], initial_state + state_at + kb * 8 * V, V);
    } else {
      S[kb] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
  }

  for (uint pos = 0; pos < seq.length; pos += BT, ++chunk_index) {
    const uint row0 = seq.start + pos;
    const uint len = min(BT, seq.length - pos);

    device float* h_chunk = h + (chunk_index * HV + hv) * K * V + column;
    GDR_UNROLL
    for (uint kb = 0; kb < KB; ++kb) {
      simdgroup_store(S[kb], h_chunk + kb * 8 * V, V);
    }

    // The previous chunk's readers of `slice` and `gate` are done.
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid < BT) {
      // Padded rows repeat the last token's G, as the reference's edge padding.
      gate[tid] = g[(row0 + min(tid, len - 1)) * HV + hv];
    }

    // v_new = u - w S.
    const uint value_at = (row0 * HV + hv) * V + column;
    simdgroup_float8x8 vn[8];
    GDR_UNROLL
    for (uint rb = 0; rb < 8; ++rb) {
      vn[rb] = gdr_load_rows(u + value_at, HV * V, rb * 8, len, lane);
    }
    GDR_UNROLL
    for (uint s = 0; s < K / SLICE; ++s) {
      if (s > 0) threadgroup_barrier(mem_flags::mem_threadgroup);
      gdr_stage_rows<SLICE, THREADS>(slice, w + (row0 * HV + hv) * K + s * SLICE, HV * K, len, -1.0f, tid);
      threadgroup_barrier(mem_flags::mem_threadgroup);
      GDR_UNROLL
      for (uint kk = 0; kk < SLICE / 8; ++kk) {
        GDR_UNROLL
        for (uint rb = 0; rb < 8; ++rb) {
          if (rb * 8 >= len) break;  // padded rows: w is zero
          simdgroup_multiply_accumulate(vn[rb], gdr_tile_block(slice, SLICE, rb * 8, kk * 8), S[s * (SLICE / 8) + kk],
                                        vn[rb]);
        }
      }
    }
    GDR_UNROLL
    for (uint rb = 0; rb < 8; ++rb) {
      if (rb * 8 >= len) break;
      gdr_store_rows(vn[rb], v_new + value_at, HV * V, rb * 8, len, lane);
    }

    // S = exp(G_last) S + k^T (exp(G_last - G) v_new); every exponent is <= 0.
    const float g_last = gate[len - 1];
    GDR_UNROLL
    for (uint rb = 0; rb < 8; ++rb) {
      gdr_scale_elements(vn[rb], exp(g_last - gate[rb * 8 + gdr_frag_row(lane)]));
    }
    const float decay = exp(g_last);
    GDR_UNROLL
    for (uint kb = 0; kb < KB; ++kb) {
      gdr_scale_elements(S[kb], decay);
    }
    GDR_UNROLL
    for (uint s = 0; s < K / SLICE; ++s) {
      threadgroup_barrier(mem_flags::mem_threadgroup);
      gdr_stage_rows<SLICE, THREADS>(slice, k + (row0 * H + kh) * K + s * SLICE, H * K, len, 1.0f, tid);
      threadgroup_barrier(mem_flags::mem_threadgroup);
      GDR_UNROLL
      for (uint kk = 0; kk < SLICE / 8; ++kk) {
        GDR_UNROLL
        for (uint tb = 0; tb < 8; ++tb) {
          if (tb * 8 >= len) break;  // padded rows: k and v_new are zero
          // k^T block: key columns 8kk .. 8kk+7 (its rows) x tokens 8tb .. 8tb+7.
          const simdgroup_float8x8 kt = gdr_tile_block(slice, SLICE, tb * 8, kk * 8, true);
          simdgroup_multiply_accumulate(S[s * (SLICE / 8) + kk], kt, vn[tb], S[s * (SLICE / 8) + kk]);
        }
      }
    }
  }

  if (p.has_final_state != 0) {
    GDR_UNROLL
    for (uint kb = 0; kb < KB; ++kb) {
      simdgroup_store(S[kb], final_state + state_at + kb * 8 * V, V);
    }
  }
}

// ---- chunk_fwd_o --------------------------------------------------------------------------------
// One threadgroup per (chunk, value head), covering all V columns in 32-column tiles t; simdgroup s
// owns the tile's columns 8s .. 8s+7. q and k are read once, in 16-column key slices: over them
// simdgroup s accumulates the 9 blocks of the lower triangle of q k^T in row blocks s and 7 - s
// (every simdgroup has the same share) and, while q is staged anyway, tile 0's q S (S = h[chunk],
// its columns read straight from device memory). The triangle is masked and decayed in registers,
// scale exp(G_i - G_j) for i >= j (the mask chooses before exp, so every exponent is <= 0), and
// stored once as A [64, 64] (16 KB); each tile is o = scale exp(G) (q S) + A v_new, v_new read for
// the simdgroup's columns from device memory.
// q S needs q again for every tile after the first. q as float32 is 64 x K x 4 bytes (32 KB at
// K = 128) and does not fit next to A in the 28 KB this kernel allows itself (Apple's 32 KB less a
// margin for the compiler), but three of its 16-column slices do (A 16 KB + 3 x 4 KB, the gates
// living in A's space until A is stored), so the tiles walk the slices in snake order (forward,
// backward, ...): the three slices a tile ends with are still resident for the next, and only the
// K / 16 - 3 others are read again: q is read 1 + (V / 32 - 1) (K - 48) / K times (1.75 at K = 64;
// 2.9 instead of 4 at K = V = 128), k once. Keeping all of q instead would need o for all V columns
// in registers (8 V / 32 matrices per simdgroup: too many at V = 256), or q in half precision next
// to A.
template <typename T, typename O>
[[kernel, max_total_threads_per_threadgroup(TQ_GDR_CHUNK_SIMDGROUPS * 32)]] void chunk_fwd_o(
    device const T* q [[buffer(0)]],
    device const T* k [[buffer(1)]],
    device const float* v [[buffer(2)]],
    device const float* h [[buffer(3)]],
    device const float* g [[buffer(4)]],
    device const int* cu_seqlens [[buffer(5)]],
    device O* o [[buffer(6)]],
    constant GdrChunkParams& p [[buffer(7)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr uint BT = TQ_GDR_CHUNK;
  constexpr uint COLS = TQ_GDR_CHUNK_COLUMNS;
  constexpr uint SLICE = 16;  // key columns of q and k staged at once
  constexpr uint SLOTS = 3;   // q slices kept in threadgroup memory (any 3 consecutive slices: distinct slots)
  constexpr uint PAIRS = 9;   // lower-triangle blocks per simdgroup: (s + 1) + (8 - s)
  static_assert(TQ_GDR_CHUNK_SIMDGROUPS == 4, "the triangle split pairs row blocks s and 7 - s");
  // A [64, 64]; until A is stored: the k slice [64, SLICE], then the chunk's 64 gates.
  threadgroup float a_tile[BT * BT];
  // q slice s lives in slot s % SLOTS ([64, SLICE] each).
  threadgroup float q_slots[SLOTS * BT * SLICE];
  static_assert(BT * SLICE + BT <= BT * BT, "the k slice and the gates share A's space");

  const uint c = tgid.x;
  const uint hv = tgid.y;
  const uint kh = hv / p.group;
  const uint H = p.heads, HV = p.value_heads, K = p.head_dim, V = p.value_dim;
  const GdrChunk chunk = gdr_chunk(c, p.tokens, p.sequences, p.has_cu_seqlens, cu_seqlens);
  const uint row0 = chunk.start;
  const uint len = chunk.length;

  auto k_tile = a_tile;
  auto gate = a_tile + BT * SLICE;
  if (tid < BT) {
    gate[tid] = g[(row0 + min(tid, len - 1)) * HV + hv];
  }

  // Block i of this simdgroup's triangle share: row block lo = s for i <= s, else hi = 7 - s.
  const uint lo = sg, hi = 7 - sg;
  simdgroup_float8x8 a_acc[PAIRS];
  GDR_UNROLL
  for (uint i = 0; i < PAIRS; ++i) a_acc[i] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);

  const float scale = p.scale;
  const uint fr = gdr_frag_row(lane), fc = gdr_frag_col(lane);
  float row_factor[8];  // scale exp(G) of the lane's row in each row block
  const uint slices = K / SLICE;
  const uint resident = min(slices, SLOTS);
  const uint key_at = (row0 * H + kh) * K;
  for (uint t = 0; t < V / COLS; ++t) {
    const uint column = t * COLS + sg * 8;
    device const float* h_chunk = h + (c * HV + hv) * K * V + column;
    simdgroup_float8x8 o_acc[8];
    GDR_UNROLL
    for (uint rb = 0; rb < 8; ++rb) o_acc[rb] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);

    for (uint i = 0; i < slices; ++i) {
      const uint s = t % 2 == 0 ? i : slices - 1 - i;
      auto q_tile = q_slots + (s % SLOTS) * BT * SLICE;
      if (t == 0 || i >= resident) {
        // The readers of the slot (the slice SLOTS positions back) and of the k slice are done.
        if (t > 0 || i > 0) threadgroup_barrier(mem_flags::mem_threadgroup);
        gdr_stage_rows<SLICE>(q_tile, q + key_at + s * SLICE, H * K, len, 1.0f, tid);
        if (t == 0) gdr_stage_rows<SLICE>(k_tile, k + key_at + s * SLICE, H * K, len, 1.0f, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
      GDR_UNROLL
      for (uint kk = 0; kk < SLICE / 8; ++kk) {
        simdgroup_float8x8 hf;
        simdgroup_load(hf, h_chunk + (s * SLICE + kk * 8) * V, V);
        GDR_UNROLL
        for (uint rb = 0; rb < 8; ++rb) {
          if (rb * 8 >= len) break;  // rows past the chunk's end are not written
          simdgroup_multiply_accumulate(o_acc[rb], gdr_tile_block(q_tile, SLICE, rb * 8, kk * 8), hf, o_acc[rb]);
        }
        if (t == 0) {
          GDR_UNROLL
          for (uint b = 0; b < PAIRS; ++b) {
            const uint rb = b <= lo ? lo : hi;
            const uint tb = b <= lo ? b : b - lo - 1;
            if (rb * 8 >= len) continue;
            simdgroup_multiply_accumulate(a_acc[b], gdr_tile_block(q_tile, SLICE, rb * 8, kk * 8),
                                          gdr_tile_block(k_tile, SLICE, tb * 8, kk * 8, true), a_acc[b]);
          }
        }
      }
    }

    if (t == 0) {
      // Mask and decay the triangle, with the gates read before A overwrites them and the k slice.
      GDR_UNROLL
      for (uint i = 0; i < PAIRS; ++i) {
        const uint rb = i <= lo ? lo : hi;
        const uint tb = i <= lo ? i : i - lo - 1;
        const uint r = rb * 8 + fr, j = tb * 8 + fc;
        const float gr = gate[r];
        const float e0 = a_acc[i].thread_elements()[0], e1 = a_acc[i].thread_elements()[1];
        a_acc[i].thread_elements()[0] = r >= j ? e0 * (scale * exp(gr - gate[j])) : 0.0f;
        a_acc[i].thread_elements()[1] = r >= j + 1 ? e1 * (scale * exp(gr - gate[j + 1])) : 0.0f;
      }
      GDR_UNROLL
      for (uint rb = 0; rb < 8; ++rb) row_factor[rb] = scale * exp(gate[rb * 8 + fr]);
      threadgroup_barrier(mem_flags::mem_threadgroup);
      GDR_UNROLL
      for (uint i = 0; i < PAIRS; ++i) {
        const uint rb = i <= lo ? lo : hi;
        const uint tb = i <= lo ? i : i - lo - 1;
        simdgroup_store(a_acc[i], a_tile + rb * 8 * BT + tb * 8, BT);
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    const uint value_at = (row0 * HV + hv) * V + column;
    simdgroup_float8x8 vf[8];
    GDR_UNROLL
    for (uint tb = 0; tb < 8; ++tb) {
      vf[tb] = gdr_load_rows(v + value_at, HV * V, tb * 8, len, lane);
    }
    GDR_UNROLL
    for (uint rb = 0; rb < 8; ++rb) {
      if (rb * 8 >= len) break;
      gdr_scale_elements(o_acc[rb], row_factor[rb]);
      GDR_UNROLL
      for (uint tb = 0; tb <= rb; ++tb) {
        simdgroup_multiply_accumulate(o_acc[rb], gdr_tile_block(a_tile, BT, rb * 8, tb * 8), vf[tb], o_acc[rb]);
      }
      gdr_store_rows(o_acc[rb], o + value_at, HV * V, rb * 8, len, lane);
    }
  }
}
