// Parameter structs of the gated-delta-rule kernels (same conventions as params.h: 32-bit
// fields only, one setBytes each; buffer binding order written next to each struct).
#pragma once

// ---- recurrent (fused_recurrent_gated_delta_rule) ------------------------------------------

// tq.fused_recurrent_gated_delta_rule: one threadgroup per (32 value columns, value head, sequence),
// grid (V / 32, HV, N), TQ_GDR_RECURRENT_SIMDGROUPS simdgroups; lane = value column, simdgroup =
// slab of K / TQ_GDR_RECURRENT_SIMDGROUPS key rows (see gated_delta_recurrent.h).
// Buffers: 0 q [B, T, H, K], 1 k [B, T, H, K], 2 v [B, T, HV, V] (q's dtype), 3 g [B, T, HV] float32,
// 4 beta [B, T, HV] float32, 5 initial_state [N, HV, K, V] float32 (dummy when has_initial_state = 0),
// 6 cu_seqlens [N+1] int32 (dummy when has_cu_seqlens = 0), 7 o [B, T, HV, V] (q's dtype),
// 8 final_state [N, HV, K, V] float32 (dummy when has_final_state = 0), 9 params.
TQ_CONSTEXPR tq_uint TQ_GDR_RECURRENT_SIMDGROUPS = 8;
TQ_CONSTEXPR tq_uint TQ_GDR_RECURRENT_COLUMNS = 32;  // value columns per threadgroup, one per lane
struct FusedRecurrentGdrParams {
  tq_uint tokens;             // T (rows per batch entry; B * T token rows in all)
  tq_uint heads;              // H
  tq_uint value_heads;        // HV
  tq_uint value_dim;          // V
  tq_uint group;              // HV / H: value head hv reads query/key head hv / group
  tq_uint has_cu_seqlens;
  tq_uint has_initial_state;
  tq_uint has_final_state;
  tq_uint use_qk_l2norm;      // 1: q and k are l2-normalised (x / sqrt(sum x^2 + 1e-6))
  float scale;                // resolved by the plan (K^-0.5 for None)
};

// ---- chunk_local_cumsum, chunk_scaled_dot_kkt, solve_tril ---------------------------------
// Kernels: mps_ops/kernels/gated_delta_chunk_prep.h.

// tq.chunk_local_cumsum: grid (NT chunks of chunk_size tokens, ceil(HV / heads per threadgroup)),
// one simdgroup per (chunk, value head), at most TQ_GDR_CUMSUM_SIMDGROUPS per threadgroup.
// Buffers: 0 g [B, T, HV] (as given), 1 cu_seqlens [N+1] int32 (dummy when has_cu_seqlens = 0),
// 2 out [B, T, HV] float32, 3 params.
TQ_CONSTEXPR tq_uint TQ_GDR_CUMSUM_SIMDGROUPS = 8;
struct ChunkLocalCumsumParams {
  tq_uint tokens;          // T
  tq_uint value_heads;     // HV
  tq_uint sequences;       // N
  tq_uint chunk_size;      // a power of two, at most the next power of two >= T (larger ones give the same sums)
  tq_uint has_cu_seqlens;
  tq_uint reverse;         // 1: suffix sums (from each chunk's end)
  tq_uint has_scale;
  float scale;             // multiplies the sums when has_scale = 1
};

// tq.chunk_scaled_dot_kkt: grid (NT chunks, H key heads), TQ_GDR_KKT_SIMDGROUPS simdgroups; k k^T of
// the chunk is computed once per key head and written for each of its HV / H value heads.
// Buffers: 0 k [B, T, H, K] (as given), 1 g [B, T, HV] float32, 2 beta [B, T, HV] float32,
// 3 cu_seqlens [N+1] int32 (dummy when has_cu_seqlens = 0), 4 A [B, T, HV, 64] float32, 5 params.
TQ_CONSTEXPR tq_uint TQ_GDR_KKT_SIMDGROUPS = 4;
struct ChunkScaledDotKktParams {
  tq_uint tokens;          // T
  tq_uint heads;           // H
  tq_uint value_heads;     // HV
  tq_uint head_dim;        // K (a multiple of 32)
  tq_uint sequences;       // N
  tq_uint has_cu_seqlens;
};

// tq.solve_tril: grid (NT chunks, HV), TQ_GDR_SOLVE_SIMDGROUPS simdgroups, one 64x64 block each.
// Buffers: 0 A [B, T, HV, 64] float32, 1 cu_seqlens [N+1] int32 (dummy when has_cu_seqlens = 0),
// 2 Ai [B, T, HV, 64] float32, 3 params.
TQ_CONSTEXPR tq_uint TQ_GDR_SOLVE_SIMDGROUPS = 4;
struct SolveTrilParams {
  tq_uint tokens;          // T
  tq_uint value_heads;     // HV
  tq_uint sequences;       // N
  tq_uint has_cu_seqlens;
};

// ---- recompute_w_u, chunk_fwd_h, chunk_fwd_o -----------------------------------------------
// The three matrix stages of the chunked form (gated_delta_chunk.h). A threadgroup is
// TQ_GDR_CHUNK_SIMDGROUPS simdgroups working on one 64-token chunk x TQ_GDR_CHUNK_COLUMNS output
// columns (chunk_fwd_o: each such tile of all V columns in turn; chunk_fwd_h: one sequence's chunks
// in order, TQ_GDR_FWD_H_SIMDGROUPS simdgroups x TQ_GDR_FWD_H_COLUMNS columns); simdgroup s owns
// columns 8s .. 8s+7.
// One Params struct serves the three kernels and the fused entry kernel below (fields a kernel does
// not use are 0).
//
// recompute_w_u: grid (NT, HV, 1). Buffers: 0 k [B, T, H, K], 1 v [B, T, HV, V] (each in its own
//   dtype), 2 beta [B, T, HV], 3 A [B, T, HV, 64], 4 g [B, T, HV] (float32), 5 cu_seqlens [N+1] int32
//   (dummy when has_cu_seqlens = 0), 6 w [B, T, HV, K] float32, 7 u [B, T, HV, V] float32, 8 params.
// chunk_fwd_h: grid (V / 64, HV, N), 8 simdgroups. Buffers: 0 k [B, T, H, K] (its dtype),
//   1 w [B, T, HV, K], 2 u [B, T, HV, V], 3 g [B, T, HV] (float32), 4 initial_state [N, HV, K, V]
//   float32 (dummy when has_initial_state = 0), 5 cu_seqlens (dummy), 6 h [NT, HV, K, V] float32
//   (the [B, NT/B] rows of [B, NT, HV, K, V] are the global chunk index), 7 v_new [B, T, HV, V]
//   float32, 8 final_state [N, HV, K, V] float32 (dummy when has_final_state = 0), 9 params.
// chunk_fwd_o: grid (NT, HV, 1), each threadgroup walking all V / 32 column tiles. Buffers: 0 q,
//   1 k [B, T, H, K] (one dtype), 2 v (v_new) [B, T, HV, V], 3 h [NT, HV, K, V], 4 g [B, T, HV]
//   (float32), 5 cu_seqlens (dummy), 6 o [B, T, HV, V] float32,
//   7 params.
TQ_CONSTEXPR tq_uint TQ_GDR_CHUNK_SIMDGROUPS = 4;
TQ_CONSTEXPR tq_uint TQ_GDR_CHUNK_COLUMNS = 32;
TQ_CONSTEXPR tq_uint TQ_GDR_FWD_H_SIMDGROUPS = 8;
TQ_CONSTEXPR tq_uint TQ_GDR_FWD_H_COLUMNS = TQ_GDR_FWD_H_SIMDGROUPS * 8;  // divides every V (64, 128, 256)
struct GdrChunkParams {
  tq_uint tokens;             // T (rows per batch entry; B * T token rows in all)
  tq_uint sequences;          // N
  tq_uint heads;              // H
  tq_uint value_heads;        // HV
  tq_uint group;              // HV / H: value head hv reads key head hv / group
  tq_uint head_dim;           // K
  tq_uint value_dim;          // V
  tq_uint chunks_per_row;     // ceil(T / 64): chunks of a batch row without cu_seqlens
  tq_uint has_cu_seqlens;
  tq_uint has_initial_state;  // chunk_fwd_h
  tq_uint has_final_state;    // chunk_fwd_h
  float scale;                // chunk_fwd_o, resolved by the plan (K^-0.5 for None)
  tq_uint use_qk_l2norm;      // chunk_gated_delta_rule: 1 = q and k are l2-normalised in the kernel
};

// ---- chunk_gated_delta_rule (the entry op, one fused kernel) --------------------------------
// gated_delta_fused.h. One threadgroup of TQ_GDR_FUSED_SIMDGROUPS simdgroups per (128 value
// columns, value head, sequence) walks the sequence's chunks in order; simdgroup s owns value
// columns 8s .. 8s+7 of the tile (V = 64: simdgroups 8 .. 15 own none). Grid (ceil(V / 128), HV, N).
// Buffers: 0 q, 1 k [B, T, H, K], 2 v [B, T, HV, V] (one dtype), 3 g [B, T, HV] float32 (the raw
// log decays: the kernel sums them per chunk), 4 beta [B, T, HV] float32, 5 initial_state
// [N, HV, K, V] float32 (dummy when has_initial_state = 0), 6 cu_seqlens [N+1] int32 (dummy when
// has_cu_seqlens = 0), 7 o [B, T, HV, V] (q's dtype), 8 final_state [N, HV, K, V] float32 (dummy
// when has_final_state = 0), 9 GdrChunkParams (scale, use_qk_l2norm; chunks_per_row unused).
TQ_CONSTEXPR tq_uint TQ_GDR_FUSED_SIMDGROUPS = 16;
TQ_CONSTEXPR tq_uint TQ_GDR_FUSED_COLUMNS = TQ_GDR_FUSED_SIMDGROUPS * 8;
