// MPS implementations of torch.ops.tq.* (DESIGN.md §3). No math here: each op describes its
// tensors, asks its launch plan (mps_ops/plans/<op>.h) for the kernel launches, turns a failed plan
// into the same ValueError text as torch_tq/_validation.py, and hands the plan to one generic
// encoder that binds buffers in the plan's order on PyTorch's current MPS stream.
//
// No macOS in this project's CI: the kernels and the plans are verified through the MSL simulator
// in tests/mps_sim/, this file minus its two marked Metal sections is compiled, loaded and checked
// on Linux by tests/mps_sim/test_mps_host_code.py, and the whole file, Objective-C included, is
// compiled -fsyntax-only for an Apple-silicon Mac against stub SDK headers by
// tests/mps_sim/test_mps_objcxx_check.py. Build: mps_ops/build_config.py (macOS only).
//
// Runtime guards: Apple-silicon GPUs only (Apple7 family, 32-wide SIMD groups, both checked, the
// error names the GPU); one Metal library per kernel family (.metal file), compiled at its first
// use, so an MSL error disables only that family's ops (torch_tq.backends.mps.warmup() compiles
// all of them ahead of time); Objective-C objects are created inside autorelease pools.
#include <torch/extension.h>

// ---- Metal headers (tests/mps_sim/test_mps_host_code.py compiles this file without them) ----
#include <ATen/mps/MPSDevice.h>
#include <ATen/mps/MPSStream.h>

#import <Foundation/Foundation.h>
#import <Metal/Metal.h>
// ---- end of Metal headers ----

#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
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

namespace {

using tq_plan::Arg;

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    default: return c10::toString(t);
  }
}

tq_plan::TensorDesc describe(const std::optional<at::Tensor>& t) {
  tq_plan::TensorDesc d;
  if (!t.has_value() || !t->defined()) return d;
  d.defined = true;
  d.sizes = t->sizes().vec();
  d.strides = t->strides().vec();
  d.dtype = dtype_name(t->scalar_type());
  d.device = t->device().str();
  d.contiguous = t->is_contiguous();
  return d;
}

at::ScalarType scalar_type(const std::string& name) {
  for (at::ScalarType t : {at::kFloat, at::kHalf, at::kBFloat16, at::kByte, at::kInt, at::kLong}) {
    if (dtype_name(t) == name) return t;
  }
  TORCH_CHECK(false, "tq: internal: a launch plan names the unsupported dtype ", name);
  return at::kFloat;  // not reached
}

// ---- Metal encoding (tests/mps_sim/test_mps_host_code.py replaces this section by a stub) ----
// Generated at build time by mps_ops/build_config.py: `kTorchTqMetalFamilies`, one self-contained
// Metal source per .metal file of mps_ops/kernels/ (newLibraryWithSource has no include path).
#include "torch_tq_metal_source.h"

// PyTorch's dispatch_sync_with_rethrow moved from at::native::mps to at::mps in torch 2.10; this
// copy works with every supported torch. A C++ exception must not unwind through libdispatch (the
// process would abort): it is caught inside the block and rethrown on the calling thread.
void dispatch_sync_rethrowing(dispatch_queue_t queue, void (^block)()) {
  __block std::exception_ptr error;
  dispatch_sync(queue, ^() {
    try {
      block();
    } catch (...) {
      error = std::current_exception();
    }
  });
  if (error) std::rethrow_exception(error);
}

// Device, libraries (one per kernel family, compiled at the family's first use) and pipelines.

std::mutex g_pipeline_mutex;
std::map<std::string, id<MTLLibrary>> g_libraries;               // by family, kept for the process
std::map<std::string, std::string> g_library_errors;             // by family: why it did not compile
std::map<std::string, id<MTLComputePipelineState>> g_pipelines;  // by host name, kept for the process

std::string gpu_name(id<MTLDevice> device) {
  @autoreleasepool {
    NSString* name = device.name;
    return name != nil ? std::string(name.UTF8String) : std::string("an unnamed GPU");
  }
}

// The kernels need an Apple-silicon GPU (simdgroup_matrix, 32-wide SIMD groups). PyTorch's MPS
// backend also runs on the AMD and Intel GPUs of Intel Macs: those are refused here, by name.
id<MTLDevice> supported_device() {
  id<MTLDevice> device = at::mps::MPSDevice::getInstance()->device();
  TORCH_CHECK(device != nil, "tq: PyTorch's MPS backend has no Metal device");
  TORCH_CHECK([device supportsFamily:MTLGPUFamilyApple7], "tq: the Metal kernels of torch_tq need an Apple-silicon GPU "
              "(Metal GPU family Apple7: M1 or later); this Mac's GPU is ", gpu_name(device));
  return device;
}

// The family that defines a kernel: the one with the longest host-name prefix it starts with.
const TqMetalFamily& family_of(const std::string& kernel) {
  const TqMetalFamily* best = nullptr;
  size_t best_length = 0;
  for (const TqMetalFamily& family : kTorchTqMetalFamilies) {
    for (const char* const* prefix = family.host_name_prefixes; *prefix != nullptr; ++prefix) {
      const size_t length = std::strlen(*prefix);
      if (length > best_length && kernel.compare(0, length, *prefix) == 0) {
        best = &family;
        best_length = length;
      }
    }
  }
  TORCH_CHECK(best != nullptr, "tq: internal: no Metal source defines the kernel ", kernel);
  return *best;
}

// Explicit math mode: IEEE-conforming division, sqrt and exp, as the CPU reference. The caller
// releases the options.
MTLCompileOptions* new_compile_options() {
  MTLCompileOptions* options = [MTLCompileOptions new];
#if defined(__MAC_15_0) && __MAC_OS_X_VERSION_MAX_ALLOWED >= __MAC_15_0
  if (@available(macOS 15.0, *)) {
    options.mathMode = MTLMathModeSafe;
  } else {
    options.fastMathEnabled = NO;
  }
#else
  options.fastMathEnabled = NO;
#endif
  // bfloat (and the bfloat16 instantiations, see TQ_IF_BFLOAT) needs MSL 3.1.
#if defined(__MAC_14_0) && __MAC_OS_X_VERSION_MAX_ALLOWED >= __MAC_14_0
  if (@available(macOS 14.0, *)) {
    options.languageVersion = MTLLanguageVersion3_1;
  }
#endif
  return options;
}

// The library of `family`, compiled on its first use. A family that does not compile is
// remembered with its error (nil here, the error in *error): the other families keep working.
id<MTLLibrary> library_locked(id<MTLDevice> device, const TqMetalFamily& family, std::string* error) {
  auto it = g_libraries.find(family.name);
  if (it != g_libraries.end()) return it->second;
  auto failed = g_library_errors.find(family.name);
  if (failed == g_library_errors.end()) {
    @autoreleasepool {
      MTLCompileOptions* options = new_compile_options();
      NSError* ns_error = nil;
      id<MTLLibrary> library = [device newLibraryWithSource:[NSString stringWithUTF8String:family.source]
                                                    options:options
                                                      error:&ns_error];
      [options release];
      if (library != nil) {
        g_libraries.emplace(family.name, library);
        return library;
      }
      failed = g_library_errors
                   .emplace(family.name, ns_error != nil ? std::string(ns_error.localizedDescription.UTF8String)
                                                         : std::string("unknown error"))
                   .first;
    }
  }
  *error = failed->second;
  return nil;
}

id<MTLComputePipelineState> pipeline(const std::string& name) {
  std::lock_guard<std::mutex> lock(g_pipeline_mutex);
  auto it = g_pipelines.find(name);
  if (it != g_pipelines.end()) return it->second;
  id<MTLDevice> device = supported_device();
  const TqMetalFamily& family = family_of(name);
  std::string error;
  id<MTLLibrary> library = library_locked(device, family, &error);
  TORCH_CHECK(library != nil, "tq: the Metal kernels of family '", family.name, "' (mps_ops/kernels/", family.name,
              ".metal), which define ", name, ", do not compile on ", gpu_name(device), "; ops using other families "
              "still work. Metal's error: ", error);
  id<MTLComputePipelineState> pso = nil;
  bool found = false;
  @autoreleasepool {
    id<MTLFunction> fn = [library newFunctionWithName:[NSString stringWithUTF8String:name.c_str()]];
    if (fn != nil) {
      found = true;
      NSError* ns_error = nil;
      pso = [device newComputePipelineStateWithFunction:fn error:&ns_error];
      [fn release];
      if (pso == nil) {
        error = ns_error != nil ? std::string(ns_error.localizedDescription.UTF8String) : std::string("unknown error");
      }
    }
  }
  TORCH_CHECK(found, "tq: Metal kernel ", name, " not found in family '", family.name, "'",
              name.find("bfloat16") != std::string::npos ? " (bfloat16 kernels need macOS 14 / MSL 3.1)" : "");
  TORCH_CHECK(pso != nil, "tq: failed to build the pipeline of ", name, ": ", error);
  // Every kernel's shuffles, reductions and lane layouts assume 32-wide SIMD groups.
  const NSUInteger simd_width = pso.threadExecutionWidth;
  if (simd_width != 32) {
    [pso release];
    TORCH_CHECK(false, "tq: Metal kernel ", name, " would run with SIMD groups of ", simd_width, " threads on ",
                gpu_name(device), "; the kernels of torch_tq need 32");
  }
  g_pipelines.emplace(name, pso);
  return pso;
}

// Compiles every family now (torch_tq.backends.mps.warmup()): family -> "" when it compiled, else
// Metal's error. Pipelines are still built at each kernel's first use.
std::map<std::string, std::string> compile_metal_families() {
  std::lock_guard<std::mutex> lock(g_pipeline_mutex);
  id<MTLDevice> device = supported_device();
  std::map<std::string, std::string> result;
  for (const TqMetalFamily& family : kTorchTqMetalFamilies) {
    std::string error;
    library_locked(device, family, &error);
    result.emplace(family.name, error);
  }
  return result;
}

// Centroids then decision boundaries of the b-bit codebook, float32, from torch_tq.codebooks:
// the only source of centroids in the project (computed once per bit width, then cached).
std::vector<float> codebook(int bits) {
  static std::mutex mutex;
  static std::map<int, std::vector<float>> cache;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(bits);
    if (it != cache.end()) return it->second;
  }
  std::vector<float> values;
  {
    // Never wait for the GIL while holding `mutex`.
    pybind11::gil_scoped_acquire gil;
    pybind11::module_ codebooks = pybind11::module_::import("torch_tq.codebooks");
    for (const char* fn : {"lloyd_max_codebook", "decision_boundaries"}) {
      at::Tensor t = codebooks.attr(fn)(bits).cast<at::Tensor>().to(at::kFloat).contiguous().cpu();
      values.insert(values.end(), t.data_ptr<float>(), t.data_ptr<float>() + t.numel());
    }
  }
  TORCH_CHECK(values.size() == (size_t(2) << bits) - 1, "tq: codebook of bits=", bits, " has the wrong size");
  std::lock_guard<std::mutex> lock(mutex);
  return cache.emplace(bits, std::move(values)).first->second;
}

// torch_tq.layout.hadamard_signs(head_dim), float32: what an op's absent `signs` means (one
// definition in the project, fetched once per head_dim, then cached).
std::vector<float> canonical_signs(int head_dim) {
  static std::mutex mutex;
  static std::map<int, std::vector<float>> cache;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(head_dim);
    if (it != cache.end()) return it->second;
  }
  std::vector<float> values;
  {
    // Never wait for the GIL while holding `mutex`.
    pybind11::gil_scoped_acquire gil;
    pybind11::module_ layout = pybind11::module_::import("torch_tq.layout");
    at::Tensor t = layout.attr("hadamard_signs")(head_dim).cast<at::Tensor>().to(at::kFloat).contiguous().cpu();
    values.assign(t.data_ptr<float>(), t.data_ptr<float>() + t.numel());
  }
  TORCH_CHECK(values.size() == static_cast<size_t>(head_dim), "tq: canonical signs of head_dim=", head_dim,
              " have the wrong size");
  std::lock_guard<std::mutex> lock(mutex);
  return cache.emplace(head_dim, std::move(values)).first->second;
}

void set_tensor(id<MTLComputeCommandEncoder> enc, const at::Tensor& t, NSUInteger index) {
  // Views share their base's MTLBuffer: the byte offset of the view is always passed.
  id<MTLBuffer> buffer = __builtin_bit_cast(id<MTLBuffer>, t.storage().data());
  [enc setBuffer:buffer offset:t.storage_offset() * t.element_size() atIndex:index];
}

// The generic encoder: every launch of `plan` (already checked ok), in order, on the current MPS
// stream's encoder.
void encode(const tq_plan::Plan& plan, const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& outputs) {
  if (plan.launches.empty()) return;
  std::vector<at::Tensor> scratch;
  for (uint64_t bytes : plan.scratch_bytes) {
    scratch.push_back(at::empty({static_cast<int64_t>(bytes / 4)}, inputs.at(0).options().dtype(at::kFloat)));
  }
  // {Arg::Codebook, i}: i = 0 the table of plan.codebook_bits, i = 1 that of plan.second_codebook_bits.
  // (std::array, not a C array: the encoding block below captures it by copy.)
  const std::array<std::vector<float>, 2> tables = {
      plan.codebook_bits > 0 ? codebook(plan.codebook_bits) : std::vector<float>(),
      plan.second_codebook_bits > 0 ? codebook(plan.second_codebook_bits) : std::vector<float>()};
  const std::vector<float> signs =
      plan.canonical_signs_dim > 0 ? canonical_signs(plan.canonical_signs_dim) : std::vector<float>();
  std::vector<id<MTLComputePipelineState>> pipelines;
  for (const auto& launch : plan.launches) {
    id<MTLComputePipelineState> pso = pipeline(launch.kernel);
    const NSUInteger threads = launch.threads[0] * launch.threads[1] * launch.threads[2];
    TORCH_CHECK(threads <= pso.maxTotalThreadsPerThreadgroup, "tq: ", launch.kernel, " requests ", threads,
                " threads per threadgroup, the pipeline allows ", pso.maxTotalThreadsPerThreadgroup);
    pipelines.push_back(pso);
  }
  static const uint8_t kDummy[16] = {};

  at::mps::MPSStream* stream = at::mps::getCurrentMPSStream();
  dispatch_sync_rethrowing(stream->queue(), ^() {
    @autoreleasepool {
      id<MTLComputeCommandEncoder> enc = stream->commandEncoder();
      for (size_t i = 0; i < plan.launches.size(); ++i) {
        const tq_plan::Launch& launch = plan.launches[i];
        [enc setComputePipelineState:pipelines[i]];
        for (NSUInteger n = 0; n < launch.bindings.size(); ++n) {
          const tq_plan::Binding& b = launch.bindings[n];
          switch (b.kind) {
            case Arg::Input: set_tensor(enc, inputs.at(b.index), n); break;
            case Arg::Output: set_tensor(enc, outputs.at(b.index), n); break;
            case Arg::Scratch: set_tensor(enc, scratch.at(b.index), n); break;
            case Arg::Params: [enc setBytes:launch.params.data() length:launch.params.size() atIndex:n]; break;
            case Arg::Codebook: {
              const std::vector<float>& table = tables.at(b.index);
              [enc setBytes:table.data() length:table.size() * sizeof(float) atIndex:n];
              break;
            }
            case Arg::CanonicalSigns:
              [enc setBytes:signs.data() length:signs.size() * sizeof(float) atIndex:n];
              break;
            case Arg::Dummy: [enc setBytes:kDummy length:sizeof kDummy atIndex:n]; break;
          }
        }
        [enc dispatchThreadgroups:MTLSizeMake(launch.grid[0], launch.grid[1], launch.grid[2])
            threadsPerThreadgroup:MTLSizeMake(launch.threads[0], launch.threads[1], launch.threads[2])];
      }
    }
  });
}

// ---- end of Metal encoding ----

void check_plan(const tq_plan::Plan& plan) { TORCH_CHECK_VALUE(plan.ok(), plan.error); }

// Runs a plan: raises its error, converts the inputs the plan asks for (plan.input_dtypes),
// allocates its outputs (plan.outputs) on `device`, encodes the launches, returns the outputs.
std::vector<at::Tensor> run(const tq_plan::Plan& plan, std::vector<at::Tensor> inputs, const at::Device& device) {
  check_plan(plan);
  for (size_t i = 0; i < plan.input_dtypes.size() && i < inputs.size(); ++i) {
    if (!plan.input_dtypes[i].empty() && inputs[i].defined())
      inputs[i] = inputs[i].to(scalar_type(plan.input_dtypes[i])).contiguous();
  }
  std::vector<at::Tensor> outputs;
  for (const tq_plan::OutputSpec& spec : plan.outputs)
    outputs.push_back(at::empty(spec.sizes, at::TensorOptions().device(device).dtype(scalar_type(spec.dtype))));
  if (!plan.launches.empty()) encode(plan, inputs, outputs);
  return outputs;
}

// An absent optional is bound as Arg::Dummy; keep the slot so input indices match the plan.
at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }
at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// cu_seqlens of the gated-delta ops: its values on the host (one device read, as FLA's
// prepare_chunk_indices does: the plans validate them and size data-dependent outputs) and the
// int32 device copy the kernels read.
std::vector<int64_t> host_values(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return {};
  const at::Tensor host = t->cpu().to(at::kLong).contiguous();
  return std::vector<int64_t>(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + host.numel());
}

at::Tensor as_int32(const std::optional<at::Tensor>& t) { return t.has_value() ? t->to(at::kInt).contiguous() : at::Tensor(); }

// ---- ops (schemas in torch_tq/_ops.py) ---------------------------------------------------

void hadamard_quantize_kv_mps(const at::Tensor& src, const at::Tensor& codes, const at::Tensor& norms,
                              int64_t write_pos, bool is_sliding, int64_t bits, const std::optional<at::Tensor>& signs,
                              const std::optional<at::Tensor>& offset, bool norm_correction,
                              const std::optional<at::Tensor>& sink, const std::optional<at::Tensor>& recent,
                              const std::optional<at::Tensor>& cache_seqlens) {
  const auto plan = tq_plan::plan_hadamard_quantize_kv(describe(src), describe(codes), describe(norms), write_pos,
                                                       is_sliding, bits, describe(signs), describe(offset),
                                                       norm_correction, describe(sink), describe(recent),
                                                       describe(cache_seqlens));
  run(plan, {src.contiguous(), codes, norms, or_undefined(signs), or_undefined(offset), or_undefined(sink),
             or_undefined(recent)},
      src.device());
}

at::Tensor dequantize_kv_mps(const at::Tensor& codes, const at::Tensor& norms, int64_t start, int64_t length,
                             int64_t bits, bool rotated, const std::optional<at::Tensor>& signs) {
  const auto plan =
      tq_plan::plan_dequantize_kv(describe(codes), describe(norms), start, length, bits, rotated, describe(signs));
  return run(plan, {codes, norms, or_undefined(signs)}, codes.device()).at(0);
}

at::Tensor flash_attn_vec_tq_mps(const at::Tensor& q, const at::Tensor& k_codes, const at::Tensor& k_norms,
                                 const at::Tensor& v_codes, const at::Tensor& v_norms, int64_t kv_len, double scale,
                                 int64_t bits, int64_t sliding_window, double softcap,
                                 const std::optional<at::Tensor>& kv_start, const std::optional<at::Tensor>& signs,
                                 const std::optional<at::Tensor>& lse, std::optional<int64_t> v_bits,
                                 const std::optional<at::Tensor>& k_sink, const std::optional<at::Tensor>& v_sink,
                                 const std::optional<at::Tensor>& k_recent, const std::optional<at::Tensor>& v_recent,
                                 const std::optional<at::Tensor>& cache_seqlens) {
  const auto plan = tq_plan::plan_flash_attn_vec_tq(describe(q), describe(k_codes), describe(k_norms),
                                                    describe(v_codes), describe(v_norms), kv_len, scale, bits,
                                                    sliding_window, softcap, describe(kv_start), describe(signs),
                                                    describe(lse), v_bits, describe(k_sink), describe(v_sink),
                                                    describe(k_recent), describe(v_recent), describe(cache_seqlens));
  return run(plan,
             {q.contiguous(), k_codes, k_norms, v_codes, v_norms, contiguous_or_undefined(kv_start), or_undefined(signs),
              or_undefined(lse), or_undefined(k_sink), or_undefined(v_sink), or_undefined(k_recent),
              or_undefined(v_recent)},
             q.device())
      .at(0);
}

void kv_cache_copy_mps(const at::Tensor& src, const at::Tensor& cache, int64_t write_pos, bool is_sliding) {
  const auto plan = tq_plan::plan_kv_cache_copy(describe(src), describe(cache), write_pos, is_sliding);
  run(plan, {src.contiguous(), cache}, src.device());
}

// The two entry ops share their arguments, inputs and outputs; only the plan differs.
template <typename PlanFn>
std::tuple<at::Tensor, at::Tensor> gated_delta_rule_entry(
    PlanFn make_plan, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
    const at::Tensor& beta, std::optional<double> scale, const std::optional<at::Tensor>& initial_state,
    bool output_final_state, bool use_qk_l2norm_in_kernel, const std::optional<at::Tensor>& cu_seqlens) {
  const std::vector<int64_t> offsets = host_values(cu_seqlens);
  const auto plan = make_plan(describe(q), describe(k), describe(v), describe(g), describe(beta), scale,
                              describe(initial_state), output_final_state, use_qk_l2norm_in_kernel,
                              describe(cu_seqlens), offsets);
  auto out = run(plan,
                 {q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(),
                  contiguous_or_undefined(initial_state), as_int32(cu_seqlens)},
                 q.device());
  return {out.at(0), out.at(1)};
}

std::tuple<at::Tensor, at::Tensor> fused_recurrent_gated_delta_rule_mps(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta,
    std::optional<double> scale, const std::optional<at::Tensor>& initial_state, bool output_final_state,
    bool use_qk_l2norm_in_kernel, const std::optional<at::Tensor>& cu_seqlens) {
  return gated_delta_rule_entry(tq_plan::plan_fused_recurrent_gated_delta_rule, q, k, v, g, beta, scale, initial_state,
                                output_final_state, use_qk_l2norm_in_kernel, cu_seqlens);
}

std::tuple<at::Tensor, at::Tensor> chunk_gated_delta_rule_mps(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta,
    std::optional<double> scale, const std::optional<at::Tensor>& initial_state, bool output_final_state,
    bool use_qk_l2norm_in_kernel, const std::optional<at::Tensor>& cu_seqlens) {
  return gated_delta_rule_entry(tq_plan::plan_chunk_gated_delta_rule, q, k, v, g, beta, scale, initial_state,
                                output_final_state, use_qk_l2norm_in_kernel, cu_seqlens);
}

at::Tensor chunk_local_cumsum_mps(const at::Tensor& g, int64_t chunk_size, bool reverse, std::optional<double> scale,
                                  const std::optional<at::Tensor>& cu_seqlens) {
  const std::vector<int64_t> offsets = host_values(cu_seqlens);
  const auto plan =
      tq_plan::plan_chunk_local_cumsum(describe(g), chunk_size, reverse, scale, describe(cu_seqlens), offsets);
  return run(plan, {g.contiguous(), as_int32(cu_seqlens)}, g.device()).at(0);
}

at::Tensor chunk_scaled_dot_kkt_mps(const at::Tensor& k, const at::Tensor& g, const at::Tensor& beta,
                                    const std::optional<at::Tensor>& cu_seqlens) {
  const std::vector<int64_t> offsets = host_values(cu_seqlens);
  const auto plan =
      tq_plan::plan_chunk_scaled_dot_kkt(describe(k), describe(g), describe(beta), describe(cu_seqlens), offsets);
  return run(plan, {k.contiguous(), g.contiguous(), beta.contiguous(), as_int32(cu_seqlens)}, k.device()).at(0);
}

at::Tensor solve_tril_mps(const at::Tensor& A, const std::optional<at::Tensor>& cu_seqlens) {
  const std::vector<int64_t> offsets = host_values(cu_seqlens);
  const auto plan = tq_plan::plan_solve_tril(describe(A), describe(cu_seqlens), offsets);
  return run(plan, {A.contiguous(), as_int32(cu_seqlens)}, A.device()).at(0);
}

std::tuple<at::Tensor, at::Tensor> recompute_w_u_mps(const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                                                     const at::Tensor& A, const at::Tensor& g,
                                                     const std::optional<at::Tensor>& cu_seqlens) {
  const std::vector<int64_t> offsets = host_values(cu_seqlens);
  const auto plan = tq_plan::plan_recompute_w_u(describe(k), describe(v), describe(beta), describe(A), describe(g),
                                                describe(cu_seqlens), offsets);
  auto out = run(plan,
                 {k.contiguous(), v.contiguous(), beta.contiguous(), A.contiguous(), g.contiguous(), as_int32(cu_seqlens)},
                 k.device());
  return {out.at(0), out.at(1)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_fwd_h_mps(const at::Tensor& k, const at::Tensor& w,
                                                               const at::Tensor& u, const at::Tensor& g,
                                                               const std::optional<at::Tensor>& initial_state,
                                                               const std::optional<at::Tensor>& cu_seqlens) {
  const std::vector<int64_t> offsets = host_values(cu_seqlens);
  const auto plan = tq_plan::plan_chunk_fwd_h(describe(k), describe(w), describe(u), describe(g), describe(initial_state),
                                              describe(cu_seqlens), offsets);
  auto out = run(plan,
                 {k.contiguous(), w.contiguous(), u.contiguous(), g.contiguous(), contiguous_or_undefined(initial_state),
                  as_int32(cu_seqlens)},
                 k.device());
  return {out.at(0), out.at(1), out.at(2)};
}

at::Tensor chunk_fwd_o_mps(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& h,
                           const at::Tensor& g, std::optional<double> scale,
                           const std::optional<at::Tensor>& cu_seqlens) {
  const std::vector<int64_t> offsets = host_values(cu_seqlens);
  const auto plan = tq_plan::plan_chunk_fwd_o(describe(q), describe(k), describe(v), describe(h), describe(g), scale,
                                              describe(cu_seqlens), offsets);
  return run(plan,
             {q.contiguous(), k.contiguous(), v.contiguous(), h.contiguous(), g.contiguous(), as_int32(cu_seqlens)},
             q.device())
      .at(0);
}

}  // namespace

TORCH_LIBRARY_IMPL(tq, MPS, m) {
  m.impl("hadamard_quantize_kv", &hadamard_quantize_kv_mps);
  m.impl("dequantize_kv", &dequantize_kv_mps);
  m.impl("flash_attn_vec_tq", &flash_attn_vec_tq_mps);
  m.impl("kv_cache_copy", &kv_cache_copy_mps);
  m.impl("fused_recurrent_gated_delta_rule", &fused_recurrent_gated_delta_rule_mps);
  m.impl("chunk_gated_delta_rule", &chunk_gated_delta_rule_mps);
  m.impl("chunk_local_cumsum", &chunk_local_cumsum_mps);
  m.impl("chunk_scaled_dot_kkt", &chunk_scaled_dot_kkt_mps);
  m.impl("solve_tril", &solve_tril_mps);
  m.impl("recompute_w_u", &recompute_w_u_mps);
  m.impl("chunk_fwd_h", &chunk_fwd_h_mps);
  m.impl("chunk_fwd_o", &chunk_fwd_o_mps);
}

// Importing torch_tq._C_mps registers the kernels above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("compile_metal_families", &compile_metal_families,
             "Compiles every Metal kernel family now; family -> '' or the compile error (torch_tq.backends.mps.warmup)");
}
