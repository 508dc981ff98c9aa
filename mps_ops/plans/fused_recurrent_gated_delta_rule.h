// Launch plan of tq.fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state,
// output_final_state, use_qk_l2norm_in_kernel, cu_seqlens): one launch of the recurrent kernel
// (mps_ops/kernels/gated_delta_recurrent.h).
// Inputs (Arg::Input index): 0 q, 1 k, 2 v [q's dtype], 3 g, 4 beta [read as float32],
// 5 initial_state (optional, float32), 6 cu_seqlens (optional, read as int32).
// Outputs: 0 o [B, T, HV, V] in q's dtype, 1 final_state [N, HV, K, V] float32, or [0, HV, K, V]
// when output_final_state is false (the op's "no state" value; the kernel then writes none).
#pragma once

#include <optional>

#include "gated_delta_common.h"

namespace tq_plan {

struct FusedRecurrentGatedDeltaRulePlan : Plan {};

inline FusedRecurrentGatedDeltaRulePlan plan_fused_recurrent_gated_delta_rule(
    const TensorDesc& q, const TensorDesc& k, const TensorDesc& v, const TensorDesc& g, const TensorDesc& beta,
    const std::optional<double>& scale, const TensorDesc& initial_state, bool output_final_state,
    bool use_qk_l2norm_in_kernel, const TensorDesc& cu_seqlens, const std::vector<int64_t>& cu_seqlens_values) {
  FusedRecurrentGatedDeltaRulePlan plan;
  GdrChecker check("fused_recurrent_gated_delta_rule");
  [&] {
    GdrGeometry geo;
    if (!check_gated_delta_rule(check, q, k, v, g, beta, scale, initial_state, cu_seqlens, cu_seqlens_values, &geo))
      return;
    const int64_t B = geo.batch, T = geo.tokens, H = geo.heads, HV = geo.value_heads, K = geo.head_dim,
                  V = geo.value_dim, N = geo.sequences;
    // The kernel indexes with 32-bit offsets.
    if (!check.fits_u32("q elements", uint64_t(B) * T * H * K)) return;
    if (!check.fits_u32("v elements", uint64_t(B) * T * HV * V)) return;
    if (!check.fits_u32("state elements", uint64_t(N) * HV * K * V)) return;

    plan.outputs = {{{B, T, HV, V}, q.dtype}, {{output_final_state ? N : 0, HV, K, V}, "float32"}};
    // q/k/v as given (one kernel per dtype); gates and betas in float32; cu_seqlens in int32 (the
    // .mm converts it already). Naming every dtype also makes the simulator harness pass
    // contiguous copies, as the .mm does.
    plan.input_dtypes = {q.dtype, q.dtype, q.dtype, "float32", "float32", "float32", "int32"};
    if (N == 0 || HV == 0) return;  // empty outputs (B = 0 or HV = 0): nothing to launch

    FusedRecurrentGdrParams p{};
    p.tokens = static_cast<tq_uint>(T);
    p.heads = static_cast<tq_uint>(H);
    p.value_heads = static_cast<tq_uint>(HV);
    p.value_dim = static_cast<tq_uint>(V);
    p.group = static_cast<tq_uint>(HV / H);
    p.has_cu_seqlens = cu_seqlens.defined ? 1 : 0;
    p.has_initial_state = initial_state.defined ? 1 : 0;
    p.has_final_state = output_final_state ? 1 : 0;
    p.use_qk_l2norm = use_qk_l2norm_in_kernel ? 1 : 0;
    p.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(K)));

    Launch l;
    l.kernel = "fused_recurrent_gated_delta_rule_" + q.dtype + "_k" + str(K);
    l.grid = {static_cast<uint32_t>(V / TQ_GDR_RECURRENT_COLUMNS), static_cast<uint32_t>(HV), static_cast<uint32_t>(N)};
    l.threads = {TQ_GDR_RECURRENT_SIMDGROUPS * kSimdWidth, 1, 1};
    // Two halves of: the staged token (q, k, the tile's v, exp(g), beta as float), the slab
    // partials (float2 per thread) and the slab norms (float4 per simdgroup).
    l.threadgroup_memory = static_cast<uint32_t>(
        2 * (4 * (2 * K + TQ_GDR_RECURRENT_COLUMNS + 2) + TQ_GDR_RECURRENT_SIMDGROUPS * (kSimdWidth * 8 + 16)));
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
