// TurboQuant encode (hadamard_quantize_kv) and decode (dequantize_kv) kernels, DESIGN.md §5.
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
    uint3 tgid [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  using L = tq::RowLayout<D>;
  constexpr uint ROW_BYTES = D * BITS / 8;
  threadgroup float tg_signs[D];
  tq::load_signs<D, TQ_QUANT_SIMDGROUPS * 32>(tg_signs, signs, p.has_signs, tid);
  const uint simd_row0 = (tgid.x * TQ_QUANT_SIMDGROUPS + sg) * L::ROWS;
  if (simd_row0 >= p.num_rows) {
    return;  // the whole simdgroup is past the end
  }
  // Vector row = (b * Tw + t) * Hkv + h over the written tokens t.
  const uint row = simd_row0 + lane / L::LANES;
  const bool active = row < p.num_rows;
  const uint d0 = (lane % L::LANES) * L::VPL;

  const uint h = row % p.kv_heads;
  const uint bt = row / p.kv_heads;
  const uint t = bt % p.tokens_written;
  const uint b = bt / p.tokens_written;
  const ulong src_row = (ulong(b) * p.tokens + p.first + t) * p.kv_heads + h;
  const uint slot = (p.first_slot + t) % p.capacity;
  const ulong cache_row = (ulong(b) * p.kv_heads + h) * p.capacity + slot;

  float y[L::VPL];
  for (int i = 0; i < L::VPL; ++i) {
    // x * s with s = +-1 (1 without signs) is exact, as in the reference.
    y[i] = (active ? float(src[src_row * D + d0 + i]) : 0.0f) * tg_signs[d0 + i];
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
  if (active) {
    tq::store_codes<BITS, L::VPL>(codes + cache_row * ROW_BYTES, d0, code);
    if (d0 % L::R == 0) {
      norms[cache_row * L::NB + d0 / L::R] = norm;
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
  tq::load_signs<D, TQ_QUANT_SIMDGROUPS * 32>(tg_signs, signs, p.has_signs, tid);
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
