// Launch plan of tq.chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state,
// output_final_state, use_qk_l2norm_in_kernel, cu_seqlens): the chunked pipeline as the existing
// stage kernels chained on float32 scratch buffers, one encoder, in order:
//
//   [gdr_l2norm q, k]   qn = l2norm(q) * scale, kn = l2norm(k)   (use_qk_l2norm_in_kernel only)
//   chunk_local_cumsum  G  = cumsum of g per 64-token chunk
//   chunk_scaled_dot_kkt A = beta (k k^T) exp(G_i - G_j), strictly lower
//   solve_tril          Ai = (I + A)^-1
//   recompute_w_u       w = Ai (beta exp(G) k), u = Ai (beta v)
//   chunk_fwd_h         h (state entering each chunk), v_new = u - w S, final state
//   chunk_fwd_o         o = scale' [(exp(G) q) S + ((q k^T) exp(G_i - G_j)) v_new], in q's dtype
//
// scale' is the query scale without l2norm; with it the scale is folded into qn (as the CPU
// reference folds it into q's factor) and scale' = 1. Without l2norm the stages read q and k as
// given (one kernel per dtype), so no q/k scratch is needed.
//
// Unlike the CPU reference's fused pass, the chunk states h are stored (the kernels are separate
// stages): scratch is O(T), see gdr_entry_scratch below.
//
// Inputs (Arg::Input index): 0 q, 1 k, 2 v [q's dtype], 3 g [its own dtype: only the cumsum reads
// it], 4 beta [float32], 5 initial_state (optional, float32), 6 cu_seqlens (optional, read as int32).
// Outputs: 0 o [B, T, HV, V] in q's dtype, 1 final_state [N, HV, K, V] float32, or [0, HV, K, V]
// when output_final_state is false (the kernel then writes none).
#pragma once

#include <optional>

#include "chunk_fwd_h.h"
#include "chunk_fwd_o.h"
#include "chunk_local_cumsum.h"
#include "chunk_scaled_dot_kkt.h"
#include "recompute_w_u.h"
#include "solve_tril.h"

namespace tq_plan {

// Scratch buffers of the entry op (Arg::Scratch index). A is dead once solve_tril has run, and
// v_new (V >= 64 columns) is first written by chunk_fwd_h, so one buffer holds A, then v_new.
enum GdrEntryScratch : int32_t {
  kGdrScratchG = 0,        // [B, T, HV] cumulative gates
  kGdrScratchAVnew = 1,    // [B, T, HV, 64] A, later [B, T, HV, V] v_new
  kGdrScratchAi = 2,       // [B, T, HV, 64] (I + A)^-1
  kGdrScratchW = 3,        // [B, T, HV, K]
  kGdrScratchU = 4,        // [B, T, HV, V]
  kGdrScratchH = 5,        // [NT, HV, K, V] chunk states
  kGdrScratchQ = 6,        // [B, T, H, K] l2-normalised, scaled q (l2norm only)
  kGdrScratchK = 7,        // [B, T, H, K] l2-normalised k (l2norm only)
};

// Bytes of each scratch buffer: 4 * [B T HV (1 + 64 + K + 2V) + NT HV K V (+ 2 B T H K with l2norm)].
inline std::vector<uint64_t> gdr_entry_scratch(const GdrChunkGeometry& cg, bool l2norm) {
  const GdrGeometry& x = cg.geo;
  const uint64_t rows = static_cast<uint64_t>(x.batch) * x.tokens, HV = x.value_heads, K = x.head_dim,
                 V = x.value_dim;
  std::vector<uint64_t> bytes = {rows * HV * 4,
                                 rows * HV * std::max<uint64_t>(kGdrChunk, V) * 4,
                                 rows * HV * kGdrChunk * 4,
                                 rows * HV * K * 4,
                                 rows * HV * V * 4,
                                 static_cast<uint64_t>(cg.chunks) * HV * K * V * 4};
  if (l2norm) bytes.insert(bytes.end(), 2, rows * x.heads * K * 4);
  return bytes;
}

// A contiguous float32 tensor of `sizes` on `device`: how a stage plan sees a scratch buffer.
inline TensorDesc gdr_scratch_desc(const std::vector<int64_t>& sizes, const std::string& device) {
  TensorDesc d;
  d.defined = true;
  d.sizes = sizes;
  d.strides.assign(sizes.size(), 1);
  for (size_t i = sizes.size(); i-- > 1;) d.strides[i - 1] = d.strides[i] * std::max<int64_t>(sizes[i], 1);
  d.dtype = "float32";
  d.device = device;
  d.contiguous = true;
  return d;
}

// Appends the launches of a stage op's plan (built on the same geometry), rebinding the stage's
// Arg::Input n to inputs[n] and Arg::Output n to outputs[n]: the stage plans stay the one place that
// sizes their grids. The stages were validated by the entry op's rules, so a failing one is internal.
inline bool append_stage_launches(Plan& plan, Checker& check, const Plan& stage, const std::vector<Binding>& inputs,
                                  const std::vector<Binding>& outputs) {
  if (!stage.ok()) return check.fail("internal: " + stage.error);
  for (Launch l : stage.launches) {
    for (Binding& b : l.bindings) {
      if (b.kind == Arg::Input) {
        b = inputs.at(b.index);
      } else if (b.kind == Arg::Output) {
        b = outputs.at(b.index);
      } else if (b.kind == Arg::Scratch || b.kind == Arg::Codebook) {
        return check.fail("internal: " + l.kernel + " has a binding the entry op cannot rebind");
      }
    }
    plan.launches.push_back(std::move(l));
  }
  return true;
}

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
    if (!check_gdr_chunk_sizes(check, cg)) return;
    const int64_t B = geo.batch, T = geo.tokens, H = geo.heads, HV = geo.value_heads, K = geo.head_dim,
                  V = geo.value_dim, N = geo.sequences;
    const bool l2 = use_qk_l2norm_in_kernel;

    plan.outputs = {{{B, T, HV, V}, q.dtype}, {{output_final_state ? N : 0, HV, K, V}, "float32"}};
    // q/k/v as given (one kernel per dtype); g as given (the cumsum reads it, once); beta and the
    // state in float32; cu_seqlens in int32 (the .mm converts it already).
    plan.input_dtypes = {q.dtype, q.dtype, q.dtype, g.dtype, "float32", "float32", "int32"};
    if (N == 0 || HV == 0) return;  // empty outputs (B = 0 or HV = 0): nothing to launch
    plan.scratch_bytes = gdr_entry_scratch(cg, l2);

    // K^-0.5 as Python computes it (a double), then float32 like the reference's float32 multiply.
    const double resolved = scale.has_value() ? *scale : std::pow(static_cast<double>(K), -0.5);
    const Binding cu = cu_seqlens.defined ? Binding{Arg::Input, 6} : Binding{Arg::Dummy, 0};
    const Binding G = {Arg::Scratch, kGdrScratchG}, A = {Arg::Scratch, kGdrScratchAVnew};
    const Binding Ai = {Arg::Scratch, kGdrScratchAi}, w = {Arg::Scratch, kGdrScratchW};
    const Binding u = {Arg::Scratch, kGdrScratchU}, h = {Arg::Scratch, kGdrScratchH};
    const Binding v_new = {Arg::Scratch, kGdrScratchAVnew};
    Binding qx = {Arg::Input, 0}, kx = {Arg::Input, 1};
    std::string qk_dtype = q.dtype;
    TensorDesc k_desc = k;
    if (l2) {
      qx = {Arg::Scratch, kGdrScratchQ};
      kx = {Arg::Scratch, kGdrScratchK};
      qk_dtype = "float32";
      k_desc = gdr_scratch_desc({B, T, H, K}, q.device);
      if (!append_l2norm_launch(check, plan, q.dtype, B * T * H, K, {Arg::Input, 0}, qx, resolved)) return;
      if (!append_l2norm_launch(check, plan, q.dtype, B * T * H, K, {Arg::Input, 1}, kx)) return;
    }

    const TensorDesc G_desc = gdr_scratch_desc({B, T, HV}, q.device);
    const auto cumsum = plan_chunk_local_cumsum(g, kGdrChunk, false, std::nullopt, cu_seqlens, cu_seqlens_values);
    if (!append_stage_launches(plan, check, cumsum, {{Arg::Input, 3}, cu}, {G})) return;
    if (!append_stage_launches(plan, check,
                               plan_chunk_scaled_dot_kkt(k_desc, G_desc, beta, cu_seqlens, cu_seqlens_values),
                               {kx, G, {Arg::Input, 4}, cu}, {A}))
      return;
    if (!append_stage_launches(plan, check,
                               plan_solve_tril(gdr_scratch_desc({B, T, HV, kGdrChunk}, q.device), cu_seqlens,
                                               cu_seqlens_values),
                               {A, cu}, {Ai}))
      return;
    if (!append_recompute_w_u_launch(plan, check, cg, qk_dtype, v.dtype,
                                     {kx, {Arg::Input, 2}, {Arg::Input, 4}, Ai, G, cu, w, u}))
      return;
    if (!append_chunk_fwd_h_launch(
            plan, check, cg, qk_dtype,
            {kx, w, u, G, initial_state.defined ? Binding{Arg::Input, 5} : Binding{Arg::Dummy, 0}, cu, h, v_new,
             output_final_state ? Binding{Arg::Output, 1} : Binding{Arg::Dummy, 0}}))
      return;
    append_chunk_fwd_o_launch(plan, check, cg, qk_dtype, q.dtype, static_cast<float>(l2 ? 1.0 : resolved),
                              {qx, kx, v_new, h, G, cu, {Arg::Output, 0}});
  }();
  plan.finish(check.error());
  return plan;
}

}  // namespace tq_plan
