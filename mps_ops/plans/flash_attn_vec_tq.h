// Launch plan of tq.flash_attn_vec_tq(q, k_codes, k_norms, v_codes, v_norms, kv_len, scale, bits,
// sliding_window, softcap, kv_start, signs, lse, v_bits, k_sink, v_sink, k_recent, v_recent): a
// split-KV main kernel and a reduce kernel.
// Inputs (Arg::Input index): 0 q [B, Hq, Lq, D] (the host passes it contiguous), 1 k_codes,
// 2 k_norms, 3 v_codes, 4 v_norms, 5 kv_start (optional), 6 signs (optional: absent = the canonical signs, Arg::CanonicalSigns), 7 lse (optional,
// float32 [B, Hq, Lq], written in place by the reduce kernel), 8 k_sink, 9 v_sink (optional,
// [B, Hkv, S, D]), 10 k_recent, 11 v_recent (optional, [B, Hkv, W, D]); window buffers in any of
// float32/float16/bfloat16 (a runtime dtype code each, not an instantiation).
// Kernels: flash_attn_vec_tq_<q dtype>_d<D>_b<key bits> (the values' width is a runtime
// parameter) and flash_attn_vec_tq_reduce_<q dtype>_d<D>.
// Output 0: [B, Hq, Lq, D] in q's dtype. Scratch 0: partial outputs, scratch 1: partial (max, sum).
#pragma once

#include <optional>

#include "common.h"

namespace tq_plan {

// Threadgroups the main kernel aims for: enough to occupy the GPU cores of current Apple chips
// with TQ_ATTN_SIMDGROUPS simdgroups each, yet few splits so that the partial results written
// and re-read by the reduce stay a few percent of the packed KV bytes (the bytes-moved target of
// decode attention: B=1, Hq=32, Hkv=8, D=128, 4 bits, kv_len 4096 -> 8 splits).
constexpr uint32_t kAttnTargetThreadgroups = 64;
// A split scans at least one 32-key tile per simdgroup.
constexpr uint32_t kAttnMinKeysPerSplit = TQ_ATTN_SIMDGROUPS * 32;
// Positions are int32 in the kernels; keep headroom for position arithmetic.
constexpr int64_t kAttnMaxKvLen = int64_t(1) << 30;

struct FlashAttnVecTqPlan : Plan {};

// The main kernel's static threadgroup arrays: the keys' codebook (2^bits), the values' codebook
// (sized for 8 bits), the rotated q tile, the simdgroups' partial outputs and (max, sum), the key begin.
inline uint32_t attn_threadgroup_memory(int64_t head_dim, int64_t bits) {
  const uint64_t rows = TQ_ATTN_TILE_ROWS(head_dim);
  const uint64_t floats = (uint64_t(1) << bits) + 256 + rows * head_dim + TQ_ATTN_SIMDGROUPS * rows * head_dim +
                          2 * TQ_ATTN_SIMDGROUPS * rows + 1;
  return static_cast<uint32_t>(floats * 4);
}

inline FlashAttnVecTqPlan plan_flash_attn_vec_tq(const TensorDesc& q, const TensorDesc& k_codes,
                                                 const TensorDesc& k_norms, const TensorDesc& v_codes,
                                                 const TensorDesc& v_norms, int64_t kv_len, double scale, int64_t bits,
                                                 int64_t sliding_window, double softcap, const TensorDesc& kv_start,
                                                 const TensorDesc& signs, const TensorDesc& lse = TensorDesc(),
                                                 std::optional<int64_t> v_bits_arg = std::nullopt,
                                                 const TensorDesc& k_sink = TensorDesc(),
                                                 const TensorDesc& v_sink = TensorDesc(),
                                                 const TensorDesc& k_recent = TensorDesc(),
                                                 const TensorDesc& v_recent = TensorDesc(),
                                                 const TensorDesc& cache_seqlens = TensorDesc()) {
  FlashAttnVecTqPlan plan;
  Checker check("flash_attn_vec_tq");
  [&] {
    if (cache_seqlens.defined) {
      check.fail("cache_seqlens (per-sequence lengths read on the device) is not supported by the Metal kernels yet; "
                 "pass the lengths as host integers (kv_len)");
      return;
    }
    if (!check.bits(bits)) return;
    if (v_bits_arg.has_value() && !one_of(*v_bits_arg, kSupportedBits)) {
      check.fail("v_bits must be one of " + tuple_of(kSupportedBits, 6) + " (or None = bits), got " + str(*v_bits_arg));
      return;
    }
    const int64_t v_bits = v_bits_arg.value_or(bits);
    if (!check.rank("q", q, 4, "[B, Hq, Lq, D]")) return;
    if (!check.floating("q", q)) return;
    const int64_t B = q.sizes[0], Hq = q.sizes[1], Lq = q.sizes[2], D = q.sizes[3];
    if (!check.head_dim(D)) return;
    if (!check.same_device({{"q", &q},
                            {"k_codes", &k_codes},
                            {"k_norms", &k_norms},
                            {"v_codes", &v_codes},
                            {"v_norms", &v_norms},
                            {"kv_start", &kv_start},
                            {"signs", &signs},
                            {"lse", &lse},
                            {"k_sink", &k_sink},
                            {"v_sink", &v_sink},
                            {"k_recent", &k_recent},
                            {"v_recent", &v_recent}}))
      return;
    int64_t kB = 0, Hkv = 0, C = 0, vB = 0, vH = 0, vC = 0;
    if (!check.packed_cache("k_", k_codes, k_norms, D, bits, &kB, &Hkv, &C)) return;
    if (!check.packed_cache("v_", v_codes, v_norms, D, v_bits, &vB, &vH, &vC)) return;
    if (vB != kB || vH != Hkv || vC != C) {
      check.fail("v_codes shape " + shape_str(v_codes.sizes) + " must match k_codes shape " + shape_str(k_codes.sizes) +
                 " in [B, Hkv, C]");
      return;
    }
    if (kB != B) {
      check.fail("k_codes batch must be B=" + str(B) + " to match q, got " + str(kB));
      return;
    }
    if (Hkv == 0 || Hq % Hkv != 0) {
      check.fail("query heads Hq=" + str(Hq) + " must be a multiple of KV heads Hkv=" + str(Hkv));
      return;
    }
    if (Lq < 1) {
      check.fail("q must hold Lq >= 1 queries, got " + str(Lq));
      return;
    }
    if (kv_len < Lq) {
      check.fail("kv_len=" + str(kv_len) + " must be >= Lq=" + str(Lq) + " (the queries are the last Lq positions)");
      return;
    }
    if (sliding_window < 0) {
      check.fail("sliding_window must be >= 0 (0 = full attention), got " + str(sliding_window));
      return;
    }
    if (sliding_window > C) {
      check.fail("sliding_window=" + str(sliding_window) + " exceeds the cache capacity C=" + str(C));
      return;
    }
    if (kv_len > C) {
      if (sliding_window == 0) {
        check.fail("kv_len=" + str(kv_len) + " exceeds the cache capacity C=" + str(C) +
                   ": the cache has wrapped, which is only valid with 0 < sliding_window <= C (full attention needs "
                   "tokens that are gone)");
        return;
      }
      if (sliding_window + Lq - 1 > C) {
        check.fail("kv_len=" + str(kv_len) + " exceeds the cache capacity C=" + str(C) + " and the first of Lq=" +
                   str(Lq) + " queries needs sliding_window=" + str(sliding_window) +
                   " positions: sliding_window + Lq - 1 must be <= C");
        return;
      }
    }
    if (!(std::isfinite(scale) && scale > 0)) {
      check.fail("scale must be a finite number > 0, got " + py_float_repr(scale));
      return;
    }
    if (softcap < 0) {
      check.fail("softcap must be >= 0 (0 = off), got " + py_float_repr(softcap));
      return;
    }
    if (kv_start.defined) {
      if (kv_start.dim() != 1 || kv_start.sizes[0] != B) {
        check.fail("kv_start must have shape [B] = [" + str(B) + "], got " + shape_str(kv_start.sizes));
        return;
      }
      if (kv_start.dtype != "int64") {
        check.fail("kv_start must be int64, got torch." + kv_start.dtype);
        return;
      }
    }
    if (!check.signs(signs, D)) return;
    if (lse.defined) {
      if (lse.sizes != std::vector<int64_t>{B, Hq, Lq}) {
        check.fail("lse must have shape [B, Hq, Lq] = [" + str(B) + ", " + str(Hq) + ", " + str(Lq) + "], got " +
                   shape_str(lse.sizes));
        return;
      }
      if (lse.dtype != "float32") {
        check.fail("lse must be float32, got torch." + lse.dtype);
        return;
      }
      if (!check.contiguous("lse", lse)) return;
    }
    if (!check.window_pair("sink", k_sink, v_sink, B, Hkv, D, C, 0)) return;
    if (!check.window_pair("recent", k_recent, v_recent, B, Hkv, D, C, 1)) return;

    plan.outputs = {{q.sizes, q.dtype}};
    const uint64_t total_rows = static_cast<uint64_t>(B) * Hq * Lq;
    if (total_rows == 0) return;
    if (kv_len >= kAttnMaxKvLen) {
      check.fail("kv_len=" + str(kv_len) + " exceeds the Metal kernels' position range (< 2^30)");
      return;
    }
    if (!check.fits_u32("cache rows", static_cast<uint64_t>(B) * Hkv * C)) return;

    // Key range any query of the call can see: the valid positions, cut by the window of the
    // first query (kv_start is applied per batch inside the kernel).
    int64_t key_lo = std::max<int64_t>(0, kv_len - C);
    if (sliding_window > 0) key_lo = std::max<int64_t>(key_lo, kv_len - Lq - sliding_window + 1);
    const int64_t key_hi = kv_len;
    const uint64_t num_keys = static_cast<uint64_t>(key_hi - key_lo);

    const int64_t group = Hq / Hkv;
    const uint64_t rows = static_cast<uint64_t>(group) * Lq;
    const uint32_t tile_rows = TQ_ATTN_TILE_ROWS(D);
    const uint32_t row_tiles = ceil_div(rows, tile_rows);
    const uint64_t base = static_cast<uint64_t>(B) * Hkv * row_tiles;
    uint64_t splits = std::max<uint64_t>(1, (kAttnTargetThreadgroups + base - 1) / base);
    splits = std::min<uint64_t>(splits, std::max<uint64_t>(1, (num_keys + kAttnMinKeysPerSplit - 1) / kAttnMinKeysPerSplit));
    const uint64_t keys_per_split = std::max<uint64_t>(1, (num_keys + splits - 1) / splits);
    splits = std::max<uint64_t>(1, (num_keys + keys_per_split - 1) / keys_per_split);
    if (!check.fits_u32("partial elements", total_rows * splits * D)) return;
    if (!check.fits_u32("threadgroups", uint64_t(Hkv) * row_tiles)) return;

    FlashAttnVecTqParams p{};
    p.batch = static_cast<tq_uint>(B);
    p.q_heads = static_cast<tq_uint>(Hq);
    p.kv_heads = static_cast<tq_uint>(Hkv);
    p.q_len = static_cast<tq_uint>(Lq);
    p.capacity = static_cast<tq_uint>(C);
    p.rows = static_cast<tq_uint>(rows);
    p.row_tiles = row_tiles;
    p.num_splits = static_cast<tq_uint>(splits);
    p.keys_per_split = static_cast<tq_uint>(keys_per_split);
    p.total_rows = static_cast<tq_uint>(total_rows);
    p.kv_len = static_cast<tq_int>(kv_len);
    p.key_lo = static_cast<tq_int>(key_lo);
    p.key_hi = static_cast<tq_int>(key_hi);
    p.key_lo_slot = static_cast<tq_uint>(key_lo % C);
    p.sliding_window = static_cast<tq_int>(sliding_window);
    p.has_kv_start = kv_start.defined ? 1 : 0;
    p.scale = static_cast<float>(scale);
    p.softcap = static_cast<float>(softcap);
    p.inv_sqrt_r = static_cast<float>(1.0 / std::sqrt(static_cast<double>(rotation_block(D))));
    p.has_lse = lse.defined ? 1 : 0;
    p.v_bits = static_cast<tq_uint>(v_bits);
    // Window geometry: sinks are positions 0 .. S-1; the ring holds kv_len-W .. kv_len-1 (all of
    // 0 .. kv_len-1 while kv_len < W); without a ring no position reaches recent_lo = kv_len.
    const int64_t S = k_sink.defined ? k_sink.sizes[2] : 0;
    const int64_t W = k_recent.defined ? k_recent.sizes[2] : 0;
    const int64_t recent_lo = W > 0 ? std::max<int64_t>(0, kv_len - W) : kv_len;
    p.sink_len = static_cast<tq_int>(S);
    p.recent_lo = static_cast<tq_int>(recent_lo);
    p.recent_len = static_cast<tq_uint>(W);
    p.recent_lo_slot = static_cast<tq_uint>(W > 0 ? recent_lo % W : 0);
    p.k_sink_dtype = k_sink.defined ? window_dtype(k_sink) : TQ_WINDOW_FLOAT32;
    p.v_sink_dtype = v_sink.defined ? window_dtype(v_sink) : TQ_WINDOW_FLOAT32;
    p.k_recent_dtype = k_recent.defined ? window_dtype(k_recent) : TQ_WINDOW_FLOAT32;
    p.v_recent_dtype = v_recent.defined ? window_dtype(v_recent) : TQ_WINDOW_FLOAT32;
    const std::vector<uint8_t> bytes = params_bytes(p);

    plan.scratch_bytes = {total_rows * splits * D * 4, total_rows * splits * 2 * 4};
    plan.codebook_bits = static_cast<int32_t>(bits);
    plan.second_codebook_bits = static_cast<int32_t>(v_bits);

    Launch main;
    main.kernel = "flash_attn_vec_tq_" + q.dtype + "_d" + str(D) + "_b" + str(bits);
    main.grid = {static_cast<uint32_t>(splits), static_cast<uint32_t>(Hkv * row_tiles), static_cast<uint32_t>(B)};
    main.threads = {TQ_ATTN_SIMDGROUPS * kSimdWidth, 1, 1};
    main.threadgroup_memory = attn_threadgroup_memory(D, bits);
    main.bindings = {{Arg::Input, 0},
                     {Arg::Input, 1},
                     {Arg::Input, 2},
                     {Arg::Input, 3},
                     {Arg::Input, 4},
                     {kv_start.defined ? Arg::Input : Arg::Dummy, 5},
                     signs_binding(signs.defined, 6, D, plan),
                     {Arg::Codebook, 0},
                     {Arg::Scratch, 0},
                     {Arg::Scratch, 1},
                     {Arg::Params, 0},
                     {Arg::Codebook, 1},
                     {k_sink.defined ? Arg::Input : Arg::Dummy, 8},
                     {v_sink.defined ? Arg::Input : Arg::Dummy, 9},
                     {k_recent.defined ? Arg::Input : Arg::Dummy, 10},
                     {v_recent.defined ? Arg::Input : Arg::Dummy, 11}};
    main.params = bytes;
    if (!check_launch(check, main)) return;

    const uint32_t lanes_per_row = static_cast<uint32_t>(D / TQ_LANE_VALUES(D));
    const uint32_t rows_per_threadgroup = TQ_REDUCE_SIMDGROUPS * (kSimdWidth / lanes_per_row);
    Launch reduce;
    reduce.kernel = "flash_attn_vec_tq_reduce_" + q.dtype + "_d" + str(D);
    reduce.grid = {ceil_div(total_rows, rows_per_threadgroup), 1, 1};
    reduce.threads = {TQ_REDUCE_SIMDGROUPS * kSimdWidth, 1, 1};
    reduce.threadgroup_memory = static_cast<uint32_t>(D * 4);  // the sign vector
    reduce.bindings = {{Arg::Scratch, 0},
                       {Arg::Scratch, 1},
                       signs_binding(signs.defined, 6, D, plan),
                       {Arg::Output, 0},
                       {Arg::Params, 0},
                       {lse.defined ? Arg::Input : Arg::Dummy, 7}};
    reduce.params = bytes;
    if (!check_launch(check, reduce)) return;

    plan.launches.push_back(std::move(main));
    plan.launches.push_back(std::move(reduce));
  }();
  plan.finish(check.error());
  return plan;
}

}  // namespace tq_plan
