// TurboQuant encode (hadamard_quantize_kv) and decode (dequantize_kv) kernels, DESIGN.md §5.
// The encoder also centres (offset), corrects the stored norms and writes the full-precision
// sink / recent windows of the same tokens in its one launch (DESIGN.md §8).
//
// One dispatch covers every vector of the call. A vector is held by a group of
// RowLayout<D>::LANES lanes, each owning VPL consecutive coordinates (= VPL * b / 8 whole bytes
// of the packed row), so a simdgroup holds 256 / D vectors (D <= 256) or one (D = 512) and the
// Walsh-Hadamard transform runs in registers and simd_shuffle_xor without barriers (only the sign
// vector is staged once per threadgroup in threadgroup memory).
#pragma once

#include "tq_utils.h"

template <typename T, int D, int BITS>
[[kernel]] void hadamard_quantize_kv(
    device const T* src [[buffer(0)]],
    device uchar* codes [[buffer(1)]],
    device float* norms [[buffer(2)]],
    device const float* signs [[buffer(3)]],
    device const float* codebook [[buffer(4)]],
    constant HadamardQuantizeKvParams& p [[buffer(5)]],
    device const float* offset [[buffer(6)]],
    device uchar* sink [[buffer(7)]],
    device uchar* recent [[buffer(8)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  using L = tq::RowLayout<D>;
  constexpr uint ROW_BYTES = D * BITS / 8;
  threadgroup float tg_signs[D];
  tq::load_signs<D, TQ_QUANT_SIMDGROUPS * 32>(tg_signs, signs, tid);
  // The threadgroup walks blocks_per_threadgroup consecutive row blocks, so the sign vector it
  // stages (and a lane's offset, while its head stays the same) is read once for all of them.
  float off[L::VPL];
  ulong off_bh = ~ulong(0);  // the (b, h) whose offset `off` holds
  for (uint block = 0; block < p.blocks_per_threadgroup; ++block) {
    const uint simd_row0 = ((tgid.x * p.blocks_per_threadgroup + block) * TQ_QUANT_SIMDGROUPS + sg) * L::ROWS;
    if (simd_row0 >= p.num_rows) {
      break;  // the whole simdgroup is past the end
    }
    // Vector row = (b * tokens_written + i) * Hkv + h over the processed tokens i: the head tokens
    // 0 .. head_tokens-1, then first .. T-1 (see HadamardQuantizeKvParams).
    const uint row = simd_row0 + lane / L::LANES;
    const bool active = row < p.num_rows;
    const uint d0 = (lane % L::LANES) * L::VPL;

    const uint h = row % p.kv_heads;
    const uint bt = row / p.kv_heads;
    const uint i_tok = bt % p.tokens_written;
    const uint b = bt / p.tokens_written;
    const uint t = i_tok < p.head_tokens ? i_tok : p.first + (i_tok - p.head_tokens);
    const ulong bh = ulong(b) * p.kv_heads + h;
    const ulong src_row = (ulong(b) * p.tokens + t) * p.kv_heads + h;

    if (p.has_offset != 0 && active && bh != off_bh) {
      for (int i = 0; i < L::VPL; ++i) {
        off[i] = offset[bh * D + d0 + i];
      }
      off_bh = bh;
    }
    float y[L::VPL];
    for (int i = 0; i < L::VPL; ++i) {
      float x = active ? float(src[src_row * D + d0 + i]) : 0.0f;
      if (p.has_offset != 0 && active) {
        x -= off[i];  // key centring, in float32 before the rotation like the reference
      }
      // x * s with s = +-1 is exact, as in the reference.
      y[i] = x * tg_signs[d0 + i];
    }
    tq::fwht<L::VPL, L::R>(y, lane);

    float sum_sq = 0.0f;
    for (int i = 0; i < L::VPL; ++i) {
      y[i] *= p.inv_sqrt_r;
      sum_sq += y[i] * y[i];
    }
    const float norm = precise::sqrt(tq::group_sum<L::BLOCK_LANES>(sum_sq));
    // The reference computes sqrt(R) / n as reciprocal(n) * sqrt(R); a zero block stores u = 0.
    const float inv_norm = norm > 0.0f ? precise::divide(1.0f, norm) * p.sqrt_r : 0.0f;

    device const float* boundaries = codebook + (1 << BITS);
    uint code[L::VPL];
    for (int i = 0; i < L::VPL; ++i) {
      code[i] = tq::nearest_code<BITS>(y[i] * inv_norm, boundaries);
    }
    float stored_norm = norm;
    if (p.norm_correction != 0) {
      // n * sqrt(R) / ||c[code]|| of the block: the decoded block then has norm n (never 0: no
      // centroid is 0).
      float c_sq = 0.0f;
      for (int i = 0; i < L::VPL; ++i) {
        const float c = codebook[code[i]];
        c_sq += c * c;
      }
      const float unit = precise::sqrt(tq::group_sum<L::BLOCK_LANES>(c_sq));
      stored_norm = precise::divide(norm * p.sqrt_r, unit);
    }
    if (active) {
      if (t >= p.first) {
        const uint slot = (p.first_slot + (t - p.first)) % p.capacity;
        const ulong cache_row = bh * p.capacity + slot;
        tq::store_codes<BITS, L::VPL>(codes + cache_row * ROW_BYTES, d0, code);
        if (d0 % L::R == 0) {
          norms[cache_row * L::NB + d0 / L::R] = stored_norm;
        }
      }
      // The full-precision windows get the rotated vector itself, cast to their dtype.
      if (t < p.sink_tokens) {
        tq::store_window<L::VPL>(sink, p.sink_dtype, (bh * p.sink_len + p.sink_pos + t) * D + d0, y);
      }
      if (p.recent_len != 0 && t >= p.recent_first) {
        uint slot = p.recent_first_slot + (t - p.recent_first);  // < 2W: wraps at most once
        slot = slot >= p.recent_len ? slot - p.recent_len : slot;
        tq::store_window<L::VPL>(recent, p.recent_dtype, (bh * p.recent_len + slot) * D + d0, y);
      }
    }
  }
}

template <int D, int BITS>
[[kernel]] void dequantize_kv(
    device const uchar* codes [[buffer(0)]],
    device const float* norms [[buffer(1)]],
    device const float* signs [[buffer(2)]],
    device const float* codebook [[buffer(3)]],
    device float* out [[buffer(4)]],
    constant DequantizeKvParams& p [[buffer(5)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  using L = tq::RowLayout<D>;
  constexpr uint ROW_BYTES = D * BITS / 8;
  threadgroup float tg_signs[D];
  tq::load_signs<D, TQ_QUANT_SIMDGROUPS * 32>(tg_signs, signs, tid);
  const uint simd_row0 = (tgid.x * TQ_QUANT_SIMDGROUPS + sg) * L::ROWS;
  if (simd_row0 >= p.num_rows) {
    return;
  }
  // Output row = (b * Hkv + h) * length + i, reading slot (start + i) mod C.
  const uint row = simd_row0 + lane / L::LANES;
  const bool active = row < p.num_rows;
  const uint d0 = (lane % L::LANES) * L::VPL;
  const uint i_pos = row % p.length;
  const uint bh = row / p.length;
  const ulong cache_row = ulong(bh) * p.capacity + (p.first_slot + i_pos) % p.capacity;

  uint code[L::VPL];
  float scale = 0.0f;
  if (active) {
    tq::load_codes<BITS, L::VPL>(codes + cache_row * ROW_BYTES, d0, code);
    scale = norms[cache_row * L::NB + d0 / L::R] * p.inv_sqrt_r;
  } else {
    for (int i = 0; i < L::VPL; ++i) {
      code[i] = 0;
    }
  }
  float y[L::VPL];
  for (int i = 0; i < L::VPL; ++i) {
    y[i] = codebook[code[i]] * scale;
  }
  if (p.rotated == 0) {
    tq::fwht<L::VPL, L::R>(y, lane);
    for (int i = 0; i < L::VPL; ++i) {
      y[i] *= p.inv_sqrt_r;
    }
    for (int i = 0; i < L::VPL; ++i) {
      y[i] *= tg_signs[d0 + i];
    }
  }
  if (active) {
    for (int i = 0; i < L::VPL; ++i) {
      out[ulong(row) * D + d0 + i] = y[i];
    }
  }
}
