// tq.flash_attn_vec_tq: decode attention over a TurboQuant cache, in the rotated domain.
//
// Main kernel, one threadgroup per (split, KV head x row tile, batch):
//   1. the tile's query rows (GQA heads x Lq of one KV head) are read once, multiplied by the
//      signs, rotated with the in-register Walsh-Hadamard transform and scaled by `scale`;
//   2. each simdgroup scans 32-key tiles of the split's key range; a key is held by one lane
//      group (RowLayout<D>::LANES lanes, 8 or 16 coordinates each), so a simdgroup works on
//      256 / D keys at once; K and V codes are dequantized inline through the codebook in
//      threadgroup memory, every packed byte is read once, norms are read once per 32 keys;
//      the keys use the template width BITS, the values their own width p.v_bits (a uniform
//      switch over the unrolled unpackers); positions held by the full-precision windows (sinks
//      j < S, recent ring j >= kv_len - W) are read from those buffers instead (rotated vectors,
//      float32/float16/bfloat16 by a runtime dtype code), so one softmax covers all of them;
//   3. online softmax in float32 per (lane group, row); lane groups merge by shuffles,
//      simdgroups through threadgroup memory; the split writes its unnormalised output and
//      (max, sum) to the partial buffers.
// Reduce kernel, one lane group per query row: merges the splits, normalises, applies the
// inverse rotation and the signs, and writes the output in q's dtype. Rows that see no key get 0.
#pragma once

#include "tq_utils.h"

// Slot of position pos in [key_lo, key_hi): that range is never longer than C, so the slot wraps
// at most once and no integer modulo is needed per key.
inline uint attn_slot(constant FlashAttnVecTqParams& p, int pos) {
  const uint slot = p.key_lo_slot + uint(pos - p.key_lo);
  return slot >= p.capacity ? slot - p.capacity : slot;
}

template <typename T, int D, int BITS>
[[kernel]] void flash_attn_vec_tq(
    device const T* q [[buffer(0)]],
    device const uchar* k_codes [[buffer(1)]],
    device const float* k_norms [[buffer(2)]],
    device const uchar* v_codes [[buffer(3)]],
    device const float* v_norms [[buffer(4)]],
    device const long* kv_start [[buffer(5)]],
    device const float* signs [[buffer(6)]],
    device const float* codebook [[buffer(7)]],
    device float* partial_o [[buffer(8)]],
    device float* partial_ml [[buffer(9)]],
    constant FlashAttnVecTqParams& p [[buffer(10)]],
    device const float* v_codebook [[buffer(11)]],
    device const uchar* k_sink [[buffer(12)]],
    device const uchar* v_sink [[buffer(13)]],
    device const uchar* k_recent [[buffer(14)]],
    device const uchar* v_recent [[buffer(15)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  using L = tq::RowLayout<D>;
  constexpr int VPL = L::VPL;
  constexpr int NB = L::NB;
  constexpr int ROWS = TQ_ATTN_TILE_ROWS(D);
  constexpr int NSG = TQ_ATTN_SIMDGROUPS;
  constexpr int NT = 32 * NSG;
  constexpr int LEVELS = 1 << BITS;
  constexpr uint ROW_BYTES = D * BITS / 8;
  const uint v_row_bytes = D * p.v_bits / 8;
  // 32 keys per simdgroup tile: one norm per lane, handed to the key's lane group by shuffle.
  constexpr int KEY_TILE = 32;

  threadgroup float tg_codebook[LEVELS];
  threadgroup float tg_v_codebook[1 << 8];  // the values' centroids (2^v_bits of them)
  threadgroup float tg_q[ROWS * D];
  threadgroup float tg_o[NSG * ROWS * D];
  threadgroup float tg_m[NSG * ROWS];
  threadgroup float tg_l[NSG * ROWS];
  threadgroup int tg_key_begin[1];

  const uint split = tgid.x;
  const uint kvh = tgid.y % p.kv_heads;
  const uint row0 = (tgid.y / p.kv_heads) * ROWS;
  const uint b = tgid.z;
  const uint bh = b * p.kv_heads + kvh;
  const uint group = p.q_heads / p.kv_heads;
  const int split_begin = p.key_lo + int(split * p.keys_per_split);
  const int split_end = min(split_begin + int(p.keys_per_split), p.key_hi);

  for (uint c = tid; c < uint(LEVELS); c += NT) {
    tg_codebook[c] = codebook[c];
  }
  for (uint c = tid; c < (1u << p.v_bits); c += NT) {
    tg_v_codebook[c] = v_codebook[c];
  }
  if (tid == 0) {
    int begin = split_begin;
    if (p.has_kv_start != 0) {
      // Left padding: positions before kv_start[b] are invisible to every query of sequence b.
      const long start = kv_start[b];
      const int end = max(split_begin, split_end);
      begin = start <= long(split_begin) ? split_begin : (start >= long(end) ? end : int(start));
    }
    tg_key_begin[0] = begin;
  }
  for (uint d = tid; d < uint(D); d += NT) {
    const float s = signs[d];
    for (int r = 0; r < ROWS; ++r) {
      const uint row = row0 + r;
      float x = 0.0f;
      if (row < p.rows) {
        const uint hq = kvh * group + row / p.q_len;
        const ulong q_row = (ulong(b) * p.q_heads + hq) * p.q_len + row % p.q_len;
        x = float(q[q_row * D + d]) * s;
      }
      tg_q[r * D + d] = x;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  const uint kgrp = lane / L::LANES;
  const uint d0 = (lane % L::LANES) * VPL;
  // Rotate the rows once per threadgroup: each simdgroup transforms L::ROWS rows at a time (one per
  // lane group), simdgroups taking turns.
  for (int r0 = int(sg) * L::ROWS; r0 < ROWS; r0 += NSG * L::ROWS) {
    const int r = r0 + int(kgrp);
    const bool ok = r < ROWS;
    float v[VPL];
    for (int i = 0; i < VPL; ++i) {
      v[i] = ok ? tg_q[r * D + d0 + i] : 0.0f;
    }
    tq::fwht<VPL, L::R>(v, lane);
    if (ok) {
      for (int i = 0; i < VPL; ++i) {
        tg_q[r * D + d0 + i] = v[i] * p.inv_sqrt_r * p.scale;
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // Rows of this tile (the last tile may be partial); every row loop below stops at tile_rows,
  // a threadgroup-uniform bound, so a GQA group of 4 does not pay for 8 rows. The rotated q stays
  // in threadgroup memory (read as a broadcast), the accumulators in registers.
  const int tile_rows = min(ROWS, int(p.rows - row0));
  int q_pos[ROWS];
  float m[ROWS];
  float l[ROWS];
  float o[ROWS][VPL];
  for (int r = 0; r < ROWS; ++r) {
    for (int i = 0; i < VPL; ++i) {
      o[r][i] = 0.0f;
    }
    q_pos[r] = p.kv_len - int(p.q_len) + int((row0 + r) % p.q_len);
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  const int key_begin = tg_key_begin[0];
  const uint blk = d0 / L::R;
  const ulong head_row = ulong(bh) * p.capacity;

  for (int t0 = key_begin + int(sg) * KEY_TILE; t0 < split_end; t0 += NSG * KEY_TILE) {
    float kn[NB];
    float vn[NB];
    const int pos_lane = t0 + int(lane);
    for (int nb = 0; nb < NB; ++nb) {
      kn[nb] = 0.0f;
      vn[nb] = 0.0f;
    }
    // Norms of the positions read from the codes only (window positions need none).
    if (pos_lane < split_end && pos_lane >= p.sink_len && pos_lane < p.recent_lo) {
      const ulong cache_row = head_row + attn_slot(p, pos_lane);
      for (int nb = 0; nb < NB; ++nb) {
        kn[nb] = k_norms[cache_row * NB + nb];
        vn[nb] = v_norms[cache_row * NB + nb];
      }
    }
    for (int step = 0; step < KEY_TILE / L::ROWS; ++step) {
      if (t0 + step * L::ROWS >= split_end) {
        break;  // uniform: depends on the step only
      }
      const ushort kk = ushort(step * L::ROWS + kgrp);
      const int pos = t0 + int(kk);
      const bool in_range = pos < split_end;
      float k_scale = simd_shuffle(kn[0], kk);
      float v_scale = simd_shuffle(vn[0], kk);
      if (NB == 2) {
        const float k1 = simd_shuffle(kn[NB - 1], kk);
        const float v1 = simd_shuffle(vn[NB - 1], kk);
        k_scale = blk == 0 ? k_scale : k1;
        v_scale = blk == 0 ? v_scale : v1;
      }
      k_scale *= p.inv_sqrt_r;
      v_scale *= p.inv_sqrt_r;

      // The key's source: sinks win over the ring, the ring over the codes (the reference's order).
      float kval[VPL];
      float vval[VPL];
      if (in_range && pos >= p.sink_len && pos < p.recent_lo) {
        const ulong cache_row = head_row + attn_slot(p, pos);
        uint kc[VPL];
        uint vc[VPL];
        tq::load_codes<BITS, VPL>(k_codes + cache_row * ROW_BYTES, d0, kc);
        tq::load_codes_bits<VPL>(v_codes + cache_row * v_row_bytes, d0, p.v_bits, vc);
        for (int i = 0; i < VPL; ++i) {
          kval[i] = tg_codebook[kc[i]];
          vval[i] = tg_v_codebook[vc[i]] * v_scale;
        }
      } else if (in_range) {
        // Full precision, already rotated: the score needs no norm scale.
        const bool from_sink = pos < p.sink_len;
        ulong index;
        if (from_sink) {
          index = (ulong(bh) * uint(p.sink_len) + uint(pos)) * D + d0;
        } else {
          uint slot = p.recent_lo_slot + uint(pos - p.recent_lo);  // < 2W: wraps at most once
          slot = slot >= p.recent_len ? slot - p.recent_len : slot;
          index = (ulong(bh) * p.recent_len + slot) * D + d0;
        }
        tq::load_window<VPL>(from_sink ? k_sink : k_recent, from_sink ? p.k_sink_dtype : p.k_recent_dtype, index, kval);
        tq::load_window<VPL>(from_sink ? v_sink : v_recent, from_sink ? p.v_sink_dtype : p.v_recent_dtype, index, vval);
        k_scale = 1.0f;
      } else {
        for (int i = 0; i < VPL; ++i) {
          kval[i] = 0.0f;
          vval[i] = 0.0f;
        }
      }

      for (int r = 0; r < ROWS; ++r) {
        if (r >= tile_rows) {
          break;
        }
        float dot = 0.0f;
        for (int i = 0; i < VPL; ++i) {
          dot += tg_q[r * D + d0 + i] * kval[i];
        }
        float s = tq::group_sum<L::LANES>(dot * k_scale);
        if (p.softcap > 0.0f) {
          s = p.softcap * precise::tanh(s / p.softcap);
        }
        const bool visible = in_range && pos <= q_pos[r] &&
                             (p.sliding_window == 0 || pos > q_pos[r] - p.sliding_window);
        const float m_new = visible ? max(m[r], s) : m[r];
        const float alpha = (m_new == -INFINITY) ? 1.0f : exp(m[r] - m_new);
        const float prob = visible ? exp(s - m_new) : 0.0f;
        l[r] = l[r] * alpha + prob;
        for (int i = 0; i < VPL; ++i) {
          o[r][i] = o[r][i] * alpha + prob * vval[i];
        }
        m[r] = m_new;
      }
    }
  }

  // Merge the lane groups of the simdgroup (each scanned different keys).
  for (ushort mask = L::LANES; mask < 32; mask <<= 1) {
    for (int r = 0; r < ROWS; ++r) {
      if (r >= tile_rows) {
        break;
      }
      const float m_other = simd_shuffle_xor(m[r], mask);
      const float l_other = simd_shuffle_xor(l[r], mask);
      const float m_new = max(m[r], m_other);
      const float w_self = m[r] == -INFINITY ? 0.0f : exp(m[r] - m_new);
      const float w_other = m_other == -INFINITY ? 0.0f : exp(m_other - m_new);
      l[r] = l[r] * w_self + l_other * w_other;
      for (int i = 0; i < VPL; ++i) {
        const float o_other = simd_shuffle_xor(o[r][i], mask);
        o[r][i] = o[r][i] * w_self + o_other * w_other;
      }
      m[r] = m_new;
    }
  }
  if (kgrp == 0) {
    for (int r = 0; r < tile_rows; ++r) {
      for (int i = 0; i < VPL; ++i) {
        tg_o[(sg * ROWS + r) * D + d0 + i] = o[r][i];
      }
    }
  }
  if (lane == 0) {
    for (int r = 0; r < tile_rows; ++r) {
      tg_m[sg * ROWS + r] = m[r];
      tg_l[sg * ROWS + r] = l[r];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // Merge the simdgroups and write this split's partial result.
  for (uint e = tid; e < uint(tile_rows * D); e += NT) {
    const uint r = e / D;
    const uint d = e % D;
    const uint row = row0 + r;
    float m_max = -INFINITY;
    for (int s = 0; s < NSG; ++s) {
      m_max = max(m_max, tg_m[s * ROWS + r]);
    }
    float acc = 0.0f;
    float sum = 0.0f;
    for (int s = 0; s < NSG; ++s) {
      const float ms = tg_m[s * ROWS + r];
      const float w = ms == -INFINITY ? 0.0f : exp(ms - m_max);
      acc += w * tg_o[(s * ROWS + r) * D + d];
      sum += w * tg_l[s * ROWS + r];
    }
    const ulong prow = (ulong(bh) * p.rows + row) * p.num_splits + split;
    partial_o[prow * D + d] = acc;
    if (d == 0) {
      partial_ml[prow * 2] = m_max;
      partial_ml[prow * 2 + 1] = sum;
    }
  }
}

template <typename T, int D>
[[kernel]] void flash_attn_vec_tq_reduce(
    device const float* partial_o [[buffer(0)]],
    device const float* partial_ml [[buffer(1)]],
    device const float* signs [[buffer(2)]],
    device T* out [[buffer(3)]],
    constant FlashAttnVecTqParams& p [[buffer(4)]],
    device float* lse [[buffer(5)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  using L = tq::RowLayout<D>;
  constexpr int VPL = L::VPL;
  constexpr int LANES = L::LANES;
  constexpr int NT = 32 * TQ_REDUCE_SIMDGROUPS;

  threadgroup float tg_signs[D];
  tq::load_signs<D, NT>(tg_signs, signs, tid);

  const uint simd_row0 = (tgid.x * TQ_REDUCE_SIMDGROUPS + sg) * L::ROWS;
  if (simd_row0 >= p.total_rows) {
    return;  // the whole simdgroup is past the end
  }
  const uint row = simd_row0 + lane / LANES;
  const bool active = row < p.total_rows;
  const uint lig = lane % LANES;
  const uint group_base = lane - lig;
  const uint d0 = lig * VPL;
  const uint splits = p.num_splits;
  const ulong first = ulong(row) * splits;

  // Each (max, sum) pair is read by one lane of the row's group and shared by shuffles.
  float m_max = -INFINITY;
  for (uint s0 = 0; s0 < splits; s0 += LANES) {
    const uint s = s0 + lig;
    const float ms = (active && s < splits) ? partial_ml[(first + s) * 2] : -INFINITY;
    m_max = max(m_max, tq::group_max<LANES>(ms));
  }
  float v[VPL];
  for (int i = 0; i < VPL; ++i) {
    v[i] = 0.0f;
  }
  float sum = 0.0f;
  for (uint s0 = 0; s0 < splits; s0 += LANES) {
    const uint s = s0 + lig;
    float w = 0.0f;
    float weighted_sum = 0.0f;
    if (active && s < splits) {
      const float ms = partial_ml[(first + s) * 2];
      w = ms == -INFINITY ? 0.0f : exp(ms - m_max);
      weighted_sum = w * partial_ml[(first + s) * 2 + 1];
    }
    sum += tq::group_sum<LANES>(weighted_sum);
    const uint n = min(uint(LANES), splits - s0);
    for (uint j = 0; j < n; ++j) {
      const float wj = simd_shuffle(w, ushort(group_base + j));
      if (active) {
        for (int i = 0; i < VPL; ++i) {
          v[i] += wj * partial_o[(first + s0 + j) * D + d0 + i];
        }
      }
    }
  }
  // A row that saw no key (sum = 0) outputs zeros and has lse = -inf.
  const float inv_sum = sum > 0.0f ? 1.0f / sum : 0.0f;
  if (p.has_lse != 0 && active && lig == 0) {
    lse[row] = sum > 0.0f ? m_max + log(sum) : -INFINITY;
  }
  for (int i = 0; i < VPL; ++i) {
    v[i] *= inv_sum;
  }
  tq::fwht<VPL, L::R>(v, lane);
  if (active) {
    for (int i = 0; i < VPL; ++i) {
      out[ulong(row) * D + d0 + i] = static_cast<T>(v[i] * p.inv_sqrt_r * tg_signs[d0 + i]);
    }
  }
}
