// Launch plan of tq.chunk_scaled_dot_kkt(k, g, beta, cu_seqlens): one launch of the
// chunk_scaled_dot_kkt kernel (mps_ops/kernels/gated_delta_chunk_prep.h).
// Inputs (Arg::Input index): 0 k [B, T, H, K] (read in its own dtype), 1 g, 2 beta [B, T, HV]
// (read as float32), 3 cu_seqlens (optional, read as int32).
// Output: 0 A [B, T, HV, 64] float32.
#pragma once

#include <optional>

#include "gated_delta_common.h"

namespace tq_plan {

struct ChunkScaledDotKktPlan : Plan {};

inline ChunkScaledDotKktPlan plan_chunk_scaled_dot_kkt(const TensorDesc& k, const TensorDesc& g, const TensorDesc& beta,
                                                       const TensorDesc& cu_seqlens,
                                                       const std::vector<int64_t>& cu_seqlens_values) {
  ChunkScaledDotKktPlan plan;
  GdrChecker check("chunk_scaled_dot_kkt");
  [&] {
    GdrGeometry geo;
    if (!check_chunk_scaled_dot_kkt(check, k, g, beta, cu_seqlens, cu_seqlens_values, &geo)) return;
    const int64_t B = geo.batch, T = geo.tokens, H = geo.heads, HV = geo.value_heads, K = geo.head_dim,
                  N = geo.sequences;
    if (!check.fits_u32("k elements", uint64_t(B) * T * H * K)) return;
    if (!check.fits_u32("A elements", uint64_t(B) * T * HV * kGdrChunk)) return;

    plan.outputs = {{{B, T, HV, kGdrChunk}, "float32"}};
    plan.input_dtypes = {k.dtype, "float32", "float32", "int32"};
    const int64_t chunks = gdr_chunks(B, T, cu_seqlens_values).total;
    if (chunks == 0 || H == 0) return;  // empty output: nothing to launch

    ChunkScaledDotKktParams p{};
    p.tokens = static_cast<tq_uint>(T);
    p.heads = static_cast<tq_uint>(H);
    p.value_heads = static_cast<tq_uint>(HV);
    p.head_dim = static_cast<tq_uint>(K);
    p.sequences = static_cast<tq_uint>(N);
    p.has_cu_seqlens = cu_seqlens.defined ? 1 : 0;

    Launch l;
    l.kernel = "chunk_scaled_dot_kkt_" + k.dtype;
    l.grid = {static_cast<uint32_t>(chunks), static_cast<uint32_t>(H), 1};
    l.threads = {TQ_GDR_KKT_SIMDGROUPS * kSimdWidth, 1, 1};
    // k slab (64 x 32) + k k^T (64 x 64) + G and beta of one chunk, float32.
    l.threadgroup_memory = static_cast<uint32_t>((kGdrChunk * 32 + kGdrChunk * kGdrChunk + 2 * kGdrChunk) * 4);
    l.bindings = {{Arg::Input, 0},
                  {Arg::Input, 1},
                  {Arg::Input, 2},
                  cu_seqlens.defined ? Binding{Arg::Input, 3} : Binding{Arg::Dummy, 0},
                  {Arg::Output, 0},
                  {Arg::Params, 0}};
    l.params = params_bytes(p);
    if (!check_launch(check, l)) return;
    plan.launches.push_back(std::move(l));
  }();
  plan.finish(check.error());
  return plan;
}

}  // namespace tq_plan
