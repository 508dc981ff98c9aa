// Launch plan of tq.hadamard_quantize_kv(src, codes, norms, write_pos, is_sliding, bits, signs, offset,
// norm_correction, sink, recent): one launch writes the codes, the norms and the windows.
// Inputs (Arg::Input index): 0 src [B, T, Hkv, D] (the host passes it contiguous), 1 codes,
// 2 norms, 3 signs (optional: absent = the canonical signs, Arg::CanonicalSigns), 4 offset (optional, float32 [B, Hkv, D]), 5 sink (optional,
// [B, Hkv, S, D], written in place), 6 recent (optional, [B, Hkv, W, D], written in place).
#pragma once

#include "common.h"

namespace tq_plan {

struct HadamardQuantizeKvPlan : Plan {};

// Row blocks per threadgroup of the quantizer: blocks / kQuantMinThreadgroups, clamped to
// [1, kQuantMaxBlocksPerThreadgroup]. 64 threadgroups of 128 threads still fill a GPU of a few tens
// of cores; 16 blocks bound the serial work of one threadgroup. At 256 blocks (T = 256, Hkv = 8,
// D = 128) that is 4 blocks each, and the staged sign vector adds ~5% to the bytes instead of ~20%.
constexpr uint64_t kQuantMinThreadgroups = 64;
constexpr uint64_t kQuantMaxBlocksPerThreadgroup = 16;

// Vectors (rows) per threadgroup: TQ_QUANT_SIMDGROUPS simdgroups x 256 / D vectors each.
inline uint32_t quant_rows_per_threadgroup(int64_t head_dim) {
  const int64_t lanes_per_row = head_dim / TQ_LANE_VALUES(head_dim);
  return TQ_QUANT_SIMDGROUPS * static_cast<uint32_t>(kSimdWidth / lanes_per_row);
}

inline HadamardQuantizeKvPlan plan_hadamard_quantize_kv(const TensorDesc& src, const TensorDesc& codes,
                                                        const TensorDesc& norms, int64_t write_pos, bool is_sliding,
                                                        int64_t bits, const TensorDesc& signs,
                                                        const TensorDesc& offset = TensorDesc(),
                                                        bool norm_correction = false,
                                                        const TensorDesc& sink = TensorDesc(),
                                                        const TensorDesc& recent = TensorDesc(),
                                                        const TensorDesc& cache_seqlens = TensorDesc()) {
  HadamardQuantizeKvPlan plan;
  Checker check("hadamard_quantize_kv");
  [&] {
    if (cache_seqlens.defined) {
      check.fail("cache_seqlens (per-sequence lengths read on the device) is not supported by the Metal kernels yet; "
                 "pass the lengths as host integers (write_pos)");
      return;
    }
    if (!check.bits(bits)) return;
    if (!check.rank("src", src, 4, "[B, T, Hkv, D]")) return;
    if (!check.floating("src", src)) return;
    const int64_t B = src.sizes[0], T = src.sizes[1], Hkv = src.sizes[2], D = src.sizes[3];
    if (!check.head_dim(D)) return;
    if (!check.same_device({{"src", &src},
                            {"codes", &codes},
                            {"norms", &norms},
                            {"signs", &signs},
                            {"offset", &offset},
                            {"sink", &sink},
                            {"recent", &recent}}))
      return;
    int64_t cB = 0, cH = 0, C = 0;
    if (!check.packed_cache("", codes, norms, D, bits, &cB, &cH, &C)) return;
    if (cB != B || cH != Hkv) {
      if (!check.src_not_transposed(src, "codes", cB, cH)) return;
      check.fail("codes must have [B, Hkv] = [" + str(B) + ", " + str(Hkv) + "] to match src, got [" + str(cB) + ", " +
                 str(cH) + "]");
      return;
    }
    if (!check.signs(signs, D)) return;
    if (offset.defined) {
      if (offset.sizes != std::vector<int64_t>{B, Hkv, D}) {
        check.fail("offset must have shape [B, Hkv, D] = [" + str(B) + ", " + str(Hkv) + ", " + str(D) + "], got " +
                   shape_str(offset.sizes));
        return;
      }
      if (offset.dtype != "float32") {
        check.fail("offset must be float32, got torch." + offset.dtype);
        return;
      }
      if (!check.contiguous("offset", offset)) return;
    }
    if (sink.defined && !check.full_precision("sink", sink, B, Hkv, D, C, 0)) return;
    if (recent.defined && !check.full_precision("recent", recent, B, Hkv, D, C, 1)) return;
    if (!check.write(write_pos, T, C, is_sliding)) return;

    // Codes: tokens first .. T-1 (a ring write of T > C keeps the last C). Sink: the tokens at
    // positions below S, which such a write may have dropped from the codes (the `head` tokens).
    // Ring of the recent window: the last min(T, W) tokens, never before `first` (W <= C).
    int64_t first = 0, first_slot = 0;
    ring_write(T, write_pos, C, is_sliding, &first, &first_slot);
    const int64_t S = sink.defined ? sink.sizes[2] : 0;
    const int64_t sink_tokens = std::max<int64_t>(0, std::min<int64_t>(T, S - write_pos));
    const int64_t head = std::min<int64_t>(sink_tokens, first);
    const int64_t W = recent.defined ? recent.sizes[2] : 0;
    int64_t recent_first = 0, recent_first_slot = 0;
    if (W > 0) ring_write(T, write_pos, W, true, &recent_first, &recent_first_slot);
    const uint64_t written = static_cast<uint64_t>(head + T - first);
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
    p.inv_sqrt_r = static_cast<float>(1.0 / std::sqrt(static_cast<double>(R)));
    p.sqrt_r = static_cast<float>(std::sqrt(static_cast<double>(R)));
    p.has_offset = offset.defined ? 1 : 0;
    p.norm_correction = norm_correction ? 1 : 0;
    p.head_tokens = static_cast<tq_uint>(head);
    p.sink_tokens = static_cast<tq_uint>(sink_tokens);
    p.sink_len = static_cast<tq_uint>(S);
    p.sink_pos = static_cast<tq_uint>(sink_tokens > 0 ? write_pos : 0);
    p.sink_dtype = sink.defined ? window_dtype(sink) : TQ_WINDOW_FLOAT32;
    p.recent_len = static_cast<tq_uint>(W);
    p.recent_first = static_cast<tq_uint>(recent_first);
    p.recent_first_slot = static_cast<tq_uint>(recent_first_slot);
    p.recent_dtype = recent.defined ? window_dtype(recent) : TQ_WINDOW_FLOAT32;

    // Each threadgroup stages the sign vector (D floats) once: with many rows it walks several row
    // blocks, so the signs are read about once per 4 blocks, while the grid keeps at least
    // kQuantMinThreadgroups threadgroups (a decode step's few rows stay one block each).
    const uint64_t blocks = ceil_div(rows, quant_rows_per_threadgroup(D));
    p.blocks_per_threadgroup = static_cast<tq_uint>(
        std::clamp<uint64_t>(blocks / kQuantMinThreadgroups, 1, kQuantMaxBlocksPerThreadgroup));

    Launch l;
    l.kernel = "hadamard_quantize_kv_" + src.dtype + "_d" + str(D) + "_b" + str(bits);
    l.grid = {static_cast<uint32_t>(ceil_div(blocks, p.blocks_per_threadgroup)), 1, 1};
    l.threads = {TQ_QUANT_SIMDGROUPS * kSimdWidth, 1, 1};
    l.threadgroup_memory = static_cast<uint32_t>(D * 4);  // the sign vector
    l.bindings = {{Arg::Input, 0},
                  {Arg::Input, 1},
                  {Arg::Input, 2},
                  signs_binding(signs.defined, 3, D, plan),
                  {Arg::Codebook, 0},
                  {Arg::Params, 0},
                  {offset.defined ? Arg::Input : Arg::Dummy, 4},
                  {sink_tokens > 0 ? Arg::Input : Arg::Dummy, 5},
                  {W > 0 ? Arg::Input : Arg::Dummy, 6}};
    l.params = params_bytes(p);
    if (!check_launch(check, l)) return;
    plan.codebook_bits = static_cast<int32_t>(bits);
    plan.launches.push_back(std::move(l));
  }();
  plan.finish(check.error());
  return plan;
}

}  // namespace tq_plan
