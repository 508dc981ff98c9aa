// Launch plan of tq.dequantize_kv(codes, norms, start, length, bits, rotated, signs).
// Inputs (Arg::Input index): 0 codes, 1 norms, 2 signs (optional: absent = the canonical signs, Arg::CanonicalSigns). Output 0: float32
// [B, Hkv, length, D], allocated contiguous by the host.
#pragma once

#include "hadamard_quantize_kv.h"

namespace tq_plan {

struct DequantizeKvPlan : Plan {};

inline DequantizeKvPlan plan_dequantize_kv(const TensorDesc& codes, const TensorDesc& norms, int64_t start,
                                           int64_t length, int64_t bits, bool rotated, const TensorDesc& signs) {
  DequantizeKvPlan plan;
  Checker check("dequantize_kv");
  [&] {
    if (!check.bits(bits)) return;
    if (!check.rank("codes", codes, 4, "[B, Hkv, C, D*bits/8]")) return;
    const int64_t row = codes.sizes[3];
    const int64_t D = row * 8 / bits;
    if ((row * 8) % bits != 0 || !one_of(D, kSupportedHeadDims)) {
      check.fail("codes last dim " + str(row) + " with bits=" + str(bits) + " gives no supported head_dim " +
                 tuple_of(kSupportedHeadDims, 4));
      return;
    }
    if (!check.same_device({{"codes", &codes}, {"norms", &norms}, {"signs", &signs}})) return;
    int64_t B = 0, Hkv = 0, C = 0;
    if (!check.packed_cache("", codes, norms, D, bits, &B, &Hkv, &C)) return;
    if (!check.signs(signs, D)) return;
    if (start < 0) {
      check.fail("start must be >= 0, got " + str(start));
      return;
    }
    if (length < 0 || length > C) {
      check.fail("length must be in [0, C=" + str(C) + "] (positions alias beyond the capacity), got " + str(length));
      return;
    }
    plan.outputs = {{{B, Hkv, length, D}, "float32"}};
    const uint64_t rows = static_cast<uint64_t>(B) * Hkv * length;
    if (rows == 0) return;
    if (!check.fits_u32("cache rows", static_cast<uint64_t>(B) * Hkv * C)) return;
    if (!check.fits_u32("output elements", rows * D)) return;

    const int64_t R = rotation_block(D);
    DequantizeKvParams p{};
    p.num_rows = static_cast<tq_uint>(rows);
    p.length = static_cast<tq_uint>(length);
    p.capacity = static_cast<tq_uint>(C);
    p.first_slot = static_cast<tq_uint>(start % C);
    p.rotated = rotated ? 1 : 0;
    p.inv_sqrt_r = static_cast<float>(1.0 / std::sqrt(static_cast<double>(R)));
    p.sqrt_r = static_cast<float>(std::sqrt(static_cast<double>(R)));

    Launch l;
    l.kernel = "dequantize_kv_float32_d" + str(D) + "_b" + str(bits);
    l.grid = {ceil_div(rows, quant_rows_per_threadgroup(D)), 1, 1};
    l.threads = {TQ_QUANT_SIMDGROUPS * kSimdWidth, 1, 1};
    l.threadgroup_memory = static_cast<uint32_t>(D * 4);  // the sign vector
    l.bindings = {{Arg::Input, 0}, {Arg::Input, 1}, signs_binding(signs.defined, 2, D, plan),
                  {Arg::Codebook, 0}, {Arg::Output, 0}, {Arg::Params, 0}};
    l.params = params_bytes(p);
    if (!check_launch(check, l)) return;
    plan.codebook_bits = static_cast<int32_t>(bits);
    plan.launches.push_back(std::move(l));
  }();
  plan.finish(check.error());
  return plan;
}

}  // namespace tq_plan
