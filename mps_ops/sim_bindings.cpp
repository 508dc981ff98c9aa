// C ABI over the launch plans, for ctypes (the simulator tests in tests/mps_sim/ build this file
// into a shared library). It only copies plan results into flat structs: no logic of its own, so
// the simulator launches exactly what torch_tq_mps.mm launches.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "plans/chunk_fwd_h.h"
#include "plans/chunk_fwd_o.h"
#include "plans/chunk_gated_delta_rule.h"
#include "plans/chunk_local_cumsum.h"
#include "plans/chunk_scaled_dot_kkt.h"
#include "plans/dequantize_kv.h"
#include "plans/flash_attn_vec_tq.h"
#include "plans/fused_recurrent_gated_delta_rule.h"
#include "plans/hadamard_quantize_kv.h"
#include "plans/kv_cache_copy.h"
#include "plans/recompute_w_u.h"
#include "plans/solve_tril.h"

extern "C" {

typedef struct {
  int32_t defined;
  int32_t dim;
  int64_t sizes[8];
  int64_t strides[8];
  char dtype[16];
  char device[32];
  int32_t contiguous;
} tq_tensor_desc;

typedef struct {
  int32_t kind;  // tq_plan::Arg
  int32_t index;
} tq_binding;

typedef struct {
  char kernel[128];
  uint32_t grid[3];
  uint32_t threads[3];
  uint32_t threadgroup_memory;
  int32_t num_bindings;
  tq_binding bindings[16];
  uint32_t params_size;
  uint8_t params[512];
} tq_launch;

typedef struct {
  char error[1024];
  int32_t num_launches;
  tq_launch launches[16];
  int32_t num_scratch;
  uint64_t scratch_bytes[8];
  int32_t codebook_bits;
  int32_t second_codebook_bits;
  int32_t canonical_signs_dim;
  int32_t num_outputs;
  int32_t output_dims[4];
  int64_t output_sizes[4][8];
  char output_dtypes[4][16];
  int32_t num_input_dtypes;
  char input_dtypes[16][16];
} tq_plan_result;

}  // extern "C"

namespace {

tq_plan::TensorDesc to_desc(const tq_tensor_desc* t) {
  tq_plan::TensorDesc d;
  if (t == nullptr || !t->defined) return d;
  d.defined = true;
  d.sizes.assign(t->sizes, t->sizes + t->dim);
  d.strides.assign(t->strides, t->strides + t->dim);
  d.dtype = std::string(t->dtype, strnlen(t->dtype, sizeof t->dtype));
  d.device = std::string(t->device, strnlen(t->device, sizeof t->device));
  d.contiguous = t->contiguous != 0;
  return d;
}

template <size_t N>
void copy_str(char (&dst)[N], const std::string& src) {
  std::strncpy(dst, src.c_str(), N - 1);
}

// Host copy of an int64 array (cu_seqlens values); empty for n = 0.
std::vector<int64_t> values(const int64_t* v, int32_t n) { return n > 0 ? std::vector<int64_t>(v, v + n) : std::vector<int64_t>(); }

void copy_plan(const tq_plan::Plan& plan, tq_plan_result* out) {
  std::memset(out, 0, sizeof *out);
  copy_str(out->error, plan.error);
  out->num_launches = static_cast<int32_t>(std::min<size_t>(plan.launches.size(), 16));
  for (int i = 0; i < out->num_launches; ++i) {
    const tq_plan::Launch& l = plan.launches[i];
    tq_launch& o = out->launches[i];
    copy_str(o.kernel, l.kernel);
    for (int k = 0; k < 3; ++k) {
      o.grid[k] = l.grid[k];
      o.threads[k] = l.threads[k];
    }
    o.threadgroup_memory = l.threadgroup_memory;
    o.num_bindings = static_cast<int32_t>(std::min<size_t>(l.bindings.size(), 16));
    for (int b = 0; b < o.num_bindings; ++b) {
      o.bindings[b].kind = static_cast<int32_t>(l.bindings[b].kind);
      o.bindings[b].index = l.bindings[b].index;
    }
    o.params_size = static_cast<uint32_t>(std::min<size_t>(l.params.size(), sizeof o.params));
    std::memcpy(o.params, l.params.data(), o.params_size);
  }
  out->num_scratch = static_cast<int32_t>(std::min<size_t>(plan.scratch_bytes.size(), 8));
  for (int i = 0; i < out->num_scratch; ++i) out->scratch_bytes[i] = plan.scratch_bytes[i];
  out->codebook_bits = plan.codebook_bits;
  out->second_codebook_bits = plan.second_codebook_bits;
  out->canonical_signs_dim = plan.canonical_signs_dim;
  out->num_outputs = static_cast<int32_t>(std::min<size_t>(plan.outputs.size(), 4));
  for (int i = 0; i < out->num_outputs; ++i) {
    const auto& spec = plan.outputs[i];
    out->output_dims[i] = static_cast<int32_t>(std::min<size_t>(spec.sizes.size(), 8));
    for (int d = 0; d < out->output_dims[i]; ++d) out->output_sizes[i][d] = spec.sizes[d];
    copy_str(out->output_dtypes[i], spec.dtype);
  }
  out->num_input_dtypes = static_cast<int32_t>(std::min<size_t>(plan.input_dtypes.size(), 16));
  for (int i = 0; i < out->num_input_dtypes; ++i) copy_str(out->input_dtypes[i], plan.input_dtypes[i]);
}

}  // namespace

extern "C" {

void tq_plan_kv_cache_copy(const tq_tensor_desc* src, const tq_tensor_desc* cache, int64_t write_pos,
                           int32_t is_sliding, tq_plan_result* out) {
  const auto plan = tq_plan::plan_kv_cache_copy(to_desc(src), to_desc(cache), write_pos, is_sliding != 0);
  copy_plan(plan, out);
}

void tq_plan_hadamard_quantize_kv(const tq_tensor_desc* src, const tq_tensor_desc* codes, const tq_tensor_desc* norms,
                                  int64_t write_pos, int32_t is_sliding, int64_t bits, const tq_tensor_desc* signs,
                                  const tq_tensor_desc* offset, int32_t norm_correction, const tq_tensor_desc* sink,
                                  const tq_tensor_desc* recent, const tq_tensor_desc* cache_seqlens,
                                  tq_plan_result* out) {
  const auto plan = tq_plan::plan_hadamard_quantize_kv(to_desc(src), to_desc(codes), to_desc(norms), write_pos,
                                                       is_sliding != 0, bits, to_desc(signs), to_desc(offset),
                                                       norm_correction != 0, to_desc(sink), to_desc(recent),
                                                       to_desc(cache_seqlens));
  copy_plan(plan, out);
}

void tq_plan_dequantize_kv(const tq_tensor_desc* codes, const tq_tensor_desc* norms, int64_t start, int64_t length,
                           int64_t bits, int32_t rotated, const tq_tensor_desc* signs, tq_plan_result* out) {
  const auto plan =
      tq_plan::plan_dequantize_kv(to_desc(codes), to_desc(norms), start, length, bits, rotated != 0, to_desc(signs));
  copy_plan(plan, out);
}

void tq_plan_flash_attn_vec_tq(const tq_tensor_desc* q, const tq_tensor_desc* k_codes, const tq_tensor_desc* k_norms,
                               const tq_tensor_desc* v_codes, const tq_tensor_desc* v_norms, int64_t kv_len,
                               double scale, int64_t bits, int64_t sliding_window, double softcap,
                               const tq_tensor_desc* kv_start, const tq_tensor_desc* signs, const tq_tensor_desc* lse,
                               int32_t has_v_bits, int64_t v_bits, const tq_tensor_desc* k_sink,
                               const tq_tensor_desc* v_sink, const tq_tensor_desc* k_recent,
                               const tq_tensor_desc* v_recent, const tq_tensor_desc* cache_seqlens,
                               tq_plan_result* out) {
  const auto plan = tq_plan::plan_flash_attn_vec_tq(
      to_desc(q), to_desc(k_codes), to_desc(k_norms), to_desc(v_codes), to_desc(v_norms), kv_len, scale, bits,
      sliding_window, softcap, to_desc(kv_start), to_desc(signs), to_desc(lse),
      has_v_bits ? std::optional<int64_t>(v_bits) : std::nullopt, to_desc(k_sink), to_desc(v_sink), to_desc(k_recent),
      to_desc(v_recent), to_desc(cache_seqlens));
  copy_plan(plan, out);
}

void tq_plan_fused_recurrent_gated_delta_rule(const tq_tensor_desc* q, const tq_tensor_desc* k,
                                              const tq_tensor_desc* v, const tq_tensor_desc* g,
                                              const tq_tensor_desc* beta, int32_t has_scale, double scale,
                                              const tq_tensor_desc* initial_state, int32_t output_final_state,
                                              int32_t use_qk_l2norm_in_kernel, const tq_tensor_desc* cu_seqlens,
                                              const int64_t* cu_seqlens_values, int32_t num_cu_seqlens_values,
                                              tq_plan_result* out) {
  const auto plan = tq_plan::plan_fused_recurrent_gated_delta_rule(
      to_desc(q), to_desc(k), to_desc(v), to_desc(g), to_desc(beta),
      has_scale ? std::optional<double>(scale) : std::nullopt, to_desc(initial_state), output_final_state != 0,
      use_qk_l2norm_in_kernel != 0, to_desc(cu_seqlens), values(cu_seqlens_values, num_cu_seqlens_values));
  copy_plan(plan, out);
}

void tq_plan_chunk_local_cumsum(const tq_tensor_desc* g, int64_t chunk_size, int32_t reverse, int32_t has_scale,
                                double scale, const tq_tensor_desc* cu_seqlens, const int64_t* cu_seqlens_values,
                                int32_t num_cu_seqlens_values, tq_plan_result* out) {
  const auto plan = tq_plan::plan_chunk_local_cumsum(to_desc(g), chunk_size, reverse != 0,
                                                     has_scale ? std::optional<double>(scale) : std::nullopt,
                                                     to_desc(cu_seqlens), values(cu_seqlens_values, num_cu_seqlens_values));
  copy_plan(plan, out);
}

void tq_plan_chunk_scaled_dot_kkt(const tq_tensor_desc* k, const tq_tensor_desc* g, const tq_tensor_desc* beta,
                                  const tq_tensor_desc* cu_seqlens, const int64_t* cu_seqlens_values,
                                  int32_t num_cu_seqlens_values, tq_plan_result* out) {
  const auto plan = tq_plan::plan_chunk_scaled_dot_kkt(to_desc(k), to_desc(g), to_desc(beta), to_desc(cu_seqlens),
                                                       values(cu_seqlens_values, num_cu_seqlens_values));
  copy_plan(plan, out);
}

void tq_plan_solve_tril(const tq_tensor_desc* A, const tq_tensor_desc* cu_seqlens, const int64_t* cu_seqlens_values,
                        int32_t num_cu_seqlens_values, tq_plan_result* out) {
  const auto plan =
      tq_plan::plan_solve_tril(to_desc(A), to_desc(cu_seqlens), values(cu_seqlens_values, num_cu_seqlens_values));
  copy_plan(plan, out);
}

void tq_plan_recompute_w_u(const tq_tensor_desc* k, const tq_tensor_desc* v, const tq_tensor_desc* beta,
                           const tq_tensor_desc* A, const tq_tensor_desc* g, const tq_tensor_desc* cu_seqlens,
                           const int64_t* cu_seqlens_values, int32_t num_cu_seqlens_values, tq_plan_result* out) {
  const auto plan = tq_plan::plan_recompute_w_u(to_desc(k), to_desc(v), to_desc(beta), to_desc(A), to_desc(g),
                                                to_desc(cu_seqlens), values(cu_seqlens_values, num_cu_seqlens_values));
  copy_plan(plan, out);
}

void tq_plan_chunk_fwd_h(const tq_tensor_desc* k, const tq_tensor_desc* w, const tq_tensor_desc* u,
                         const tq_tensor_desc* g, const tq_tensor_desc* initial_state, const tq_tensor_desc* cu_seqlens,
                         const int64_t* cu_seqlens_values, int32_t num_cu_seqlens_values, tq_plan_result* out) {
  const auto plan =
      tq_plan::plan_chunk_fwd_h(to_desc(k), to_desc(w), to_desc(u), to_desc(g), to_desc(initial_state),
                                to_desc(cu_seqlens), values(cu_seqlens_values, num_cu_seqlens_values));
  copy_plan(plan, out);
}

void tq_plan_chunk_fwd_o(const tq_tensor_desc* q, const tq_tensor_desc* k, const tq_tensor_desc* v,
                         const tq_tensor_desc* h, const tq_tensor_desc* g, int32_t has_scale, double scale,
                         const tq_tensor_desc* cu_seqlens, const int64_t* cu_seqlens_values,
                         int32_t num_cu_seqlens_values, tq_plan_result* out) {
  const auto plan = tq_plan::plan_chunk_fwd_o(to_desc(q), to_desc(k), to_desc(v), to_desc(h), to_desc(g),
                                              has_scale ? std::optional<double>(scale) : std::nullopt,
                                              to_desc(cu_seqlens), values(cu_seqlens_values, num_cu_seqlens_values));
  copy_plan(plan, out);
}

void tq_plan_chunk_gated_delta_rule(const tq_tensor_desc* q, const tq_tensor_desc* k, const tq_tensor_desc* v,
                                    const tq_tensor_desc* g, const tq_tensor_desc* beta, int32_t has_scale,
                                    double scale, const tq_tensor_desc* initial_state, int32_t output_final_state,
                                    int32_t use_qk_l2norm_in_kernel, const tq_tensor_desc* cu_seqlens,
                                    const int64_t* cu_seqlens_values, int32_t num_cu_seqlens_values,
                                    tq_plan_result* out) {
  const auto plan = tq_plan::plan_chunk_gated_delta_rule(
      to_desc(q), to_desc(k), to_desc(v), to_desc(g), to_desc(beta),
      has_scale ? std::optional<double>(scale) : std::nullopt, to_desc(initial_state), output_final_state != 0,
      use_qk_l2norm_in_kernel != 0, to_desc(cu_seqlens), values(cu_seqlens_values, num_cu_seqlens_values));
  copy_plan(plan, out);
}

}  // extern "C"
