// tq.fused_recurrent_gated_delta_rule: the gated delta rule one token at a time (decode; any T).
// Per sequence and value head, with the float32 state S [K, V] (DESIGN §5):
//
//   S = exp(g_t) S;  delta = beta_t (v_t - S^T k_t);  S = S + k_t delta^T;  o_t = S^T (scale q_t)
//
// computed as the CPU reference does, from one read of the pre-decay state per token:
//   kS = k^T S, qS = q^T S (over K);  delta = beta (v - exp(g) kS);
//   o = exp(g) qS + (q . k) delta;     S = exp(g) S + k delta^T
// with q and k l2-normalised first when use_qk_l2norm (x / sqrt(sum x^2 + 1e-6)) and q scaled.
//
// One threadgroup per (tile of 32 value columns, value head, sequence), 8 simdgroups. Lane l of
// every simdgroup owns column l of the tile, so a state row is read and written as one 128-byte
// segment per simdgroup; simdgroup s owns the slab of ROWS = K / 8 consecutive key rows, so each
// thread keeps ROWS floats of S in registers for the whole sequence: the state is read once and
// written once per call and never goes back to device memory between tokens.
// Per token: the token's q, k, the tile's v, exp(g) and beta are staged once in threadgroup memory
// (each element read from device memory once per threadgroup); every thread forms its slab's
// partial k^T S and q^T S for its column, plus the slab's q.q, k.k and q.k (the same in every lane,
// from broadcast reads); after one barrier each thread adds the 8 slabs' partials. The l2 norms
// are applied to the finished sums ((k/|k|)^T S = k^T S / |k|), so one reduction round per token
// serves the norms, the products and the output. Staging and partial buffers alternate between two
// halves (token t uses half t & 1, and token t + 1 is staged before token t's barrier), so one
// barrier per token suffices and the next token's writes never race this token's reads.
// No simdgroup_matrix: per token the work is matrix-vector (rank-1 update and two mat-vec products).
#pragma once

#include "gated_delta_utils.h"

// Copies the inputs of token row `token` (flattened B*T axis) into `dst` as float: [q (K) | k (K) |
// v of the 32-column tile | exp(g) | beta]. Consecutive threads read consecutive elements, so every
// element is read once per threadgroup.
template <int K, typename T, typename Dst>
inline void gdr_recurrent_stage(Dst dst, uint tid, device const T* q, device const T* k, device const T* v,
                                device const float* g, device const float* beta,
                                constant FusedRecurrentGdrParams& p, uint token, uint h, uint hv, uint column0) {
  constexpr uint STAGE = 2 * K + TQ_GDR_RECURRENT_COLUMNS + 2;
  const uint qk_base = (token * p.heads + h) * K;
  const uint head_row = token * p.value_heads + hv;
  const uint v_base = head_row * p.value_dim + column0;
  for (uint e = tid; e < STAGE; e += TQ_GDR_RECURRENT_SIMDGROUPS * 32) {
    float x;
    if (e < uint(K)) {
      x = float(q[qk_base + e]);
    } else if (e < uint(2 * K)) {
      x = float(k[qk_base + e - K]);
    } else if (e < STAGE - 2) {
      x = float(v[v_base + e - 2 * K]);
    } else if (e == STAGE - 2) {
      x = exp(g[head_row]);
    } else {
      x = beta[head_row];
    }
    dst[e] = x;
  }
}

template <typename T, int K>
[[kernel, max_total_threads_per_threadgroup(TQ_GDR_RECURRENT_SIMDGROUPS * 32)]] void fused_recurrent_gated_delta_rule(
    device const T* q [[buffer(0)]],
    device const T* k [[buffer(1)]],
    device const T* v [[buffer(2)]],
    device const float* g [[buffer(3)]],
    device const float* beta [[buffer(4)]],
    device const float* initial_state [[buffer(5)]],
    device const int* cu_seqlens [[buffer(6)]],
    device T* o [[buffer(7)]],
    device float* final_state [[buffer(8)]],
    constant FusedRecurrentGdrParams& p [[buffer(9)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr int NSG = TQ_GDR_RECURRENT_SIMDGROUPS;
  constexpr int ROWS = K / NSG;
  static_assert(K % NSG == 0, "K must split evenly over the simdgroups");
  constexpr float l2norm_eps = 1e-6f;  // FLA's / the CPU reference's l2norm epsilon

  // Token staging, [half][q (K) | k (K) | v of the tile (32) | exp(g) | beta], as float: every
  // input element is read from device memory once per threadgroup (coalesced), then broadcast to
  // the simdgroups from threadgroup memory. Token t + 1 is staged while token t is reduced.
  constexpr int STAGE = 2 * K + TQ_GDR_RECURRENT_COLUMNS + 2;
  threadgroup float tg_token[2 * STAGE];
  // [half][simdgroup][lane]: (k^T S, q^T S) of the simdgroup's slab for the lane's column.
  threadgroup float2 tg_products[2 * NSG * 32];
  // [half][simdgroup]: (q.q, k.k, q.k) of the simdgroup's slab.
  threadgroup float4 tg_norms[2 * NSG];

  const uint tid = sg * 32 + lane;
  const uint column0 = tgid.x * TQ_GDR_RECURRENT_COLUMNS;
  const uint column = column0 + lane;
  const uint hv = tgid.y;
  const uint n = tgid.z;
  const uint h = hv / p.group;
  const uint row0 = sg * ROWS;  // first key row of this thread's slab
  const GdrSequence seq = gdr_sequence(n, p.tokens, p.has_cu_seqlens, cu_seqlens);

  // State rows row0 .. row0 + ROWS - 1 of column `column`; element (r, column) of S at r * V + column.
  const uint state_base = ((n * p.value_heads + hv) * K + row0) * p.value_dim + column;
  float S[ROWS];
  for (int i = 0; i < ROWS; ++i) {
    S[i] = p.has_initial_state != 0 ? initial_state[state_base + i * p.value_dim] : 0.0f;
  }

  // Token t of the sequence goes to half t & 1 of tg_token.
  if (seq.length > 0) {
    gdr_recurrent_stage<K>(tg_token, tid, q, k, v, g, beta, p, seq.start, h, hv, column0);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  const bool l2 = p.use_qk_l2norm != 0;
  for (uint t = 0; t < seq.length; ++t) {
    // Everything read from half t & 1 is read before this token's barrier: token t + 1 stages
    // token t + 2 into the same half right after it.
    auto src = tg_token + (t & 1u) * STAGE;
    float kr[ROWS];  // k of the slab, kept for the update after the barrier
    float kS = 0.0f, qS = 0.0f, qq = 0.0f, kk = 0.0f, qk = 0.0f;
    for (int i = 0; i < ROWS; ++i) {
      const float qi = src[row0 + i];
      kr[i] = src[K + row0 + i];
      kS += kr[i] * S[i];
      qS += qi * S[i];
      qq += qi * qi;
      kk += kr[i] * kr[i];
      qk += qi * kr[i];
    }
    const float value = src[2 * K + lane];
    const float decay = src[STAGE - 2];
    const float b = src[STAGE - 1];
    const uint half_base = (t & 1u) * NSG;
    tg_products[(half_base + sg) * 32 + lane] = float2(kS, qS);
    if (lane == 0) {
      tg_norms[half_base + sg] = float4(qq, kk, qk, 0.0f);
    }
    if (t + 1 < seq.length) {
      gdr_recurrent_stage<K>(tg_token + ((t + 1) & 1u) * STAGE, tid, q, k, v, g, beta, p, seq.start + t + 1, h, hv,
                             column0);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    float2 products = float2(0.0f);
    float4 norms = float4(0.0f);
    for (int s = 0; s < NSG; ++s) {
      products += tg_products[(half_base + s) * 32 + lane];
      norms += tg_norms[half_base + s];
    }
    const float inv_q = l2 ? rsqrt(norms.x + l2norm_eps) : 1.0f;
    const float inv_k = l2 ? rsqrt(norms.y + l2norm_eps) : 1.0f;
    const float q_factor = inv_q * p.scale;
    const float delta = (value - decay * (products.x * inv_k)) * b;
    const float out = decay * (products.y * q_factor) + (norms.z * q_factor * inv_k) * delta;
    if (sg == 0) {
      o[((seq.start + t) * p.value_heads + hv) * p.value_dim + column] = T(out);
    }
    const float k_delta = inv_k * delta;
    for (int i = 0; i < ROWS; ++i) {
      S[i] = S[i] * decay + kr[i] * k_delta;
    }
  }

  if (p.has_final_state != 0) {
    for (int i = 0; i < ROWS; ++i) {
      final_state[state_base + i * p.value_dim] = S[i];
    }
  }
}
