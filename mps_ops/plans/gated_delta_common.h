// Validation of the gated-delta-rule ops for the launch plans: the rules of
// torch_tq/_gated_delta_validation.py, in the same order and with the same texts, so a bad input
// raises the same ValueError on every backend. Each check_<op> fills a GdrGeometry and returns
// false (with Checker::error() set) on the first failed rule.
//
// Differences from Python, by design: float64 is accepted on CPU only (the Metal kernels have no
// float64), and cu_seqlens values arrive as a host copy (the .mm reads them once; the plans need
// them to validate and to size data-dependent outputs such as h [B, NT, HV, K, V]).
#pragma once

#include <optional>

#include "common.h"

namespace tq_plan {

constexpr int64_t kGdrHeadDims[] = {64, 128, 256};
constexpr int64_t kGdrChunk = TQ_GDR_CHUNK;

struct GdrGeometry {
  int64_t batch = 0, tokens = 0, heads = 0, value_heads = 0, head_dim = 0, value_dim = 0, sequences = 0;
};

// Chunks of each sequence (ceil(length / 64)) and their total NT, from B and T or the cu_seqlens values.
struct GdrChunks {
  std::vector<int64_t> per_sequence;
  int64_t total = 0;
};

inline GdrChunks gdr_chunks(int64_t B, int64_t T, const std::vector<int64_t>& cu_seqlens_values) {
  GdrChunks c;
  if (cu_seqlens_values.empty()) {
    c.per_sequence.assign(static_cast<size_t>(B), (T + kGdrChunk - 1) / kGdrChunk);
  } else {
    for (size_t n = 0; n + 1 < cu_seqlens_values.size(); ++n)
      c.per_sequence.push_back((cu_seqlens_values[n + 1] - cu_seqlens_values[n] + kGdrChunk - 1) / kGdrChunk);
  }
  for (int64_t n : c.per_sequence) c.total += n;
  return c;
}

class GdrChecker : public Checker {
 public:
  explicit GdrChecker(const char* op) : Checker(op) {}

  bool floating(const char* name, const TensorDesc& t) {
    if (t.dtype == "float64")
      return fail(std::string(name) + " must be float32, float16 or bfloat16 on this device (float64 is CPU only), got torch.float64");
    if (t.dtype != "float32" && t.dtype != "float16" && t.dtype != "bfloat16")
      return fail(std::string(name) + " must be float32, float16, bfloat16 or float64, got torch." + t.dtype);
    return true;
  }

  bool expect_shape(const char* name, const TensorDesc& t, const std::vector<int64_t>& shape, const char* letters) {
    if (t.sizes != shape)
      return fail(std::string(name) + " must have shape " + letters + " = " + shape_str(shape) + ", got " +
                  shape_str(t.sizes));
    return true;
  }

  bool dims(int64_t K, int64_t V = -1) {
    if (!one_of(K, kGdrHeadDims)) return fail("head dim K must be one of " + tuple_of(kGdrHeadDims, 3) + ", got " + str(K));
    if (V >= 0 && !one_of(V, kGdrHeadDims))
      return fail("value head dim V must be one of " + tuple_of(kGdrHeadDims, 3) + ", got " + str(V));
    return true;
  }

  bool heads(int64_t H, int64_t HV) {
    if (H < 1 || HV % H != 0)
      return fail("value heads HV=" + str(HV) + " must be a multiple of query/key heads H=" + str(H));
    return true;
  }

  // Shape and dtype of cu_seqlens; *N = number of sequences (B without it).
  bool cu_seqlens(const TensorDesc& cu, int64_t B, int64_t* N) {
    if (!cu.defined) {
      *N = B;
      return true;
    }
    if (cu.dim() != 1 || cu.sizes[0] < 2)
      return fail("cu_seqlens must have shape [N+1] with N >= 1, got shape " + shape_str(cu.sizes));
    if (cu.dtype != "int32" && cu.dtype != "int64") return fail("cu_seqlens must be int32 or int64, got torch." + cu.dtype);
    if (B != 1) return fail("cu_seqlens requires batch size B=1 (flatten the sequences into one), got B=" + str(B));
    *N = cu.sizes[0] - 1;
    return true;
  }

  // The value rules (check_cu_seqlens_values); `values` is empty when cu_seqlens is absent.
  bool cu_seqlens_values(const std::vector<int64_t>& values, int64_t T) {
    if (values.empty()) return true;
    if (values.front() != 0) return fail("cu_seqlens must start at 0, got " + str(values.front()));
    for (size_t i = 1; i < values.size(); ++i)
      if (values[i] < values[i - 1]) return fail("cu_seqlens must be non-decreasing, got " + shape_str(values));
    if (values.back() != T) return fail("cu_seqlens must end at T=" + str(T) + ", got " + str(values.back()));
    return true;
  }

  // Optional state [N, HV, K, V], float32 (the state is carried in float32 on this device).
  bool state(const char* name, const TensorDesc& s, const std::vector<int64_t>& shape) {
    if (!s.defined) return true;
    if (!rank(name, s, 4, "[N, HV, K, V]")) return false;
    if (!expect_shape(name, s, shape, "[N, HV, K, V]")) return false;
    if (s.dtype != "float32")
      return fail(std::string(name) + " must be float32 (the state is carried in float32), got torch." + s.dtype);
    return true;
  }

  bool gate(const char* name, const TensorDesc& t, int64_t B, int64_t T, int64_t HV) {
    if (!rank(name, t, 3, "[B, T, HV]")) return false;
    if (!floating(name, t)) return false;
    return expect_shape(name, t, {B, T, HV}, "[B, T, HV]");
  }

  bool scale(const char* name_rule, const std::optional<double>& s) {
    if (s.has_value() && !std::isfinite(*s))
      return fail(std::string("scale must be finite") + name_rule + ", got " + py_float_repr(*s));
    return true;
  }

  // A key tensor [B, T, H, K]; fills B, T, H, K.
  bool keys(const char* name, const TensorDesc& k, int64_t* B, int64_t* T, int64_t* H, int64_t* K) {
    if (!rank(name, k, 4, "[B, T, H, K]")) return false;
    if (!floating(name, k)) return false;
    *B = k.sizes[0], *T = k.sizes[1], *H = k.sizes[2], *K = k.sizes[3];
    return dims(*K);
  }

  // A value-head tensor [B, T, HV] or [B, T, HV, X]; fills HV.
  bool value_heads(const char* name, const TensorDesc& t, int64_t B, int64_t T, int64_t rank_, const char* letters,
                   int64_t* HV) {
    if (!rank(name, t, rank_, letters)) return false;
    if (!floating(name, t)) return false;
    if (t.sizes[0] != B || t.sizes[1] != T)
      return fail(std::string(name) + " must have [B, T] = [" + str(B) + ", " + str(T) + "] to match k, got shape " +
                  shape_str(t.sizes));
    *HV = t.sizes[2];
    return true;
  }

  bool chunk_matrix(const char* name, const TensorDesc& A, int64_t B, int64_t T, int64_t HV) {
    if (!rank(name, A, 4, "[B, T, HV, BT]")) return false;
    if (!floating(name, A)) return false;
    return expect_shape(name, A, {B, T, HV, kGdrChunk}, "[B, T, HV, BT]");
  }
};

// ---- one check per op, as in _gated_delta_validation.py --------------------------------------

// check_gated_delta_rule (both entry ops), then the cu_seqlens value rules.
inline bool check_gated_delta_rule(GdrChecker& c, const TensorDesc& q, const TensorDesc& k, const TensorDesc& v,
                                   const TensorDesc& g, const TensorDesc& beta, const std::optional<double>& scale,
                                   const TensorDesc& initial_state, const TensorDesc& cu_seqlens,
                                   const std::vector<int64_t>& cu_seqlens_values, GdrGeometry* geo) {
  if (!c.rank("q", q, 4, "[B, T, H, K]") || !c.rank("k", k, 4, "[B, T, H, K]") || !c.rank("v", v, 4, "[B, T, HV, V]"))
    return false;
  if (!c.floating("q", q) || !c.floating("k", k) || !c.floating("v", v)) return false;
  if (!(q.dtype == k.dtype && k.dtype == v.dtype))
    return c.fail("q, k and v must share one dtype, got q torch." + q.dtype + ", k torch." + k.dtype + ", v torch." +
                  v.dtype);
  const int64_t B = q.sizes[0], T = q.sizes[1], H = q.sizes[2], K = q.sizes[3];
  if (!c.expect_shape("k", k, q.sizes, "[B, T, H, K] (the shape of q)")) return false;
  if (v.sizes[0] != B || v.sizes[1] != T)
    return c.fail("v must have [B, T] = [" + str(B) + ", " + str(T) + "] to match q, got shape " + shape_str(v.sizes));
  const int64_t HV = v.sizes[2], V = v.sizes[3];
  if (T < 1) return c.fail("q must hold T >= 1 tokens, got T=" + str(T));
  if (!c.dims(K, V) || !c.heads(H, HV)) return false;
  if (!c.gate("g", g, B, T, HV) || !c.gate("beta", beta, B, T, HV)) return false;
  if (!c.same_device({{"q", &q}, {"k", &k}, {"v", &v}, {"g", &g}, {"beta", &beta}, {"initial_state", &initial_state},
                      {"cu_seqlens", &cu_seqlens}}))
    return false;
  if (!c.scale(" (None means K^-0.5)", scale)) return false;
  int64_t N = 0;
  if (!c.cu_seqlens(cu_seqlens, B, &N)) return false;
  if (!c.state("initial_state", initial_state, {N, HV, K, V})) return false;
  if (!c.cu_seqlens_values(cu_seqlens_values, T)) return false;
  *geo = GdrGeometry{B, T, H, HV, K, V, N};
  return true;
}

inline bool check_chunk_local_cumsum(GdrChecker& c, const TensorDesc& g, int64_t chunk_size,
                                     const std::optional<double>& scale, const TensorDesc& cu_seqlens,
                                     const std::vector<int64_t>& cu_seqlens_values, GdrGeometry* geo) {
  if (!c.rank("g", g, 3, "[B, T, HV]") || !c.floating("g", g)) return false;
  if (chunk_size < 1 || (chunk_size & (chunk_size - 1)))
    return c.fail("chunk_size must be a power of two, got " + str(chunk_size));
  if (!c.scale("", scale)) return false;
  if (!c.same_device({{"g", &g}, {"cu_seqlens", &cu_seqlens}})) return false;
  const int64_t B = g.sizes[0], T = g.sizes[1], HV = g.sizes[2];
  int64_t N = 0;
  if (!c.cu_seqlens(cu_seqlens, B, &N) || !c.cu_seqlens_values(cu_seqlens_values, T)) return false;
  *geo = GdrGeometry{B, T, 0, HV, 0, 0, N};
  return true;
}

inline bool check_chunk_scaled_dot_kkt(GdrChecker& c, const TensorDesc& k, const TensorDesc& g, const TensorDesc& beta,
                                       const TensorDesc& cu_seqlens, const std::vector<int64_t>& cu_seqlens_values,
                                       GdrGeometry* geo) {
  int64_t B, T, H, K, HV, N;
  if (!c.keys("k", k, &B, &T, &H, &K)) return false;
  if (!c.value_heads("beta", beta, B, T, 3, "[B, T, HV]", &HV)) return false;
  if (!c.heads(H, HV) || !c.gate("g", g, B, T, HV)) return false;
  if (!c.same_device({{"k", &k}, {"g", &g}, {"beta", &beta}, {"cu_seqlens", &cu_seqlens}})) return false;
  if (!c.cu_seqlens(cu_seqlens, B, &N) || !c.cu_seqlens_values(cu_seqlens_values, T)) return false;
  *geo = GdrGeometry{B, T, H, HV, K, 0, N};
  return true;
}

inline bool check_solve_tril(GdrChecker& c, const TensorDesc& A, const TensorDesc& cu_seqlens,
                             const std::vector<int64_t>& cu_seqlens_values, GdrGeometry* geo) {
  if (!c.rank("A", A, 4, "[B, T, HV, BT]") || !c.floating("A", A)) return false;
  const int64_t B = A.sizes[0], T = A.sizes[1], HV = A.sizes[2], BT = A.sizes[3];
  if (BT != kGdrChunk) return c.fail("A last dim must be the chunk size BT=" + str(kGdrChunk) + ", got " + str(BT));
  if (!c.same_device({{"A", &A}, {"cu_seqlens", &cu_seqlens}})) return false;
  int64_t N = 0;
  if (!c.cu_seqlens(cu_seqlens, B, &N) || !c.cu_seqlens_values(cu_seqlens_values, T)) return false;
  *geo = GdrGeometry{B, T, 0, HV, 0, 0, N};
  return true;
}

inline bool check_recompute_w_u(GdrChecker& c, const TensorDesc& k, const TensorDesc& v, const TensorDesc& beta,
                                const TensorDesc& A, const TensorDesc& g, const TensorDesc& cu_seqlens,
                                const std::vector<int64_t>& cu_seqlens_values, GdrGeometry* geo) {
  int64_t B, T, H, K, HV, N;
  if (!c.keys("k", k, &B, &T, &H, &K)) return false;
  if (!c.value_heads("v", v, B, T, 4, "[B, T, HV, V]", &HV)) return false;
  const int64_t V = v.sizes[3];
  if (!c.dims(K, V) || !c.heads(H, HV)) return false;
  if (!c.gate("beta", beta, B, T, HV) || !c.chunk_matrix("A", A, B, T, HV) || !c.gate("g", g, B, T, HV)) return false;
  if (!c.same_device({{"k", &k}, {"v", &v}, {"beta", &beta}, {"A", &A}, {"g", &g}, {"cu_seqlens", &cu_seqlens}}))
    return false;
  if (!c.cu_seqlens(cu_seqlens, B, &N) || !c.cu_seqlens_values(cu_seqlens_values, T)) return false;
  *geo = GdrGeometry{B, T, H, HV, K, V, N};
  return true;
}

inline bool check_chunk_fwd_h(GdrChecker& c, const TensorDesc& k, const TensorDesc& w, const TensorDesc& u,
                              const TensorDesc& g, const TensorDesc& initial_state, const TensorDesc& cu_seqlens,
                              const std::vector<int64_t>& cu_seqlens_values, GdrGeometry* geo) {
  int64_t B, T, H, K, HV, N;
  if (!c.keys("k", k, &B, &T, &H, &K)) return false;
  if (!c.value_heads("u", u, B, T, 4, "[B, T, HV, V]", &HV)) return false;
  const int64_t V = u.sizes[3];
  if (!c.dims(K, V) || !c.heads(H, HV)) return false;
  if (!c.rank("w", w, 4, "[B, T, HV, K]") || !c.floating("w", w) || !c.expect_shape("w", w, {B, T, HV, K}, "[B, T, HV, K]"))
    return false;
  if (!c.gate("g", g, B, T, HV)) return false;
  if (!c.same_device({{"k", &k}, {"w", &w}, {"u", &u}, {"g", &g}, {"initial_state", &initial_state},
                      {"cu_seqlens", &cu_seqlens}}))
    return false;
  if (!c.cu_seqlens(cu_seqlens, B, &N)) return false;
  if (!c.state("initial_state", initial_state, {N, HV, K, V})) return false;
  if (!c.cu_seqlens_values(cu_seqlens_values, T)) return false;
  *geo = GdrGeometry{B, T, H, HV, K, V, N};
  return true;
}

inline bool check_chunk_fwd_o(GdrChecker& c, const TensorDesc& q, const TensorDesc& k, const TensorDesc& v,
                              const TensorDesc& h, const TensorDesc& g, const std::optional<double>& scale,
                              const TensorDesc& cu_seqlens, const std::vector<int64_t>& cu_seqlens_values,
                              GdrGeometry* geo) {
  int64_t B, T, H, K, HV, N;
  if (!c.keys("q", q, &B, &T, &H, &K)) return false;
  if (!c.rank("k", k, 4, "[B, T, H, K]") || !c.floating("k", k) ||
      !c.expect_shape("k", k, q.sizes, "[B, T, H, K] (the shape of q)"))
    return false;
  if (!c.value_heads("v", v, B, T, 4, "[B, T, HV, V]", &HV)) return false;
  const int64_t V = v.sizes[3];
  if (!c.dims(K, V) || !c.heads(H, HV)) return false;
  if (!c.rank("h", h, 5, "[B, NT, HV, K, V]") || !c.floating("h", h)) return false;
  if (h.sizes[0] != B || h.sizes[2] != HV || h.sizes[3] != K || h.sizes[4] != V)
    return c.fail("h must have shape [B, NT, HV, K, V] = [" + str(B) + ", NT, " + str(HV) + ", " + str(K) + ", " +
                  str(V) + "], got " + shape_str(h.sizes));
  const int64_t per_row = (T + kGdrChunk - 1) / kGdrChunk;
  if (!cu_seqlens.defined && h.sizes[1] != per_row)
    return c.fail("h must hold NT = ceil(T/BT) = " + str(per_row) + " chunk states, got " + str(h.sizes[1]));
  if (!c.gate("g", g, B, T, HV) || !c.scale(" (None means K^-0.5)", scale)) return false;
  if (!c.same_device({{"q", &q}, {"k", &k}, {"v", &v}, {"h", &h}, {"g", &g}, {"cu_seqlens", &cu_seqlens}})) return false;
  if (!c.cu_seqlens(cu_seqlens, B, &N) || !c.cu_seqlens_values(cu_seqlens_values, T)) return false;
  if (cu_seqlens.defined) {
    const int64_t NT = gdr_chunks(B, T, cu_seqlens_values).total;
    if (h.sizes[1] != NT)
      return c.fail("h must hold NT = " + str(NT) + " chunk states (ceil(length/BT) per sequence of cu_seqlens), got " +
                    str(h.sizes[1]));
  }
  *geo = GdrGeometry{B, T, H, HV, K, V, N};
  return true;
}

}  // namespace tq_plan
