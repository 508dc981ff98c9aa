// tq.chunk_gated_delta_rule: the whole chunked gated delta rule (DESIGN §5) in one kernel, like the
// CPU reference's fused pass (torch_tq/backends/cpu/gated_delta_rule.py: fused_chunk_pass) with the
// chunk-local stages folded in. Per chunk of 64 tokens, with S the state entering the chunk:
//
//   G     = cumsum of g in the chunk                 (simd prefix sum)
//   rq,rk = scale / ||q||, 1 / ||k|| per row          (with use_qk_l2norm; else scale and 1)
//   A     = beta_i rk_i rk_j (k_i . k_j) exp(G_i - G_j), i > j;   Ai = (I + A)^-1
//   v_new = Ai (beta v - beta exp(G) rk (k S))        (= u - w S)
//   o     = rq exp(G) (q S) + (rq_i rk_j (q_i . k_j) exp(G_i - G_j) [i >= j]) v_new
//   S     = exp(G_last) S + k^T (rk exp(G_last - G) v_new)
//
// Nothing goes through device memory between the steps: q, k, v, g and beta are read, o is written,
// the state is read once and written once. Layout: one threadgroup per (128 value columns, value
// head, sequence), 16 simdgroups; simdgroup s owns value columns 8s .. 8s+7 and keeps, as 8x8
// simdgroup matrices, their K rows of S for the whole sequence, and per chunk their 64 rows of
// v_new (first k S, then v_new in place) and of q S. The chunk-square products k k^T and q k^T
// (72 lower-triangle 8x8 blocks) are split over all 16 simdgroups, accumulated in registers while
// q and k stream through threadgroup memory in 32-column slices (the same pass gives k S and q S).
// A is masked and decayed in registers and stored (16 KB), inverted in place (solve_tril's blocked
// inverse); v_new = Ai X is formed, then the same 16 KB take the masked q k^T for o; finally k
// streams once more, in 64-column slices, for the state update. Threadgroup memory: that one
// 64 x 64 float matrix, also the staging space of q and k, and four 64-float row vectors (17 KB).
//
// Device traffic per (column tile, value head): q once, k twice (the update needs k after v_new,
// which needs all of k k^T), v once, o once; each of the HV / H value heads of a key head and each
// column tile (V = 256: two) reads q and k again. Partial chunks: rows past the chunk's end are zero
// in every staged operand (beta too), so they add nothing; their G repeats the last token's, as the
// reference's edge padding. Registers per thread: S (K / 4 floats), v_new and q S (16 each), 5
// triangle blocks (10): 74 at K = 128, like chunk_fwd_h's budget plus q S.
#pragma once

#include "gated_delta_chunk.h"

// The 36 blocks (rb, tb), tb <= rb, of an 8 x 8-block lower triangle, numbered row by row.
inline uint2 gdr_triangle_block(uint index) {
  uint rb = 0;
  while ((rb + 1) * (rb + 2) / 2 <= index) ++rb;
  return uint2(rb, index - rb * (rb + 1) / 2);
}

// Rows row0 .. row0+7 of 8 columns of a row-major T matrix in device memory (row stride ld), as
// float; rows >= valid read as zero. Lane by lane: each lane reads its two elements.
template <typename T>
inline simdgroup_float8x8 gdr_load_rows_as_float(device const T* src, uint ld, uint row0, uint valid, uint lane) {
  simdgroup_float8x8 m;
  const uint r = row0 + gdr_frag_row(lane);
  const uint at = r * ld + gdr_frag_col(lane);
  const bool ok = r < valid;
  m.thread_elements()[0] = ok ? float(src[at]) : 0.0f;
  m.thread_elements()[1] = ok ? float(src[at + 1]) : 0.0f;
  return m;
}

template <typename T, int K>
[[kernel, max_total_threads_per_threadgroup(TQ_GDR_FUSED_SIMDGROUPS * 32)]] void chunk_gated_delta_rule(
    device const T* q [[buffer(0)]],
    device const T* k [[buffer(1)]],
    device const T* v [[buffer(2)]],
    device const float* g [[buffer(3)]],
    device const float* beta [[buffer(4)]],
    device const float* initial_state [[buffer(5)]],
    device const int* cu_seqlens [[buffer(6)]],
    device T* o [[buffer(7)]],
    device float* final_state [[buffer(8)]],
    constant GdrChunkParams& p [[buffer(9)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr uint BT = TQ_GDR_CHUNK;
  constexpr uint NS = TQ_GDR_FUSED_SIMDGROUPS;
  constexpr uint THREADS = NS * 32;
  constexpr uint KB = K / 8;
  constexpr uint QK_SLICE = 32;  // key columns of q and of k staged at once (pass 1), side by side in m
  constexpr uint K_SLICE = 64;   // key columns of k staged at once (state update)
  constexpr uint TRI = 36;       // lower-triangle 8x8 blocks of a 64 x 64 matrix
  constexpr uint NB = (2 * TRI + NS - 1) / NS;  // blocks of k k^T and q k^T per simdgroup
  constexpr uint STAGED = 2 * BT * QK_SLICE / THREADS;  // q and k elements a thread stages per slice
  constexpr float eps = 1e-6f;
  static_assert(BT == 64 && NS == 16, "the row bookkeeping of the l2 norms assumes 64 rows over 16 simdgroups");
  static_assert(2 * BT * QK_SLICE <= BT * BT && BT * K_SLICE <= BT * BT, "the slices are staged in m's space");
  static_assert(K % K_SLICE == 0 && STAGED == 8, "K is 64, 128 or 256");

  // A, then (I + A)^-1, then the masked q k^T; before each: the staged q and k slices.
  threadgroup float m[BT * BT];
  threadgroup float gate[BT];      // G of the chunk's rows (padded rows: the last token's)
  threadgroup float beta_row[BT];  // beta (padded rows: 0)
  threadgroup float q_factor[BT];  // scale / ||q|| (scale without l2norm)
  threadgroup float k_factor[BT];  // 1 / ||k|| (1 without l2norm)

  const uint column = tgid.x * TQ_GDR_FUSED_COLUMNS + sg * 8;
  const uint hv = tgid.y;
  const uint n = tgid.z;
  const uint kh = hv / p.group;
  const uint H = p.heads, HV = p.value_heads, V = p.value_dim;
  const bool owns = column < V;  // uniform within the simdgroup
  const GdrSequence seq = gdr_sequence(n, p.tokens, p.has_cu_seqlens, cu_seqlens);
  const uint fr = gdr_frag_row(lane), fc = gdr_frag_col(lane);

  // S[kb] = rows 8kb .. 8kb+7 of the simdgroup's 8 state columns.
  const uint state_at = (n * HV + hv) * K * V + column;
  simdgroup_float8x8 S[KB];
  GDR_UNROLL
  for (uint kb = 0; kb < KB; ++kb) {
    if (owns && p.has_initial_state != 0) {
      simdgroup_load(S[kb], initial_state + state_at + kb * 8 * V, V);
    } else {
      S[kb] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
  }

  // This simdgroup's triangle blocks: b = sg + i NS < 72; b < 36 are k k^T's, the others q k^T's.
  uint2 tri[NB];
  GDR_UNROLL
  for (uint i = 0; i < NB; ++i) tri[i] = gdr_triangle_block((sg + i * NS) % TRI);

  for (uint pos = 0; pos < seq.length; pos += BT) {
    const uint row0 = seq.start + pos;
    const uint len = min(BT, seq.length - pos);
    const uint key_at = (row0 * H + kh) * K;
    const uint value_at = (row0 * HV + hv) * V + column;

    // The previous chunk's readers of m and of the row vectors are done.
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (sg == 0) {
      // Padded rows add g = 0: their G is the last token's.
      float carry = 0.0f;
      for (uint t0 = 0; t0 < BT; t0 += 32) {
        const uint t = t0 + lane;
        const float x = t < len ? g[(row0 + t) * HV + hv] : 0.0f;
        const float sum = carry + simd_prefix_inclusive_sum(x);
        gate[t] = sum;
        carry = simd_broadcast(sum, 31);
      }
    } else if (sg == 1) {
      for (uint t = lane; t < BT; t += 32) beta_row[t] = t < len ? beta[(row0 + t) * HV + hv] : 0.0f;
    }

    // Pass 1 over q and k: X = k S and Y = q S (the simdgroup's columns), the triangle blocks of
    // k k^T and q k^T, and the rows' sums of squares. Element e = tid + j THREADS of the staged
    // [q slice | k slice] is row sg + 16 (j % 4) of q (j < 4) or k, column `lane`: a thread's rows
    // are the same in every slice, so it sums its squares across slices and each row's total is
    // one simd_sum at the end.
    auto q_tile = m;
    auto k_tile = m + BT * QK_SLICE;
    simdgroup_float8x8 X[8], Y[8], acc[NB];
    GDR_UNROLL
    for (uint rb = 0; rb < 8; ++rb) {
      X[rb] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      Y[rb] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
    GDR_UNROLL
    for (uint i = 0; i < NB; ++i) acc[i] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    float squares[STAGED];
    for (uint j = 0; j < STAGED; ++j) squares[j] = 0.0f;

    for (uint s = 0; s < K / QK_SLICE; ++s) {
      if (s > 0) threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous slices are consumed
      for (uint j = 0; j < STAGED; ++j) {
        const uint r = sg + 16 * (j % 4);
        device const T* src = j < 4 ? q : k;
        const float x = r < len ? float(src[key_at + r * H * K + s * QK_SLICE + lane]) : 0.0f;
        m[tid + j * THREADS] = x;
        squares[j] += x * x;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (owns) {
        GDR_UNROLL
        for (uint kk = 0; kk < QK_SLICE / 8; ++kk) {
          const simdgroup_float8x8 sb = S[s * (QK_SLICE / 8) + kk];
          GDR_UNROLL
          for (uint rb = 0; rb < 8; ++rb) {
            if (rb * 8 >= len) break;  // padded rows: q and k are zero
            simdgroup_multiply_accumulate(X[rb], gdr_tile_block(k_tile, QK_SLICE, rb * 8, kk * 8), sb, X[rb]);
            simdgroup_multiply_accumulate(Y[rb], gdr_tile_block(q_tile, QK_SLICE, rb * 8, kk * 8), sb, Y[rb]);
          }
        }
      }
      GDR_UNROLL
      for (uint i = 0; i < NB; ++i) {
        const uint b = sg + i * NS;
        if (b >= 2 * TRI || tri[i].x * 8 >= len) continue;  // uniform within the simdgroup
        auto left = b < TRI ? k_tile : q_tile;
        GDR_UNROLL
        for (uint kk = 0; kk < QK_SLICE / 8; ++kk) {
          simdgroup_multiply_accumulate(acc[i], gdr_tile_block(left, QK_SLICE, tri[i].x * 8, kk * 8),
                                        gdr_tile_block(k_tile, QK_SLICE, tri[i].y * 8, kk * 8, true), acc[i]);
        }
      }
    }

    // Row factors: as the CPU reference, scale * (1 / sqrt(sum x^2 + 1e-6)).
    if (p.use_qk_l2norm != 0) {
      for (uint j = 0; j < STAGED; ++j) {
        const float total = simd_sum(squares[j]);
        const float f = 1.0f / sqrt(total + eps);
        const uint r = sg + 16 * (j % 4);
        if (lane == 0) {
          if (j < 4) {
            q_factor[r] = f * p.scale;
          } else {
            k_factor[r] = f;
          }
        }
      }
    } else if (tid < BT) {
      q_factor[tid] = p.scale;
      k_factor[tid] = 1.0f;
    }
    // The slices are consumed (m is free); gates, betas and factors are in place.
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // Mask and decay the triangles in registers (the mask chooses before exp: every exponent is a
    // G_i - G_j with i >= j, <= 0); A goes to m, q k^T stays in registers until m is free again.
    GDR_UNROLL
    for (uint i = 0; i < NB; ++i) {
      const uint b = sg + i * NS;
      if (b >= 2 * TRI) continue;
      const uint r = tri[i].x * 8 + fr, j = tri[i].y * 8 + fc;
      const float e0 = acc[i].thread_elements()[0], e1 = acc[i].thread_elements()[1];
      const float gr = gate[r];
      if (b < TRI) {
        const float fa = beta_row[r] * k_factor[r];
        acc[i].thread_elements()[0] = r > j ? e0 * (fa * k_factor[j] * exp(gr - gate[j])) : 0.0f;
        acc[i].thread_elements()[1] = r > j + 1 ? e1 * (fa * k_factor[j + 1] * exp(gr - gate[j + 1])) : 0.0f;
        simdgroup_store(acc[i], m + tri[i].x * 8 * BT + tri[i].y * 8, BT);
      } else {
        const float fq = q_factor[r];
        acc[i].thread_elements()[0] = r >= j ? e0 * (fq * k_factor[j] * exp(gr - gate[j])) : 0.0f;
        acc[i].thread_elements()[1] = r >= j + 1 ? e1 * (fq * k_factor[j + 1] * exp(gr - gate[j + 1])) : 0.0f;
      }
    }
    // X = beta v - beta exp(G) rk (k S), Y = rq exp(G) (q S).
    if (owns) {
      GDR_UNROLL
      for (uint rb = 0; rb < 8; ++rb) {
        const uint r = rb * 8 + fr;
        const float eg = exp(gate[r]);
        const float b = beta_row[r];
        simdgroup_float8x8 vf = gdr_load_rows_as_float(v + value_at, HV * V, rb * 8, len, lane);
        const float kf = eg * k_factor[r];
        GDR_UNROLL
        for (uint e = 0; e < 2; ++e) {
          X[rb].thread_elements()[e] = b * (vf.thread_elements()[e] - kf * X[rb].thread_elements()[e]);
        }
        gdr_scale_elements(Y[rb], q_factor[r] * eg);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // A is in place

    gdr_solve_tril_in_place(m, tid, sg);

    // v_new = (I + m) X, row blocks from the last: row block rb reads X[tb <= rb], still X.
    if (owns) {
      GDR_UNROLL
      for (uint i = 0; i < 8; ++i) {
        const uint rb = 7 - i;
        if (rb * 8 >= len) continue;  // padded rows: X is zero and so is v_new
        simdgroup_float8x8 vn = X[rb];
        GDR_UNROLL
        for (uint tb = 0; tb <= rb; ++tb) {
          simdgroup_multiply_accumulate(vn, gdr_tile_block(m, BT, rb * 8, tb * 8), X[tb], vn);
        }
        X[rb] = vn;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the inverse is consumed
    GDR_UNROLL
    for (uint i = 0; i < NB; ++i) {
      const uint b = sg + i * NS;
      if (b >= TRI && b < 2 * TRI) simdgroup_store(acc[i], m + tri[i].x * 8 * BT + tri[i].y * 8, BT);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the masked q k^T is in place

    // o = Y + (masked q k^T) v_new, rows of the chunk only, in o's dtype.
    if (owns) {
      GDR_UNROLL
      for (uint rb = 0; rb < 8; ++rb) {
        if (rb * 8 >= len) break;
        simdgroup_float8x8 out = Y[rb];
        GDR_UNROLL
        for (uint tb = 0; tb <= rb; ++tb) {
          simdgroup_multiply_accumulate(out, gdr_tile_block(m, BT, rb * 8, tb * 8), X[tb], out);
        }
        gdr_store_rows(out, o + value_at, HV * V, rb * 8, len, lane);
      }
    }

    // S = exp(G_last) S + k^T (rk exp(G_last - G) v_new); every exponent is <= 0.
    const float g_last = gate[len - 1];
    if (owns) {
      GDR_UNROLL
      for (uint rb = 0; rb < 8; ++rb) {
        const uint r = rb * 8 + fr;
        gdr_scale_elements(X[rb], k_factor[r] * exp(g_last - gate[r]));
      }
      const float decay = exp(g_last);
      GDR_UNROLL
      for (uint kb = 0; kb < KB; ++kb) gdr_scale_elements(S[kb], decay);
    }
    for (uint s = 0; s < K / K_SLICE; ++s) {
      threadgroup_barrier(mem_flags::mem_threadgroup);  // the readers of q k^T / of the previous slice are done
      gdr_stage_rows<K_SLICE, THREADS>(m, k + key_at + s * K_SLICE, H * K, len, 1.0f, tid);
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (owns) {
        GDR_UNROLL
        for (uint kk = 0; kk < K_SLICE / 8; ++kk) {
          GDR_UNROLL
          for (uint tb = 0; tb < 8; ++tb) {
            if (tb * 8 >= len) break;  // padded rows: k and v_new are zero
            // k^T block: key columns 8kk .. 8kk+7 (its rows) x tokens 8tb .. 8tb+7.
            simdgroup_multiply_accumulate(S[s * (K_SLICE / 8) + kk], gdr_tile_block(m, K_SLICE, tb * 8, kk * 8, true),
                                          X[tb], S[s * (K_SLICE / 8) + kk]);
          }
        }
      }
    }
  }

  if (owns && p.has_final_state != 0) {
    GDR_UNROLL
    for (uint kb = 0; kb < KB; ++kb) {
      simdgroup_store(S[kb], final_state + state_at + kb * 8 * V, V);
    }
  }
}
