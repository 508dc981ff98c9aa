// Launch plan of tq.chunk_local_cumsum(g, chunk_size, reverse, scale, cu_seqlens): one launch of
// the chunk_local_cumsum kernel (mps_ops/kernels/gated_delta_chunk_prep.h).
// Inputs (Arg::Input index): 0 g [B, T, HV] (read in its own dtype), 1 cu_seqlens (optional, read as int32).
// Output: 0 [B, T, HV] float32.
#pragma once

#include <optional>

#include "gated_delta_common.h"

namespace tq_plan {

struct ChunkLocalCumsumPlan : Plan {};

inline ChunkLocalCumsumPlan plan_chunk_local_cumsum(const TensorDesc& g, int64_t chunk_size, bool reverse,
                                                    const std::optional<double>& scale, const TensorDesc& cu_seqlens,
                                                    const std::vector<int64_t>& cu_seqlens_values) {
  ChunkLocalCumsumPlan plan;
  GdrChecker check("chunk_local_cumsum");
  [&] {
    GdrGeometry geo;
    if (!check_chunk_local_cumsum(check, g, chunk_size, scale, cu_seqlens, cu_seqlens_values, &geo)) return;
    const int64_t B = geo.batch, T = geo.tokens, HV = geo.value_heads, N = geo.sequences;
    if (!check.fits_u32("g elements", uint64_t(B) * T * HV)) return;

    plan.outputs = {{{B, T, HV}, "float32"}};
    plan.input_dtypes = {g.dtype, "int32"};
    if (B * T * HV == 0) return;  // empty output: nothing to launch

    // Chunks restart at every sequence start and no sequence is longer than T, so any chunk size
    // >= T gives the same sums: cap it at the next power of two >= T (keeps it 32-bit).
    int64_t span = 1;
    while (span < T) span *= 2;
    const int64_t cs = std::min(chunk_size, span);
    int64_t chunks = 0;
    if (cu_seqlens.defined) {
      for (size_t n = 0; n + 1 < cu_seqlens_values.size(); ++n)
        chunks += (cu_seqlens_values[n + 1] - cu_seqlens_values[n] + cs - 1) / cs;
    } else {
      chunks = B * ((T + cs - 1) / cs);
    }

    ChunkLocalCumsumParams p{};
    p.tokens = static_cast<tq_uint>(T);
    p.value_heads = static_cast<tq_uint>(HV);
    p.sequences = static_cast<tq_uint>(N);
    p.chunk_size = static_cast<tq_uint>(cs);
    p.has_cu_seqlens = cu_seqlens.defined ? 1 : 0;
    p.reverse = reverse ? 1 : 0;
    p.has_scale = scale.has_value() ? 1 : 0;
    p.scale = static_cast<float>(scale.value_or(1.0));

    // One simdgroup per value head of the chunk, up to TQ_GDR_CUMSUM_SIMDGROUPS per threadgroup
    // (they read the same cache lines of g: heads are innermost).
    const uint32_t heads_per_group = static_cast<uint32_t>(std::min<int64_t>(HV, TQ_GDR_CUMSUM_SIMDGROUPS));
    Launch l;
    l.kernel = "chunk_local_cumsum_" + g.dtype;
    l.grid = {static_cast<uint32_t>(chunks), ceil_div(HV, heads_per_group), 1};
    l.threads = {heads_per_group * kSimdWidth, 1, 1};
    l.bindings = {{Arg::Input, 0},
                  cu_seqlens.defined ? Binding{Arg::Input, 1} : Binding{Arg::Dummy, 0},
                  {Arg::Output, 0},
                  {Arg::Params, 0}};
    l.params = params_bytes(p);
    if (!check_launch(check, l)) return;
    if (chunks > 0) plan.launches.push_back(std::move(l));
  }();
  plan.finish(check.error());
  return plan;
}

}  // namespace tq_plan
