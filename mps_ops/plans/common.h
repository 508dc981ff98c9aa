// Launch-plan vocabulary shared by every op (plain C++17: no Metal, Objective-C or torch).
//
// A plan turns sizes, dtypes and flags into either an error (the exact text of
// torch_tq/_validation.py for the same bad input, so every entry point reports the same
// ValueError) or the list of kernel launches the host encodes in order: kernel host name,
// threadgroups per grid, threads per threadgroup, what to bind at each [[buffer(n)]], and the
// bytes of the Params struct. torch_tq_mps.mm and the simulator launcher both execute plans.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../kernels/params.h"

namespace tq_plan {

// Apple GPU limits (DESIGN §3).
constexpr uint32_t kMaxThreadsPerThreadgroup = 1024;
constexpr uint32_t kMaxThreadgroupMemory = 32 * 1024;
constexpr uint32_t kMaxSetBytes = 4 * 1024;
constexpr uint32_t kSimdWidth = 32;

constexpr int64_t kSupportedHeadDims[] = {64, 128, 256, 512};
constexpr int64_t kSupportedBits[] = {2, 3, 4, 5, 6, 8};
constexpr int64_t kMaxRotationBlock = 256;

// What the host binds at one [[buffer(n)]].
enum class Arg : int32_t {
  Input = 0,     // the op's tensor argument `index` (schema order, see each plan header)
  Output = 1,    // the op's freshly allocated output `index`
  Scratch = 2,   // scratch buffer `index` of Plan::scratch_bytes, allocated by the host
  Params = 3,    // Launch::params via setBytes
  Codebook = 4,  // float32 [2^b centroids, 2^b - 1 boundaries] via setBytes: index 0 of
                 // Plan::codebook_bits, index 1 of Plan::second_codebook_bits
  Dummy = 5,     // any valid buffer; the kernel never reads it (absent optional tensor)
  CanonicalSigns = 6,  // float32 [Plan::canonical_signs_dim] = torch_tq.layout.hadamard_signs(D) via
                       // setBytes: what an op's absent `signs` means
};

struct Binding {
  Arg kind;
  int32_t index;
};

struct Launch {
  std::string kernel;                  // Metal host name
  std::array<uint32_t, 3> grid{};      // threadgroups per grid
  std::array<uint32_t, 3> threads{};   // threads per threadgroup
  uint32_t threadgroup_memory = 0;     // bytes of static threadgroup arrays (checked <= 32 KB)
  std::vector<Binding> bindings;       // bindings[n] goes to [[buffer(n)]]
  std::vector<uint8_t> params;         // bytes of the Params struct
};

// A tensor the host allocates for the op, contiguous, on the op's device (Arg::Output index order).
struct OutputSpec {
  std::vector<int64_t> sizes;
  std::string dtype;  // torch name without "torch."
};

struct Plan {
  std::string error;                     // empty = ok; else the ValueError text
  std::vector<Launch> launches;          // encoded in order on one encoder
  std::vector<uint64_t> scratch_bytes;   // float32 scratch buffers the host allocates
  std::vector<OutputSpec> outputs;       // what the op returns, in schema order
  // Per Arg::Input index: the dtype the kernels read that input in ("" = as given). The host
  // converts (on device) before binding, so a kernel is instantiated for one dtype per argument.
  std::vector<std::string> input_dtypes;
  int32_t codebook_bits = 0;             // 0 = no codebook binding
  int32_t second_codebook_bits = 0;      // 0 = none; else {Arg::Codebook, 1} binds this width's table
  int32_t canonical_signs_dim = 0;       // 0 = none; else {Arg::CanonicalSigns, 0} binds hadamard_signs(D)
  bool ok() const { return error.empty(); }
  // A failed plan carries only its error.
  void finish(const std::string& check_error) {
    error = check_error;
    if (!ok()) {
      launches.clear();
      scratch_bytes.clear();
      outputs.clear();
      input_dtypes.clear();
    }
  }
};

// The binding of an op's `signs` (Arg::Input `input_index`): the tensor when given, else the
// canonical hadamard_signs(head_dim) (signs=None means those on every backend).
inline Binding signs_binding(bool signs_given, int32_t input_index, int64_t head_dim, Plan& plan) {
  if (signs_given) return {Arg::Input, input_index};
  plan.canonical_signs_dim = static_cast<int32_t>(head_dim);
  return {Arg::CanonicalSigns, 0};
}

// Sizes, dtype and layout of one tensor argument, as the host sees it.
struct TensorDesc {
  bool defined = false;       // false for an absent optional tensor
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  std::string dtype;          // torch name without "torch.": "float32", "uint8", "int64", ...
  std::string device;         // str(tensor.device): "mps:0", "cpu", ...
  bool contiguous = false;    // tensor.is_contiguous()
  int64_t dim() const { return static_cast<int64_t>(sizes.size()); }
};

// ---- formatting, Python style --------------------------------------------------------------

inline std::string str(int64_t v) { return std::to_string(v); }

// "[1, 2, 3]" like torch_tq._validation._shape.
inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + str(s[i]);
  return out + "]";
}

// Python tuple repr: "(1, 2)", "(5,)", "()".
inline std::string tuple_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + str(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

// repr(float) of CPython: the shortest round-tripping digits, fixed notation for exponents in
// [-4, 16), scientific ("1e+16", "1.5e-05") otherwise.
inline std::string py_float_repr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  for (int prec = 0; prec < 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*e", prec, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string s(buf);
  std::string sign;
  if (s[0] == '-') {
    sign = "-";
    s = s.substr(1);
  }
  const size_t e_pos = s.find('e');
  const int exp10 = std::atoi(s.c_str() + e_pos + 1);
  std::string digits;
  for (size_t i = 0; i < e_pos; ++i)
    if (s[i] != '.') digits += s[i];
  if (exp10 >= -4 && exp10 < 16) {
    std::string int_part, frac_part;
    if (exp10 >= 0) {
      while (static_cast<int>(digits.size()) < exp10 + 1) digits += '0';
      int_part = digits.substr(0, exp10 + 1);
      frac_part = digits.substr(exp10 + 1);
    } else {
      int_part = "0";
      frac_part = std::string(-exp10 - 1, '0') + digits;
    }
    if (frac_part.empty()) frac_part = "0";
    return sign + int_part + "." + frac_part;
  }
  std::string mant = digits.substr(0, 1);
  if (digits.size() > 1) mant += "." + digits.substr(1);
  char ebuf[16];
  std::snprintf(ebuf, sizeof ebuf, "e%c%02d", exp10 < 0 ? '-' : '+', std::abs(exp10));
  return sign + mant + ebuf;
}

inline std::string tuple_of(const int64_t* values, size_t n) {
  return tuple_str(std::vector<int64_t>(values, values + n));
}

template <size_t N>
inline bool one_of(int64_t v, const int64_t (&values)[N]) {
  for (int64_t x : values)
    if (x == v) return true;
  return false;
}

// ---- the checks of torch_tq/_validation.py, same order and same text ------------------------
// Each returns an empty string when the check passes.

class Checker {
 public:
  explicit Checker(const char* op) : op_(op) {}
  const std::string& error() const { return error_; }
  bool failed() const { return !error_.empty(); }

  bool fail(const std::string& message) {
    if (error_.empty()) error_ = "tq." + op_ + ": " + message;
    return false;
  }

  bool rank(const char* name, const TensorDesc& t, int64_t r, const char* letters) {
    if (t.dim() != r)
      return fail(std::string(name) + " must have rank " + str(r) + " " + letters + ", got shape " + shape_str(t.sizes));
    return true;
  }

  bool floating(const char* name, const TensorDesc& t) {
    if (t.dtype != "float32" && t.dtype != "float16" && t.dtype != "bfloat16")
      return fail(std::string(name) + " must be float32, float16 or bfloat16, got torch." + t.dtype);
    return true;
  }

  bool bits(int64_t bits) {
    if (!one_of(bits, kSupportedBits))
      return fail("bits must be one of " + tuple_of(kSupportedBits, 6) + ", got " + str(bits));
    return true;
  }

  bool head_dim(int64_t d) {
    if (!one_of(d, kSupportedHeadDims))
      return fail("head_dim must be one of " + tuple_of(kSupportedHeadDims, 4) + ", got " + str(d));
    return true;
  }

  // names/tensors in the order of the Python dict; absent optionals are skipped.
  bool same_device(std::initializer_list<std::pair<const char*, const TensorDesc*>> tensors) {
    const auto& first = *tensors.begin();
    for (const auto& nt : tensors) {
      if (nt.second->defined && nt.second->device != first.second->device)
        return fail(std::string(nt.first) + " is on " + nt.second->device + " but " + first.first + " is on " +
                    first.second->device + "; all tensors must be on one device");
    }
    return true;
  }

  bool contiguous(const std::string& name, const TensorDesc& t) {
    if (!t.contiguous)
      return fail(name + " must be contiguous (cache tensors are written in place), got strides " + tuple_str(t.strides));
    return true;
  }

  // _check_packed_cache: returns false on failure; fills B, Hkv, C.
  bool packed_cache(const std::string& prefix, const TensorDesc& codes, const TensorDesc& norms, int64_t head_dim,
                    int64_t bits, int64_t* B, int64_t* Hkv, int64_t* C) {
    if (!rank((prefix + "codes").c_str(), codes, 4, "[B, Hkv, C, D*bits/8]")) return false;
    if (!rank((prefix + "norms").c_str(), norms, 4, "[B, Hkv, C, D/R]")) return false;
    if (codes.dtype != "uint8") return fail(prefix + "codes must be uint8, got torch." + codes.dtype);
    if (norms.dtype != "float32") return fail(prefix + "norms must be float32, got torch." + norms.dtype);
    if (codes.sizes[3] != head_dim * bits / 8) return fail(row_bytes_message(prefix, codes.sizes[3], head_dim, bits));
    const int64_t expected_blocks = head_dim / std::min<int64_t>(head_dim, kMaxRotationBlock);
    if (norms.sizes[3] != expected_blocks)
      return fail(prefix + "norms last dim must be D/R = " + str(expected_blocks) + " for head_dim=" + str(head_dim) +
                  ", got " + str(norms.sizes[3]));
    for (int i = 0; i < 3; ++i) {
      if (norms.sizes[i] != codes.sizes[i])
        return fail(prefix + "norms shape " + shape_str(norms.sizes) + " does not match " + prefix + "codes shape " +
                    shape_str(codes.sizes) + " in [B, Hkv, C]");
    }
    if (codes.sizes[2] < 1) return fail(prefix + "codes capacity C must be >= 1, got " + str(codes.sizes[2]));
    if (!contiguous(prefix + "codes", codes)) return false;
    if (!contiguous(prefix + "norms", norms)) return false;
    *B = codes.sizes[0];
    *Hkv = codes.sizes[1];
    *C = codes.sizes[2];
    return true;
  }

  // _row_bytes_message: names the (head_dim, bits) the codes were made for when one of the two differs.
  std::string row_bytes_message(const std::string& prefix, int64_t got, int64_t head_dim, int64_t bits) const {
    const std::string source = op_ == "flash_attn_vec_tq" ? "q" : "src";
    std::string message = prefix + "codes last dim " + str(got) + " does not fit " + source + "'s head_dim=" +
                          str(head_dim) + " at bits=" + str(bits) + " (needs D*bits/8 = " + str(head_dim * bits / 8) + ")";
    std::vector<std::string> readings;
    if (got * 8 % bits == 0 && one_of(got * 8 / bits, kSupportedHeadDims))
      readings.push_back("head_dim=" + str(got * 8 / bits) + " at bits=" + str(bits));
    if (got * 8 % head_dim == 0 && one_of(got * 8 / head_dim, kSupportedBits))
      readings.push_back("head_dim=" + str(head_dim) + " at bits=" + str(got * 8 / head_dim));
    for (size_t i = 0; i < readings.size(); ++i) message += (i == 0 ? "; it is a cache of " : " or ") + readings[i];
    return message;
  }

  // _fail_if_src_transposed: src given as [B, Hkv, T, D] (the cache's own layout) reads as the wrong heads.
  bool src_not_transposed(const TensorDesc& src, const char* cache_name, int64_t cache_batch, int64_t cache_heads) {
    if (src.sizes[0] == cache_batch && src.sizes[1] == cache_heads)
      return fail("src must be [B, T, Hkv, D] with [B, Hkv] = [" + str(cache_batch) + ", " + str(cache_heads) +
                  "] like " + cache_name + ", got shape " + shape_str(src.sizes) + "; did you pass [B, Hkv, T, D]?");
    return true;
  }

  bool signs(const TensorDesc& s, int64_t head_dim) {
    if (!s.defined) return true;
    if (s.dim() != 1 || s.sizes[0] != head_dim)
      return fail("signs must have shape [D] = [" + str(head_dim) + "], got " + shape_str(s.sizes));
    if (s.dtype != "float32") return fail("signs must be float32, got torch." + s.dtype);
    return contiguous("signs", s);
  }

  bool write(int64_t write_pos, int64_t tokens, int64_t capacity, bool is_sliding) {
    if (write_pos < 0) return fail("write_pos must be >= 0, got " + str(write_pos));
    if (!is_sliding && write_pos + tokens > capacity)
      return fail("write of T=" + str(tokens) + " tokens at write_pos=" + str(write_pos) +
                  " overflows the global cache capacity C=" + str(capacity) +
                  " (needs write_pos + T <= C; use is_sliding=True for a ring buffer)");
    return true;
  }

  // _check_full_precision: one full-precision window buffer [B, Hkv, N, D] with min_len <= N <= C.
  bool full_precision(const std::string& name, const TensorDesc& t, int64_t batch, int64_t kv_heads, int64_t head_dim,
                      int64_t capacity, int64_t min_len) {
    if (!rank(name.c_str(), t, 4, "[B, Hkv, N, D]")) return false;
    if (!floating(name.c_str(), t)) return false;
    if (t.sizes[0] != batch || t.sizes[1] != kv_heads || t.sizes[3] != head_dim)
      return fail(name + " must have [B, Hkv, *, D] = [" + str(batch) + ", " + str(kv_heads) + ", *, " +
                  str(head_dim) + "], got " + shape_str(t.sizes));
    if (t.sizes[2] < min_len || t.sizes[2] > capacity)
      return fail(name + " must hold between " + str(min_len) + " and C=" + str(capacity) + " positions, got " +
                  str(t.sizes[2]));
    return contiguous(name, t);
  }

  // _check_window_pair: k_<prefix> and v_<prefix>, both or neither, same shape.
  bool window_pair(const std::string& prefix, const TensorDesc& k, const TensorDesc& v, int64_t batch,
                   int64_t kv_heads, int64_t head_dim, int64_t capacity, int64_t min_len) {
    if (k.defined != v.defined)
      return fail("k_" + prefix + " and v_" + prefix + " must be given together, got only " + (v.defined ? "v_" : "k_") +
                  prefix);
    if (!k.defined) return true;
    if (!full_precision("k_" + prefix, k, batch, kv_heads, head_dim, capacity, min_len)) return false;
    if (!full_precision("v_" + prefix, v, batch, kv_heads, head_dim, capacity, min_len)) return false;
    if (v.sizes != k.sizes)
      return fail("v_" + prefix + " shape " + shape_str(v.sizes) + " must equal k_" + prefix + " shape " +
                  shape_str(k.sizes));
    return true;
  }

  // Platform limits of the Metal kernels (32-bit indexing of grids and positions).
  bool fits_u32(const char* what, uint64_t value) {
    if (value > 0xffffffffull)
      return fail(std::string(what) + " = " + std::to_string(value) + " exceeds the Metal kernels' 32-bit index range");
    return true;
  }

 private:
  std::string op_;
  std::string error_;
};

// ---- building launches ---------------------------------------------------------------------

template <typename P>
inline std::vector<uint8_t> params_bytes(const P& p) {
  static_assert(std::is_trivially_copyable<P>::value, "params must be POD");
  static_assert(sizeof(P) <= kMaxSetBytes, "setBytes is limited to 4 KB");
  std::vector<uint8_t> out(sizeof(P));
  std::memcpy(out.data(), &p, sizeof(P));
  return out;
}

inline uint32_t ceil_div(uint64_t a, uint64_t b) { return static_cast<uint32_t>((a + b - 1) / b); }

inline int64_t rotation_block(int64_t head_dim) { return std::min<int64_t>(head_dim, kMaxRotationBlock); }

// Ring write geometry of layout.ring_write_slots: (first src token kept, slot of that token).
inline void ring_write(int64_t tokens, int64_t write_pos, int64_t capacity, bool is_sliding, int64_t* first,
                       int64_t* first_slot) {
  *first = is_sliding ? std::max<int64_t>(0, tokens - capacity) : 0;
  *first_slot = (write_pos + *first) % capacity;
}

// TQ_WINDOW_* code of a full-precision window buffer's dtype (validated float32/float16/bfloat16).
inline tq_uint window_dtype(const TensorDesc& t) {
  if (t.dtype == "float16") return TQ_WINDOW_FLOAT16;
  if (t.dtype == "bfloat16") return TQ_WINDOW_BFLOAT16;
  return TQ_WINDOW_FLOAT32;
}

// Final Apple-limit checks of a launch (DESIGN §3); an internal error if a plan violates them.
inline bool check_launch(Checker& check, const Launch& l) {
  const uint64_t threads = uint64_t(l.threads[0]) * l.threads[1] * l.threads[2];
  if (threads > kMaxThreadsPerThreadgroup || threads % kSimdWidth != 0)
    return check.fail("internal: " + l.kernel + " requests " + std::to_string(threads) + " threads per threadgroup");
  if (l.threadgroup_memory > kMaxThreadgroupMemory)
    return check.fail("internal: " + l.kernel + " needs " + std::to_string(l.threadgroup_memory) +
                      " bytes of threadgroup memory (limit 32 KB)");
  if (l.params.size() > kMaxSetBytes) return check.fail("internal: " + l.kernel + " params exceed setBytes' 4 KB");
  return true;
}

}  // namespace tq_plan
