// Launch plan of tq.chunk_fwd_h(k, w, u, g, initial_state, cu_seqlens): one launch of the
// chunk_fwd_h kernel (mps_ops/kernels/gated_delta_chunk.h), sequential over each sequence's chunks.
// Inputs (Arg::Input index): 0 k [read in its dtype], 1 w, 2 u, 3 g, 4 initial_state (optional)
// [read as float32], 5 cu_seqlens (optional, read as int32).
// Outputs: 0 h [B, NT, HV, K, V] (NT = ceil(T/64) per batch row; with cu_seqlens, B = 1 and NT
// counts the chunks of all sequences, a data-dependent size taken from the cu_seqlens values),
// 1 v_new [B, T, HV, V], 2 final_state [N, HV, K, V], all float32.
#pragma once

#include "recompute_w_u.h"

namespace tq_plan {

// [[buffer(n)]] bindings of the chunk_fwd_h kernel. initial_state and final_state may be
// Arg::Dummy (zero initial state / no final state); cu_seqlens is Arg::Dummy without it.
struct ChunkFwdHBindings {
  Binding k, w, u, g, initial_state, cu_seqlens, h, v_new, final_state;
};

// Appends the state pass; k is read in k_dtype.
inline bool append_chunk_fwd_h_launch(Plan& plan, Checker& check, const GdrChunkGeometry& g, const std::string& k_dtype,
                                      const ChunkFwdHBindings& b) {
  if (g.geo.sequences == 0 || g.geo.value_heads == 0) return true;  // empty outputs
  GdrChunkParams p = gdr_chunk_params(g);
  p.has_initial_state = is_dummy(b.initial_state) ? 0 : 1;
  p.has_final_state = is_dummy(b.final_state) ? 0 : 1;
  Launch l;
  l.kernel = "chunk_fwd_h_" + k_dtype + "_k" + str(g.geo.head_dim);
  // 64-column tiles (V is 64, 128 or 256), 8 simdgroups of 8 columns each.
  l.grid = {static_cast<uint32_t>(g.geo.value_dim / TQ_GDR_FWD_H_COLUMNS), static_cast<uint32_t>(g.geo.value_heads),
            static_cast<uint32_t>(g.geo.sequences)};
  l.threads = {TQ_GDR_FWD_H_SIMDGROUPS * kSimdWidth, 1, 1};
  // A [64, 64] slice of w or k, the chunk's 64 gates.
  l.threadgroup_memory = static_cast<uint32_t>((kGdrChunk * 64 + kGdrChunk) * 4);
  l.bindings = {b.k, b.w, b.u, b.g, b.initial_state, b.cu_seqlens, b.h, b.v_new, b.final_state, {Arg::Params, 0}};
  l.params = params_bytes(p);
  if (!check_launch(check, l)) return false;
  plan.launches.push_back(std::move(l));
  return true;
}

struct ChunkFwdHPlan : Plan {};

inline ChunkFwdHPlan plan_chunk_fwd_h(const TensorDesc& k, const TensorDesc& w, const TensorDesc& u, const TensorDesc& g,
                                      const TensorDesc& initial_state, const TensorDesc& cu_seqlens,
                                      const std::vector<int64_t>& cu_seqlens_values) {
  ChunkFwdHPlan plan;
  GdrChecker check("chunk_fwd_h");
  [&] {
    GdrGeometry geo;
    if (!check_chunk_fwd_h(check, k, w, u, g, initial_state, cu_seqlens, cu_seqlens_values, &geo)) return;
    const GdrChunkGeometry cg = gdr_chunk_geometry(geo, cu_seqlens_values);
    if (!check_gdr_chunk_sizes(check, cg)) return;
    const int64_t B = geo.batch, T = geo.tokens, HV = geo.value_heads, K = geo.head_dim, V = geo.value_dim;
    const int64_t NT = cu_seqlens.defined ? cg.chunks : cg.chunks_per_row;
    plan.outputs = {{{B, NT, HV, K, V}, "float32"}, {{B, T, HV, V}, "float32"}, {{geo.sequences, HV, K, V}, "float32"}};
    plan.input_dtypes = {k.dtype, "float32", "float32", "float32", "float32", "int32"};
    append_chunk_fwd_h_launch(plan, check, cg, k.dtype,
                              {{Arg::Input, 0},
                               {Arg::Input, 1},
                               {Arg::Input, 2},
                               {Arg::Input, 3},
                               initial_state.defined ? Binding{Arg::Input, 4} : Binding{Arg::Dummy, 0},
                               cu_seqlens.defined ? Binding{Arg::Input, 5} : Binding{Arg::Dummy, 0},
                               {Arg::Output, 0},
                               {Arg::Output, 1},
                               {Arg::Output, 2}});
  }();
  plan.finish(check.error());
  return plan;
}

}  // namespace tq_plan
