// Launch plan of tq.solve_tril(A, cu_seqlens): one launch of the solve_tril kernel
// (mps_ops/kernels/gated_delta_chunk_prep.h).
// Inputs (Arg::Input index): 0 A [B, T, HV, 64] (read as float32), 1 cu_seqlens (optional, read as int32).
// Output: 0 [B, T, HV, 64] float32.
#pragma once

#include "gated_delta_common.h"

namespace tq_plan {

struct SolveTrilPlan : Plan {};

inline SolveTrilPlan plan_solve_tril(const TensorDesc& A, const TensorDesc& cu_seqlens,
                                     const std::vector<int64_t>& cu_seqlens_values) {
  SolveTrilPlan plan;
  GdrChecker check("solve_tril");
  [&] {
    GdrGeometry geo;
    if (!check_solve_tril(check, A, cu_seqlens, cu_seqlens_values, &geo)) return;
    const int64_t B = geo.batch, T = geo.tokens, HV = geo.value_heads, N = geo.sequences;
    if (!check.fits_u32("A elements", uint64_t(B) * T * HV * kGdrChunk)) return;

    plan.outputs = {{{B, T, HV, kGdrChunk}, "float32"}};
    plan.input_dtypes = {"float32", "int32"};
    const int64_t chunks = gdr_chunks(B, T, cu_seqlens_values).total;
    if (chunks == 0 || HV == 0) return;  // empty output: nothing to launch

    SolveTrilParams p{};
    p.tokens = static_cast<tq_uint>(T);
    p.value_heads = static_cast<tq_uint>(HV);
    p.sequences = static_cast<tq_uint>(N);
    p.has_cu_seqlens = cu_seqlens.defined ? 1 : 0;

    Launch l;
    l.kernel = "solve_tril";
    l.grid = {static_cast<uint32_t>(chunks), static_cast<uint32_t>(HV), 1};
    l.threads = {TQ_GDR_SOLVE_SIMDGROUPS * kSimdWidth, 1, 1};
    l.threadgroup_memory = static_cast<uint32_t>(kGdrChunk * kGdrChunk * 4);  // the 64 x 64 block
    l.bindings = {{Arg::Input, 0},
                  cu_seqlens.defined ? Binding{Arg::Input, 1} : Binding{Arg::Dummy, 0},
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
