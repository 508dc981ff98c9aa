// Launch plan of tq.hadamard_quantize_kv(src, codes, norms, write_pos, is_sliding, bits, signs).
// Inputs (Arg::Input index): 0 src [B, T, Hkv, D] (the host passes it contiguous), 1 codes,
// 2 norms, 3 signs (optional).
#pragma once

#include "common.h"

namespace tq_plan {

struct HadamardQuantizeKvPlan : Plan {};

// Vectors (rows) per threadgroup: TQ_QUANT_SIMDGROUPS simdgroups x 256 / D vectors each.
inline uint32_t quant_rows_per_threadgroup(int64_t head_dim) {
  const int64_t lanes_per_row = head_dim / TQ_LANE_VALUES(head_dim);
  return TQ_QUANT_SIMDGROUPS * static_cast<uint32_t>(kSimdWidth / lanes_per_row);
}

inline HadamardQuantizeKvPlan plan_hadamard_quantize_kv(const TensorDesc& src, const TensorDesc& codes,
                                                        const TensorDesc& norms, int64_t write_pos, bool is_sliding,
                                                        int64_t bits, const TensorDesc& signs) {
  HadamardQuantizeKvPlan plan;
  Checker check("hadamard_quantize_kv");
  [&] {
    if (!check.bits(bits)) return;
    if (!check.rank("src", src, 4, "[B, T, Hkv, D]")) return;
    if (!check.floating("src", src)) return;
    const int64_t B = src.sizes[0], T = src.sizes[1], Hkv = src.sizes[2], D = src.sizes[3];
    if (!check.head_dim(D)) return;
    if (!check.same_device({{"src", &src}, {"codes", &codes}, {"norms", &norms}, {"signs", &signs}})) return;
    int64_t cB = 0, cH = 0, C = 0;
    if (!check.packed_cache("", codes, norms, D, bits, &cB, &cH, &C)) return;
    if (cB != B || cH != Hkv) {
      if (!check.src_not_transposed(src, "codes", cB, cH)) return;
      check.fail("codes must have [B, Hkv] = [" + str(B) + ", " + str(Hkv) + "] to match src, got [" + str(cB) + ", " +
                 str(cH) + "]");
      return;
    }
    if (!check.signs(signs, D)) return;
    if (!check.write(write_pos, T, C, is_sliding)) return;

    int64_t first = 0, first_slot = 0;
    ring_write(T, write_pos, C, is_sliding, &first, &first_slot);
    const uint64_t written = static_cast<uint64_t>(T - first);
    const uint64_t rows = static_cast<uint64_t>(B) * written * Hkv;
    if (rows == 0) return;
    if (!check.fits_u32("src rows", static_cast<uint64_t>(B) * T * Hkv)) return;
    if (!check.fits_u32("cache rows", static_cast<uint64_t>(B) * Hkv * C)) return;

    const int64_t R = rotation_block(D);
    HadamardQuantizeKvParams p{};
    p.num_rows = static_cast<tq_uint>(rows);
    p.tokens = static_cast<tq_uint>(T);
    p.tokens_written = static_cast<tq_uint>(written);
    p.first = static_cast<tq_uint>(first);
    p.kv_heads = static_cast<tq_uint>(Hkv);
    p.capacity = static_cast<tq_uint>(C);
    p.first_slot = static_cast<tq_uint>(first_slot);
    p.has_signs = signs.defined ? 1 : 0;
    p.inv_sqrt_r = static_cast<float>(1.0 / std::sqrt(static_cast<double>(R)));
    p.sqrt_r = static_cast<float>(std::sqrt(static_cast<double>(R)));

    Launch l;
    l.kernel = "hadamard_quantize_kv_" + src.dtype + "_d" + str(D) + "_b" + str(bits);
    l.grid = {ceil_div(rows, quant_rows_per_threadgroup(D)), 1, 1};
    l.threads = {TQ_QUANT_SIMDGROUPS * kSimdWidth, 1, 1};
    l.threadgroup_memory = static_cast<uint32_t>(D * 4);  // the sign vector
    l.bindings = {{Arg::Input, 0},    {Arg::Input, 1},       {Arg::Input, 2},
                  {signs.defined ? Arg::Input : Arg::Dummy, 3}, {Arg::Codebook, 0}, {Arg::Params, 0}};
    l.params = params_bytes(p);
    if (!check_launch(check, l)) return;
    plan.codebook_bits = static_cast<int32_t>(bits);
    plan.launches.push_back(std::move(l));
  }();
  plan.finish(check.error());
  return plan;
}

}  // namespace tq_plan
