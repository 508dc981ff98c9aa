// Launch plan of tq.recompute_w_u(k, v, beta, A, g, cu_seqlens): one launch of the recompute_w_u
// kernel (mps_ops/kernels/gated_delta_chunk.h). Also the launch vocabulary of the three chunk
// stages (recompute_w_u, chunk_fwd_h, chunk_fwd_o): their geometry, Params and size checks (the
// entry op chunk_gated_delta_rule uses the geometry and Params for its fused kernel), and an
// append_<stage>_launch helper per stage that takes the buffer bindings.
// Inputs (Arg::Input index): 0 k, 1 v [each read in its own dtype], 2 beta, 3 A, 4 g [read as
// float32], 5 cu_seqlens (optional, read as int32).
// Outputs: 0 w [B, T, HV, K] float32, 1 u [B, T, HV, V] float32.
#pragma once

#include "gated_delta_common.h"

namespace tq_plan {

// ---- shared by the chunk stages ---------------------------------------------------------------

constexpr uint32_t kGdrChunkThreads = TQ_GDR_CHUNK_SIMDGROUPS * kSimdWidth;

// What a chunk-stage launch needs besides its buffers.
struct GdrChunkGeometry {
  GdrGeometry geo;
  int64_t chunks = 0;          // NT: chunks of all sequences (h's chunk axis, flattened over B)
  int64_t chunks_per_row = 0;  // ceil(T / 64)
  bool has_cu_seqlens = false;
};

inline GdrChunkGeometry gdr_chunk_geometry(const GdrGeometry& geo, const std::vector<int64_t>& cu_seqlens_values) {
  GdrChunkGeometry g;
  g.geo = geo;
  g.chunks = gdr_chunks(geo.batch, geo.tokens, cu_seqlens_values).total;
  g.chunks_per_row = (geo.tokens + kGdrChunk - 1) / kGdrChunk;
  g.has_cu_seqlens = !cu_seqlens_values.empty();
  return g;
}

// The kernels index with 32-bit offsets: every tensor they touch must have < 2^32 elements.
inline bool check_gdr_chunk_sizes(Checker& check, const GdrChunkGeometry& g) {
  const GdrGeometry& x = g.geo;
  const uint64_t rows = static_cast<uint64_t>(x.batch) * x.tokens;
  return check.fits_u32("key elements", rows * x.heads * x.head_dim) &&
         check.fits_u32("w elements", rows * x.value_heads * x.head_dim) &&
         check.fits_u32("value elements", rows * x.value_heads * x.value_dim) &&
         check.fits_u32("A elements", rows * x.value_heads * kGdrChunk) &&
         check.fits_u32("h elements", static_cast<uint64_t>(g.chunks) * x.value_heads * x.head_dim * x.value_dim) &&
         check.fits_u32("state elements", static_cast<uint64_t>(x.sequences) * x.value_heads * x.head_dim * x.value_dim);
}

inline GdrChunkParams gdr_chunk_params(const GdrChunkGeometry& g) {
  GdrChunkParams p{};
  p.tokens = static_cast<tq_uint>(g.geo.tokens);
  p.sequences = static_cast<tq_uint>(g.geo.sequences);
  p.heads = static_cast<tq_uint>(g.geo.heads);
  p.value_heads = static_cast<tq_uint>(g.geo.value_heads);
  p.group = static_cast<tq_uint>(g.geo.heads > 0 ? g.geo.value_heads / g.geo.heads : 0);
  p.head_dim = static_cast<tq_uint>(g.geo.head_dim);
  p.value_dim = static_cast<tq_uint>(g.geo.value_dim);
  p.chunks_per_row = static_cast<tq_uint>(g.chunks_per_row);
  p.has_cu_seqlens = g.has_cu_seqlens ? 1 : 0;
  return p;
}

inline bool is_dummy(const Binding& b) { return b.kind == Arg::Dummy; }

// ---- recompute_w_u ----------------------------------------------------------------------------

// [[buffer(n)]] bindings of the recompute_w_u kernel (cu_seqlens: Arg::Dummy without it).
struct RecomputeWuBindings {
  Binding k, v, beta, A, g, cu_seqlens, w, u;
};

// Appends the launch computing w and u of every chunk; k and v are read in k_dtype / v_dtype.
inline bool append_recompute_w_u_launch(Plan& plan, Checker& check, const GdrChunkGeometry& g,
                                        const std::string& k_dtype, const std::string& v_dtype,
                                        const RecomputeWuBindings& b) {
  if (g.chunks == 0 || g.geo.value_heads == 0) return true;  // no token: nothing to write
  Launch l;
  l.kernel = "recompute_w_u_" + k_dtype + "_" + v_dtype;
  l.grid = {static_cast<uint32_t>(g.chunks), static_cast<uint32_t>(g.geo.value_heads), 1};
  l.threads = {kGdrChunkThreads, 1, 1};
  // A [64, 64], a [64, 32] tile, two [64] factor rows.
  l.threadgroup_memory = static_cast<uint32_t>((kGdrChunk * kGdrChunk + kGdrChunk * TQ_GDR_CHUNK_COLUMNS + 2 * kGdrChunk) * 4);
  l.bindings = {b.k, b.v, b.beta, b.A, b.g, b.cu_seqlens, b.w, b.u, {Arg::Params, 0}};
  l.params = params_bytes(gdr_chunk_params(g));
  if (!check_launch(check, l)) return false;
  plan.launches.push_back(std::move(l));
  return true;
}

struct RecomputeWuPlan : Plan {};

inline RecomputeWuPlan plan_recompute_w_u(const TensorDesc& k, const TensorDesc& v, const TensorDesc& beta,
                                          const TensorDesc& A, const TensorDesc& g, const TensorDesc& cu_seqlens,
                                          const std::vector<int64_t>& cu_seqlens_values) {
  RecomputeWuPlan plan;
  GdrChecker check("recompute_w_u");
  [&] {
    GdrGeometry geo;
    if (!check_recompute_w_u(check, k, v, beta, A, g, cu_seqlens, cu_seqlens_values, &geo)) return;
    const GdrChunkGeometry cg = gdr_chunk_geometry(geo, cu_seqlens_values);
    if (!check_gdr_chunk_sizes(check, cg)) return;
    const int64_t B = geo.batch, T = geo.tokens, HV = geo.value_heads;
    plan.outputs = {{{B, T, HV, geo.head_dim}, "float32"}, {{B, T, HV, geo.value_dim}, "float32"}};
    // k and v as given (a kernel per dtype pair); the rest in float32; cu_seqlens in int32.
    plan.input_dtypes = {k.dtype, v.dtype, "float32", "float32", "float32", "int32"};
    append_recompute_w_u_launch(plan, check, cg, k.dtype, v.dtype,
                                {{Arg::Input, 0},
                                 {Arg::Input, 1},
                                 {Arg::Input, 2},
                                 {Arg::Input, 3},
                                 {Arg::Input, 4},
                                 cu_seqlens.defined ? Binding{Arg::Input, 5} : Binding{Arg::Dummy, 0},
                                 {Arg::Output, 0},
                                 {Arg::Output, 1}});
  }();
  plan.finish(check.error());
  return plan;
}

}  // namespace tq_plan
