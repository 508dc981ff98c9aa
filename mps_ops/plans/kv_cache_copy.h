// Launch plan of tq.kv_cache_copy(src, cache, write_pos, is_sliding).
// Inputs (Arg::Input index): 0 src [B, T, Hkv, D] (the host passes it contiguous), 1 cache.
#pragma once

#include "common.h"

namespace tq_plan {

struct KvCacheCopyPlan : Plan {};

inline KvCacheCopyPlan plan_kv_cache_copy(const TensorDesc& src, const TensorDesc& cache, int64_t write_pos,
                                          bool is_sliding) {
  KvCacheCopyPlan plan;
  Checker check("kv_cache_copy");
  [&] {
    if (!check.rank("src", src, 4, "[B, T, Hkv, D]")) return;
    if (!check.rank("cache", cache, 4, "[B, Hkv, C, D]")) return;
    if (!check.floating("src", src)) return;
    if (!check.floating("cache", cache)) return;
    if (!check.same_device({{"src", &src}, {"cache", &cache}})) return;
    const int64_t B = src.sizes[0], T = src.sizes[1], Hkv = src.sizes[2], D = src.sizes[3];
    const int64_t C = cache.sizes[2];
    if (cache.sizes[0] != B || cache.sizes[1] != Hkv || cache.sizes[3] != D) {
      if (cache.sizes[3] == D && !check.src_not_transposed(src, "cache", cache.sizes[0], cache.sizes[1])) return;
      check.fail("cache must have [B, Hkv, *, D] = [" + str(B) + ", " + str(Hkv) + ", *, " + str(D) +
                 "] to match src, got " + shape_str(cache.sizes));
      return;
    }
    if (C < 1) {
      check.fail("cache capacity C must be >= 1, got " + str(C));
      return;
    }
    if (!check.contiguous("cache", cache)) return;
    if (!check.write(write_pos, T, C, is_sliding)) return;

    int64_t first = 0, first_slot = 0;
    ring_write(T, write_pos, C, is_sliding, &first, &first_slot);
    const uint64_t written = static_cast<uint64_t>(T - first);
    const uint64_t elements = static_cast<uint64_t>(B) * written * Hkv * D;
    if (elements == 0) return;  // nothing to write
    if (!check.fits_u32("src elements", static_cast<uint64_t>(B) * T * Hkv * D)) return;
    if (!check.fits_u32("cache elements", static_cast<uint64_t>(B) * Hkv * C * D)) return;

    KvCacheCopyParams p{};
    p.num_elements = static_cast<tq_uint>(elements);
    p.tokens = static_cast<tq_uint>(T);
    p.tokens_written = static_cast<tq_uint>(written);
    p.first = static_cast<tq_uint>(first);
    p.kv_heads = static_cast<tq_uint>(Hkv);
    p.head_dim = static_cast<tq_uint>(D);
    p.capacity = static_cast<tq_uint>(C);
    p.first_slot = static_cast<tq_uint>(first_slot);

    Launch l;
    l.kernel = "kv_cache_copy_" + src.dtype + "_" + cache.dtype;
    l.grid = {ceil_div(elements, TQ_COPY_THREADS), 1, 1};
    l.threads = {TQ_COPY_THREADS, 1, 1};
    l.bindings = {{Arg::Input, 0}, {Arg::Input, 1}, {Arg::Params, 0}};
    l.params = params_bytes(p);
    if (!check_launch(check, l)) return;
    plan.launches.push_back(std::move(l));
  }();
  plan.finish(check.error());
  return plan;
}

}  // namespace tq_plan
