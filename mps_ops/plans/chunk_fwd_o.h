// Launch plan of tq.chunk_fwd_o(q, k, v, h, g, scale, cu_seqlens): one launch of the chunk_fwd_o
// kernel (mps_ops/kernels/gated_delta_chunk.h).
// Inputs (Arg::Input index): 0 q, 1 k [read in their dtype when they share one, else both as
// float32], 2 v (v_new), 3 h, 4 g [read as float32], 5 cu_seqlens (optional, read as int32).
// Output: 0 o [B, T, HV, V] float32.
#pragma once

#include <optional>

#include "recompute_w_u.h"

namespace tq_plan {

// [[buffer(n)]] bindings of the chunk_fwd_o kernel (cu_seqlens: Arg::Dummy without it).
struct ChunkFwdOBindings {
  Binding q, k, v, h, g, cu_seqlens, o;
};

// The dtype the kernel reads q and k in: theirs when they share one (the kernel has one per dtype).
inline std::string chunk_fwd_o_qk_dtype(const TensorDesc& q, const TensorDesc& k) {
  return q.dtype == k.dtype ? q.dtype : "float32";
}

// Appends the output pass. q and k are read in qk_dtype; o is written in float32. `scale` is already
// resolved.
inline bool append_chunk_fwd_o_launch(Plan& plan, Checker& check, const GdrChunkGeometry& g, const std::string& qk_dtype,
                                      float scale, const ChunkFwdOBindings& b) {
  if (g.chunks == 0 || g.geo.value_heads == 0) return true;  // no token: nothing to write
  GdrChunkParams p = gdr_chunk_params(g);
  p.scale = scale;
  Launch l;
  l.kernel = "chunk_fwd_o_" + qk_dtype + "_float32";
  // One threadgroup per (chunk, value head), all V columns.
  l.grid = {static_cast<uint32_t>(g.chunks), static_cast<uint32_t>(g.geo.value_heads), 1};
  l.threads = {kGdrChunkThreads, 1, 1};
  // A [64, 64] (first the k slice [64, 16] and the chunk's 64 gates in its place), three q slices
  // [64, 16]: 28 KB (Apple's 32 KB less a margin for the compiler).
  l.threadgroup_memory = static_cast<uint32_t>((kGdrChunk * kGdrChunk + 3 * kGdrChunk * 16) * 4);
  l.bindings = {b.q, b.k, b.v, b.h, b.g, b.cu_seqlens, b.o, {Arg::Params, 0}};
  l.params = params_bytes(p);
  if (!check_launch(check, l)) return false;
  plan.launches.push_back(std::move(l));
  return true;
}

struct ChunkFwdOPlan : Plan {};

inline ChunkFwdOPlan plan_chunk_fwd_o(const TensorDesc& q, const TensorDesc& k, const TensorDesc& v, const TensorDesc& h,
                                      const TensorDesc& g, const std::optional<double>& scale,
                                      const TensorDesc& cu_seqlens, const std::vector<int64_t>& cu_seqlens_values) {
  ChunkFwdOPlan plan;
  GdrChecker check("chunk_fwd_o");
  [&] {
    GdrGeometry geo;
    if (!check_chunk_fwd_o(check, q, k, v, h, g, scale, cu_seqlens, cu_seqlens_values, &geo)) return;
    const GdrChunkGeometry cg = gdr_chunk_geometry(geo, cu_seqlens_values);
    if (!check_gdr_chunk_sizes(check, cg)) return;
    plan.outputs = {{{geo.batch, geo.tokens, geo.value_heads, geo.value_dim}, "float32"}};
    const std::string qk = chunk_fwd_o_qk_dtype(q, k);
    plan.input_dtypes = {qk, qk, "float32", "float32", "float32", "int32"};
    // K^-0.5 as Python computes it (a double), then float32 like the reference's float32 multiply.
    const double resolved = scale.has_value() ? *scale : std::pow(static_cast<double>(geo.head_dim), -0.5);
    append_chunk_fwd_o_launch(plan, check, cg, qk, static_cast<float>(resolved),
                              {{Arg::Input, 0},
                               {Arg::Input, 1},
                               {Arg::Input, 2},
                               {Arg::Input, 3},
                               {Arg::Input, 4},
                               cu_seqlens.defined ? Binding{Arg::Input, 5} : Binding{Arg::Dummy, 0},
                               {Arg::Output, 0}});
  }();
  plan.finish(check.error());
  return plan;
}

}  // namespace tq_plan
