// Launch plan of tq.chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state,
// output_final_state, use_qk_l2norm_in_kernel, cu_seqlens): one launch of the fused kernel
// chunk_gated_delta_rule_<dtype>_k<K> (mps_ops/kernels/gated_delta_fused.h), which walks each
// sequence's chunks with the state in registers and does the whole chunked form per chunk (cumsum
// of g, the q/k l2norm, k k^T, its inverse, v_new, o, the state update) without a round trip
// through device memory. No scratch: device memory holds the inputs and the outputs only.
//
// The stage ops (chunk_local_cumsum ... chunk_fwd_o) keep their own kernels and plans; this op does
// not chain them any more (which took 6 to 8 launches and 4 * [B T HV (1 + 64 + K + 2V) + NT HV K V]
// bytes of float32 scratch, growing with T).
//
// Inputs (Arg::Input index): 0 q, 1 k, 2 v [q's dtype], 3 g [read as float32: the kernel sums it],
// 4 beta [float32], 5 initial_state (optional, float32), 6 cu_seqlens (optional, read as int32).
// Outputs: 0 o [B, T, HV, V] in q's dtype, 1 final_state [N, HV, K, V] float32, or [0, HV, K, V]
// when output_final_state is false (the kernel then writes none).
#pragma once

#include <optional>

#include "chunk_fwd_o.h"

namespace tq_plan {

struct ChunkGatedDeltaRulePlan : Plan {};

inline ChunkGatedDeltaRulePlan plan_chunk_gated_delta_rule(
    const TensorDesc& q, const TensorDesc& k, const TensorDesc& v, const TensorDesc& g, const TensorDesc& beta,
    const std::optional<double>& scale, const TensorDesc& initial_state, bool output_final_state,
    bool use_qk_l2norm_in_kernel, const TensorDesc& cu_seqlens, const std::vector<int64_t>& cu_seqlens_values) {
  ChunkGatedDeltaRulePlan plan;
  GdrChecker check("chunk_gated_delta_rule");
  [&] {
    GdrGeometry geo;
    if (!check_gated_delta_rule(check, q, k, v, g, beta, scale, initial_state, cu_seqlens, cu_seqlens_values, &geo))
      return;
    const GdrChunkGeometry cg = gdr_chunk_geometry(geo, cu_seqlens_values);
    const int64_t B = geo.batch, T = geo.tokens, H = geo.heads, HV = geo.value_heads, K = geo.head_dim,
                  V = geo.value_dim, N = geo.sequences;
    // The kernel indexes with 32-bit offsets: every tensor it touches must have < 2^32 elements.
    const uint64_t rows = static_cast<uint64_t>(B) * T;
    if (!check.fits_u32("key elements", rows * H * K) || !check.fits_u32("value elements", rows * HV * V) ||
        !check.fits_u32("state elements", static_cast<uint64_t>(N) * HV * K * V))
      return;

    plan.outputs = {{{B, T, HV, V}, q.dtype}, {{output_final_state ? N : 0, HV, K, V}, "float32"}};
    // q/k/v as given (one kernel per dtype); g, beta and the state in float32; cu_seqlens in int32
    // (the .mm converts them).
    plan.input_dtypes = {q.dtype, q.dtype, q.dtype, "float32", "float32", "float32", "int32"};
    if (N == 0 || HV == 0) return;  // empty outputs (B = 0 or HV = 0): nothing to launch

    GdrChunkParams p = gdr_chunk_params(cg);
    // K^-0.5 as Python computes it (a double), then float32 like the reference's float32 multiply.
    p.scale = static_cast<float>(scale.has_value() ? *scale : std::pow(static_cast<double>(K), -0.5));
    p.use_qk_l2norm = use_qk_l2norm_in_kernel ? 1 : 0;
    p.has_initial_state = initial_state.defined ? 1 : 0;
    p.has_final_state = output_final_state ? 1 : 0;
    Launch l;
    l.kernel = "chunk_gated_delta_rule_" + q.dtype + "_k" + str(K);
    // 128-column tiles of V (one tile at V = 64 or 128, two at 256), one threadgroup per value
    // head and sequence: each walks the sequence's chunks in order.
    l.grid = {static_cast<uint32_t>((V + TQ_GDR_FUSED_COLUMNS - 1) / TQ_GDR_FUSED_COLUMNS),
              static_cast<uint32_t>(HV), static_cast<uint32_t>(N)};
    l.threads = {TQ_GDR_FUSED_SIMDGROUPS * kSimdWidth, 1, 1};
    // A 64 x 64 float matrix (also the staging space of the q and k slices) and four 64-float rows
    // (G, beta, the q and k factors): 17 KB.
    l.threadgroup_memory = static_cast<uint32_t>((kGdrChunk * kGdrChunk + 4 * kGdrChunk) * 4);
    l.bindings = {{Arg::Input, 0},
                  {Arg::Input, 1},
                  {Arg::Input, 2},
                  {Arg::Input, 3},
                  {Arg::Input, 4},
                  initial_state.defined ? Binding{Arg::Input, 5} : Binding{Arg::Dummy, 0},
                  cu_seqlens.defined ? Binding{Arg::Input, 6} : Binding{Arg::Dummy, 0},
                  {Arg::Output, 0},
                  output_final_state ? Binding{Arg::Output, 1} : Binding{Arg::Dummy, 0},
                  {Arg::Params, 0}};
    l.params = params_bytes(p);
    if (!check_launch(check, l)) return;
    plan.launches.push_back(std::move(l));
  }();
  plan.finish(check.error());
  return plan;
}

}  // namespace tq_plan
