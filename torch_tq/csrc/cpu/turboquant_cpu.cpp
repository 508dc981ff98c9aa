// Native CPU kernels of the TurboQuant ops (DESIGN §5, §8): hadamard_quantize_kv, dequantize_kv,
// flash_attn_vec_tq and kv_cache_copy.
//
// Built just in time by torch_tq/backends/cpu_native.py and registered in the private namespace
// torch.ops.tq_cpu; the CPU implementations of torch.ops.tq (Python) validate the arguments with
// torch_tq/_validation.py, resolve the signs and the codebooks, and call these. Nothing here checks
// arguments again beyond internal invariants: the shapes, dtypes and contiguity are guaranteed.
//
// Numerics: the rotation, quantization and decoding follow the pure-PyTorch reference operation
// by operation (same butterfly order, same float32 roundings; the build uses -ffp-contract=off), so
// dequantize_kv matches it bit for bit and codes differ only at near-ties of the block norm's
// rounding. Attention accumulates in float32 with a different summation order than the reference.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TQ_AVX2 1
#endif

namespace tq_cpu {
namespace {

constexpr int kMaxBlock = 256;      // rotation block R = min(D, 256)
constexpr int kMaxHeadDim = 512;
constexpr int kTile = 64;           // positions scored before their values are accumulated
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int rotation_block(int D) { return D < kMaxBlock ? D : kMaxBlock; }

// 1/sqrt(R) and sqrt(R) as the reference's float32-tensor-times-Python-float ops round them.
inline float inv_sqrt_block(int R) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(R))); }
inline float sqrt_block(int R) { return static_cast<float>(std::sqrt(static_cast<double>(R))); }

// ---- element conversions -------------------------------------------------------------------------

enum class Dt { F32, F16, BF16 };

Dt dt_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dt::F32;
    case at::kHalf: return Dt::F16;
    case at::kBFloat16: return Dt::BF16;
    default: TORCH_CHECK(false, "tq_cpu: unexpected dtype ", t.scalar_type());
  }
}

// Reads n elements (stride in elements) of dtype dt into float32.
inline void load_row(const void* p, Dt dt, int64_t stride, int n, float* out) {
  switch (dt) {
    case Dt::F32: {
      const float* s = static_cast<const float*>(p);
      if (stride == 1) {
        std::memcpy(out, s, sizeof(float) * n);
      } else {
        for (int i = 0; i < n; ++i) out[i] = s[i * stride];
      }
      break;
    }
    case Dt::F16: {
      const c10::Half* s = static_cast<const c10::Half*>(p);
      for (int i = 0; i < n; ++i) out[i] = static_cast<float>(s[i * stride]);
      break;
    }
    case Dt::BF16: {
      const c10::BFloat16* s = static_cast<const c10::BFloat16*>(p);
      for (int i = 0; i < n; ++i) out[i] = static_cast<float>(s[i * stride]);
      break;
    }
  }
}

// Writes n contiguous float32 values as dtype dt (round to nearest even, as Tensor.to does).
inline void store_row(const float* x, Dt dt, int n, void* p) {
  switch (dt) {
    case Dt::F32: std::memcpy(p, x, sizeof(float) * n); break;
    case Dt::F16: {
      c10::Half* d = static_cast<c10::Half*>(p);
      for (int i = 0; i < n; ++i) d[i] = c10::Half(x[i]);
      break;
    }
    case Dt::BF16: {
      c10::BFloat16* d = static_cast<c10::BFloat16*>(p);
      for (int i = 0; i < n; ++i) d[i] = c10::BFloat16(x[i]);
      break;
    }
  }
}

inline size_t dt_size(Dt dt) { return dt == Dt::F32 ? 4 : 2; }

// ---- Walsh-Hadamard rotation -----------------------------------------------------------------------

// Unnormalised Sylvester WHT of n values in place, the reference's butterfly order (torch_tq fwht).
inline void fwht(float* x, int n) {
  for (int h = 1; h < n; h *= 2) {
    for (int i = 0; i < n; i += 2 * h) {
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
    }
  }
}

// y = H_R (s ⊙ x) / sqrt(R) per block, in place (torch_tq rotate).
inline void rotate(float* x, const float* signs, int D) {
  const int R = rotation_block(D);
  const float inv = inv_sqrt_block(R);
  for (int i = 0; i < D; ++i) x[i] *= signs[i];
  for (int b = 0; b < D; b += R) fwht(x + b, R);
  for (int i = 0; i < D; ++i) x[i] *= inv;
}

// x = s ⊙ H_R y / sqrt(R) per block, in place (torch_tq unrotate).
inline void unrotate(float* y, const float* signs, int D) {
  const int R = rotation_block(D);
  const float inv = inv_sqrt_block(R);
  for (int b = 0; b < D; b += R) fwht(y + b, R);
  for (int i = 0; i < D; ++i) y[i] *= inv;
  for (int i = 0; i < D; ++i) y[i] *= signs[i];
}

// ---- bit packing -----------------------------------------------------------------------------------

// Every 8 consecutive codes fill exactly `bits` bytes: a little-endian word (layout.pack_codes).
inline void pack_row(const uint8_t* idx, int D, int bits, uint8_t* out) {
  for (int g = 0; g < D / 8; ++g) {
    uint64_t word = 0;
    for (int k = 0; k < 8; ++k) word |= static_cast<uint64_t>(idx[g * 8 + k]) << (k * bits);
    for (int k = 0; k < bits; ++k) out[g * bits + k] = static_cast<uint8_t>(word >> (8 * k));
  }
}

// Raw centroids c[code_i] of one packed row. `cb` holds 2^BITS centroids, padded to at least 8.
template <int BITS>
void decode_centroids(const uint8_t* row, int D, const float* cb, float* out) {
#ifdef TQ_AVX2
  const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 0, BITS, 2 * BITS, 3 * BITS);
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  __m256 c0 = _mm256_loadu_ps(cb), c1, c2, c3;
  if (BITS >= 4) c1 = _mm256_loadu_ps(cb + 8);
  if (BITS == 5) {
    c2 = _mm256_loadu_ps(cb + 16);
    c3 = _mm256_loadu_ps(cb + 24);
  }
  for (int g = 0; g < D / 8; ++g) {
    uint64_t w = 0;
    std::memcpy(&w, row + g * BITS, BITS);
    // Codes 0-3 sit in the low 4*BITS bits, codes 4-7 in the next 4*BITS (<= 32 bits each).
    const uint32_t lo = static_cast<uint32_t>(w);
    const uint32_t hi = static_cast<uint32_t>(w >> (4 * BITS));
    const __m256i words = _mm256_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi);
    const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(words, shifts), mask);
    __m256 v;
    if (BITS <= 3) {
      v = _mm256_permutevar8x32_ps(c0, idx);
    } else if (BITS == 4) {
      // blendv selects on the sign bit: bit 3 of the code, shifted to bit 31.
      v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(c0, idx), _mm256_permutevar8x32_ps(c1, idx),
                           _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    } else if (BITS == 5) {
      const __m256 sel3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
      const __m256 a = _mm256_blendv_ps(_mm256_permutevar8x32_ps(c0, idx), _mm256_permutevar8x32_ps(c1, idx), sel3);
      const __m256 b = _mm256_blendv_ps(_mm256_permutevar8x32_ps(c2, idx), _mm256_permutevar8x32_ps(c3, idx), sel3);
      v = _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 27)));
    } else {
      v = _mm256_i32gather_ps(cb, idx, 4);
    }
    _mm256_storeu_ps(out + g * 8, v);
  }
#else
  for (int g = 0; g < D / 8; ++g) {
    uint64_t w = 0;
    std::memcpy(&w, row + g * BITS, BITS);
    for (int k = 0; k < 8; ++k) out[g * 8 + k] = cb[(w >> (k * BITS)) & ((1u << BITS) - 1)];
  }
#endif
}

using DecodeFn = void (*)(const uint8_t*, int, const float*, float*);

DecodeFn decoder_for(int bits) {
  switch (bits) {
    case 2: return decode_centroids<2>;
    case 3: return decode_centroids<3>;
    case 4: return decode_centroids<4>;
    case 5: return decode_centroids<5>;
    case 6: return decode_centroids<6>;
    case 8: return decode_centroids<8>;
    default: TORCH_CHECK(false, "tq_cpu: unsupported bits ", bits);
  }
}

// The codebook as a float32 table padded to at least 8 entries (the AVX2 permutes read 8).
std::vector<float> padded_codebook(const at::Tensor& centroids) {
  const int L = static_cast<int>(centroids.numel());
  std::vector<float> cb(std::max(L, 8), 0.0f);
  std::memcpy(cb.data(), centroids.data_ptr<float>(), sizeof(float) * L);
  return cb;
}

// Decoded rotated row ŷ_i = c[code_i] * (n_blk * (1/sqrt(R))), the reference's rounding order.
inline void decode_rotated(DecodeFn dec, const uint8_t* row, const float* norms, int D, const float* cb, float* out) {
  dec(row, D, cb, out);
  const int R = rotation_block(D);
  const float inv = inv_sqrt_block(R);
  for (int b = 0; b < D / R; ++b) {
    const float s = norms[b] * inv;
    for (int i = b * R; i < (b + 1) * R; ++i) out[i] *= s;
  }
}

// ---- small vector helpers (float32, n a multiple of 8) ------------------------------------------------

#ifdef TQ_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for x <= 0 (Cephes' single-precision polynomial, ~1 ulp); below -87.3 it returns 0.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 x2 = _mm256_mul_ps(x, x);
  y = _mm256_fmadd_ps(y, x2, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(underflow, y);
}
#endif

inline float dot(const float* a, const float* b, int n) {
#ifdef TQ_AVX2
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i < n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  return hsum(_mm256_add_ps(s0, s1));
#else
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int i = 0; i < n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] += a[i + k] * b[i + k];
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
#endif
}

// y += a * x
inline void axpy(float* y, float a, const float* x, int n) {
#ifdef TQ_AVX2
  const __m256 va = _mm256_set1_ps(a);
  for (int i = 0; i < n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#else
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
#endif
}

inline void scale_row(float* y, float a, int n) {
  for (int i = 0; i < n; ++i) y[i] *= a;
}

// p[i] = exp(s[i] - m) for i < n (s[i] = -inf gives 0).
inline float exp_shifted_sum(const float* s, float m, int n, float* p) {
  float sum = 0.0f;
  int i = 0;
#ifdef TQ_AVX2
  const __m256 vm = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm));
    _mm256_storeu_ps(p + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; i < n; ++i) {
    p[i] = std::exp(s[i] - m);
    sum += p[i];
  }
  return sum;
}

// ---- hadamard_quantize_kv ------------------------------------------------------------------------------

// Index of the nearest centroid: the number of boundaries strictly below u (ties to the lower index,
// torch.bucketize(right=False)). `bounds` holds the L-1 midpoints followed by +inf.
inline int nearest_code(float u, const float* bounds, int L) {
  int idx = 0;
  for (int s = L >> 1; s > 0; s >>= 1) {
    if (bounds[idx + s - 1] < u) idx += s;
  }
  return idx;
}

void hadamard_quantize_kv(const at::Tensor& src, const at::Tensor& codes, const at::Tensor& norms, int64_t write_pos,
                          bool is_sliding, int64_t bits, const at::Tensor& signs, const std::optional<at::Tensor>& offset,
                          bool norm_correction, const std::optional<at::Tensor>& sink,
                          const std::optional<at::Tensor>& recent, const at::Tensor& centroids,
                          const at::Tensor& boundaries) {
  const int64_t B = src.size(0), T = src.size(1), H = src.size(2);
  const int D = static_cast<int>(src.size(3));
  const int64_t C = codes.size(2);
  const int R = rotation_block(D), NB = D / R, L = 1 << bits;
  const int row_bytes = D * static_cast<int>(bits) / 8;
  const float sqrtR = sqrt_block(R);
  const Dt src_dt = dt_of(src);
  const auto st = src.strides();
  const char* src_base = static_cast<const char*>(src.data_ptr());
  const size_t src_es = src.element_size();
  const float* sg = signs.data_ptr<float>();
  const float* off = offset.has_value() ? offset->data_ptr<float>() : nullptr;
  uint8_t* cd = codes.data_ptr<uint8_t>();
  float* nm = norms.data_ptr<float>();
  const float* cb = centroids.data_ptr<float>();
  std::vector<float> bounds(L);
  std::memcpy(bounds.data(), boundaries.data_ptr<float>(), sizeof(float) * (L - 1));
  bounds[L - 1] = std::numeric_limits<float>::infinity();

  // Which tokens are written where (DESIGN §5 ring rules; the reference's index_copy_ slots).
  const int64_t first_codes = is_sliding ? std::max<int64_t>(0, T - C) : 0;
  const int64_t S = sink.has_value() ? sink->size(2) : 0;
  const int64_t n_sink = sink.has_value() ? std::max<int64_t>(0, std::min<int64_t>(T, S - write_pos)) : 0;
  const int64_t W = recent.has_value() ? recent->size(2) : 0;
  const int64_t first_recent = recent.has_value() ? std::max<int64_t>(0, T - W) : T;
  char* sink_base = sink.has_value() ? static_cast<char*>(sink->data_ptr()) : nullptr;
  char* recent_base = recent.has_value() ? static_cast<char*>(recent->data_ptr()) : nullptr;
  const Dt sink_dt = sink.has_value() ? dt_of(*sink) : Dt::F32;
  const Dt recent_dt = recent.has_value() ? dt_of(*recent) : Dt::F32;

  const int64_t total = B * T * H;
  at::parallel_for(0, total, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
    alignas(32) float y[kMaxHeadDim];
    uint8_t idx[kMaxHeadDim];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task % H, t = (task / H) % T, b = task / (H * T);
      const bool to_codes = t >= first_codes, to_sink = t < n_sink, to_recent = t >= first_recent;
      if (!(to_codes || to_sink || to_recent)) continue;
      load_row(src_base + (b * st[0] + t * st[1] + h * st[2]) * src_es, src_dt, st[3], D, y);
      if (off != nullptr) {
        const float* o = off + (b * H + h) * D;
        for (int i = 0; i < D; ++i) y[i] -= o[i];
      }
      rotate(y, sg, D);
      const int64_t bh = b * H + h;
      if (to_sink) store_row(y, sink_dt, D, sink_base + ((bh * S) + write_pos + t) * D * dt_size(sink_dt));
      if (to_recent) store_row(y, recent_dt, D, recent_base + ((bh * W) + (write_pos + t) % W) * D * dt_size(recent_dt));
      if (!to_codes) continue;
      const int64_t slot = (write_pos + t) % C;
      for (int blk = 0; blk < NB; ++blk) {
        const float* yb = y + blk * R;
        double ss = 0.0;
        for (int i = 0; i < R; ++i) ss += static_cast<double>(yb[i]) * yb[i];
        float n = static_cast<float>(std::sqrt(ss));
        // A zero block stores norm 0 and u = 0 (decodes to 0 whatever its codes).
        const float inv = n > 0.0f ? sqrtR / n : 0.0f;
        for (int i = 0; i < R; ++i) idx[blk * R + i] = static_cast<uint8_t>(nearest_code(yb[i] * inv, bounds.data(), L));
        if (norm_correction) {
          double cc = 0.0;
          for (int i = 0; i < R; ++i) {
            const double c = cb[idx[blk * R + i]];
            cc += c * c;
          }
          n = (n * sqrtR) / static_cast<float>(std::sqrt(cc));
        }
        nm[(bh * C + slot) * NB + blk] = n;
      }
      pack_row(idx, D, static_cast<int>(bits), cd + (bh * C + slot) * row_bytes);
    }
  });
}

// ---- dequantize_kv ----------------------------------------------------------------------------------

at::Tensor dequantize_kv(const at::Tensor& codes, const at::Tensor& norms, int64_t start, int64_t length, int64_t bits,
                         bool rotated, const at::Tensor& signs, const at::Tensor& centroids) {
  const int64_t B = codes.size(0), H = codes.size(1), C = codes.size(2);
  const int row_bytes = static_cast<int>(codes.size(3));
  const int D = row_bytes * 8 / static_cast<int>(bits);
  const int NB = D / rotation_block(D);
  at::Tensor out = at::empty({B, H, length, D}, codes.options().dtype(at::kFloat));
  if (length == 0 || B * H == 0) return out;
  const uint8_t* cd = codes.data_ptr<uint8_t>();
  const float* nm = norms.data_ptr<float>();
  const float* sg = signs.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const std::vector<float> cb = padded_codebook(centroids);
  const DecodeFn dec = decoder_for(static_cast<int>(bits));
  at::parallel_for(0, B * H * length, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task % length, bh = task / length;
      const int64_t slot = (start + p) % C;
      float* y = o + task * D;
      decode_rotated(dec, cd + (bh * C + slot) * row_bytes, nm + (bh * C + slot) * NB, D, cb.data(), y);
      if (!rotated) unrotate(y, sg, D);
    }
  });
  return out;
}

// ---- kv_cache_copy ------------------------------------------------------------------------------------

void kv_cache_copy(const at::Tensor& src, const at::Tensor& cache, int64_t write_pos, bool is_sliding) {
  const int64_t B = src.size(0), T = src.size(1), H = src.size(2);
  const int D = static_cast<int>(src.size(3));
  const int64_t C = cache.size(2);
  const int64_t first = is_sliding ? std::max<int64_t>(0, T - C) : 0;
  const Dt src_dt = dt_of(src), cache_dt = dt_of(cache);
  const auto st = src.strides();
  const char* sb = static_cast<const char*>(src.data_ptr());
  const size_t ses = src.element_size();
  char* cbase = static_cast<char*>(cache.data_ptr());
  const int64_t kept = T - first;
  at::parallel_for(0, B * H * kept, std::max<int64_t>(1, 65536 / D), [&](int64_t begin, int64_t end) {
    alignas(32) float row[kMaxHeadDim];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = first + task % kept, h = (task / kept) % H, b = task / (kept * H);
      const int64_t slot = (write_pos + t) % C;
      char* dst = cbase + (((b * H + h) * C) + slot) * D * dt_size(cache_dt);
      const char* s = sb + (b * st[0] + t * st[1] + h * st[2]) * ses;
      if (src_dt == cache_dt && st[3] == 1) {
        std::memcpy(dst, s, D * dt_size(cache_dt));
      } else {
        // Through float32: exact for every source dtype, one rounding to the cache dtype.
        load_row(s, src_dt, st[3], D, row);
        store_row(row, cache_dt, D, dst);
      }
    }
  });
}

// ---- flash_attn_vec_tq ------------------------------------------------------------------------------

// The attention kernel decodes code rows in a "layout" order that is the cheapest to unpack for the width:
// 4-bit rows 16 coordinates at a time (the 8 low nibbles, then the 8 high ones), 2-bit rows 32 at a time (bit
// pair k of 8 bytes), natural order otherwise. Dot products and sums do not care about the order, so the
// queries are permuted into the keys' layout once per call and the accumulated output is un-permuted from the
// values' layout once at the end. A layout moves coordinates only within groups of 16 or 32, so the rotation
// blocks (multiples of 64) keep their positions.
std::vector<int> layout_of(int bits, int D) {
  std::vector<int> dim(D);  // dim[p]: the coordinate decoded at position p
  for (int p = 0; p < D; ++p) dim[p] = p;
#ifdef TQ_AVX2
  if (bits == 4) {
    for (int p = 0; p < D; ++p) {
      const int k = p % 16;
      dim[p] = p - k + (k < 8 ? 2 * k : 2 * (k - 8) + 1);
    }
  } else if (bits == 2) {
    for (int p = 0; p < D; ++p) dim[p] = p - p % 32 + 4 * (p % 8) + (p % 32) / 8;
  }
#else
  (void)bits;  // the portable decoders keep the natural order
#endif
  return dim;
}

#ifdef TQ_AVX2
inline __m256 lookup16(__m256 c0, __m256 c1, __m256i idx) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(c0, idx), _mm256_permutevar8x32_ps(c1, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

inline __m256i load_8_bytes(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
#endif

// Raw centroids of one packed row in the width's layout order (see layout_of).
template <int BITS>
void decode_layout(const uint8_t* row, int D, const float* cb, float* out) {
#ifdef TQ_AVX2
  if (BITS == 4) {
    const __m256 c0 = _mm256_loadu_ps(cb), c1 = _mm256_loadu_ps(cb + 8);
    const __m256i mask = _mm256_set1_epi32(15);
    for (int g = 0; g < D / 16; ++g) {
      const __m256i v = load_8_bytes(row + 8 * g);
      _mm256_storeu_ps(out + 16 * g, lookup16(c0, c1, _mm256_and_si256(v, mask)));
      _mm256_storeu_ps(out + 16 * g + 8, lookup16(c0, c1, _mm256_srli_epi32(v, 4)));
    }
    return;
  }
  if (BITS == 2) {
    const __m256 c0 = _mm256_loadu_ps(cb);
    const __m256i mask = _mm256_set1_epi32(3);
    for (int g = 0; g < D / 32; ++g) {
      const __m256i v = load_8_bytes(row + 8 * g);
      _mm256_storeu_ps(out + 32 * g, _mm256_permutevar8x32_ps(c0, _mm256_and_si256(v, mask)));
      _mm256_storeu_ps(out + 32 * g + 8, _mm256_permutevar8x32_ps(c0, _mm256_and_si256(_mm256_srli_epi32(v, 2), mask)));
      _mm256_storeu_ps(out + 32 * g + 16, _mm256_permutevar8x32_ps(c0, _mm256_and_si256(_mm256_srli_epi32(v, 4), mask)));
      _mm256_storeu_ps(out + 32 * g + 24, _mm256_permutevar8x32_ps(c0, _mm256_srli_epi32(v, 6)));
    }
    return;
  }
  if (BITS == 8) {
    for (int g = 0; g < D / 8; ++g) _mm256_storeu_ps(out + 8 * g, _mm256_i32gather_ps(cb, load_8_bytes(row + 8 * g), 4));
    return;
  }
#endif
  decode_centroids<BITS>(row, D, cb, out);
}

DecodeFn layout_decoder_for(int bits) {
  switch (bits) {
    case 2: return decode_layout<2>;
    case 3: return decode_layout<3>;
    case 4: return decode_layout<4>;
    case 5: return decode_layout<5>;
    case 6: return decode_layout<6>;
    case 8: return decode_layout<8>;
    default: TORCH_CHECK(false, "tq_cpu: unsupported bits ", bits);
  }
}

// Scores of `nt` keys (rows of kbuf, layout order, per-block factors kf) for NR query rows (q, stride D):
// s[r * stride + j] = Σ_blk kf[j, blk] * (q_r · k_j)_blk.
template <int NR>
void score_keys(const float* q, int D, int R, int NB, const float* kbuf, const float* kf, int nt, float* s, int stride) {
  for (int j = 0; j < nt; ++j) {
    const float* k = kbuf + static_cast<int64_t>(j) * D;
    float total[NR];
    for (int r = 0; r < NR; ++r) total[r] = 0.0f;
    for (int blk = 0; blk < NB; ++blk) {
#ifdef TQ_AVX2
      __m256 a[NR];
      for (int r = 0; r < NR; ++r) a[r] = _mm256_setzero_ps();
      for (int c = blk * R; c < (blk + 1) * R; c += 8) {
        const __m256 kv = _mm256_loadu_ps(k + c);
        for (int r = 0; r < NR; ++r) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * D + c), kv, a[r]);
      }
      for (int r = 0; r < NR; ++r) total[r] += kf[j * NB + blk] * hsum(a[r]);
#else
      for (int r = 0; r < NR; ++r) total[r] += kf[j * NB + blk] * dot(q + r * D + blk * R, k + blk * R, R);
#endif
    }
    for (int r = 0; r < NR; ++r) s[r * stride + j] = total[r];
  }
}

// acc_r += Σ_j pv[r, j, blk] * vbuf[j] for NR rows (acc stride D), block by block; the rows' accumulators stay
// in registers over all the keys of the tile.
template <int NR>
void accumulate_values(float* acc, int D, int R, int NB, const float* pv, int stride, const float* vbuf, int nt) {
  for (int blk = 0; blk < NB; ++blk) {
    for (int c = blk * R; c < (blk + 1) * R; c += 8) {
#ifdef TQ_AVX2
      __m256 a[NR];
      for (int r = 0; r < NR; ++r) a[r] = _mm256_loadu_ps(acc + r * D + c);
      for (int j = 0; j < nt; ++j) {
        const __m256 v = _mm256_loadu_ps(vbuf + static_cast<int64_t>(j) * D + c);
        for (int r = 0; r < NR; ++r) a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(pv + r * stride + j * NB + blk), v, a[r]);
      }
      for (int r = 0; r < NR; ++r) _mm256_storeu_ps(acc + r * D + c, a[r]);
#else
      for (int j = 0; j < nt; ++j) {
        const float* v = vbuf + static_cast<int64_t>(j) * D + c;
        for (int r = 0; r < NR; ++r) {
          const float w = pv[r * stride + j * NB + blk];
          for (int i = 0; i < 8; ++i) acc[r * D + c + i] += w * v[i];
        }
      }
#endif
    }
  }
}

using ScoreFn = void (*)(const float*, int, int, int, const float*, const float*, int, float*, int);
using AccumulateFn = void (*)(float*, int, int, int, const float*, int, const float*, int);
constexpr int kRowGroup = 8;  // query rows handled together (their accumulators fit the 16 AVX2 registers)

template <int... N>
struct RowKernels {
  static constexpr ScoreFn score[sizeof...(N)] = {score_keys<N>...};
  static constexpr AccumulateFn accumulate[sizeof...(N)] = {accumulate_values<N>...};
};
using Kernels = RowKernels<1, 2, 3, 4, 5, 6, 7, 8>;

struct Window {
  const char* base = nullptr;
  Dt dt = Dt::F32;
  int64_t len = 0;  // S or W
  const char* row(int64_t bh, int64_t i, int D) const { return base + (bh * len + i) * D * dt_size(dt); }
};

Window window_of(const std::optional<at::Tensor>& t) {
  Window w;
  if (t.has_value()) {
    w.base = static_cast<const char*>(t->data_ptr());
    w.dt = dt_of(*t);
    w.len = t->size(2);
  }
  return w;
}

struct Attention {
  int64_t B, Hq, Hkv, G, Lq, C, kv_len;
  int D, R, NB, rows, tile;
  float inv_sqrt_r;      // 1/sqrt(R), as the reference rounds it
  int64_t lo;            // first position still held
  int64_t window;        // 0 = full attention
  float softcap;
  const float* qrot;     // [B, Hkv, rows, D] in the keys' layout, row = g * Lq + i, scale folded in
  const uint8_t* kc;
  const float* kn;
  const uint8_t* vc;
  const float* vn;
  int k_row_bytes, v_row_bytes;
  DecodeFn kdec, vdec;
  const float* kcb;
  const float* vcb;
  const int* k_dim;      // layouts (layout_of) of the key and value codes
  const int* v_dim;
  Window k_sink, v_sink, k_recent, v_recent;
  const int64_t* kv_start;

  // Visible positions [a, e] of query i of sequence b (empty when a > e).
  void interval(int64_t b, int64_t i, int64_t* a, int64_t* e) const {
    const int64_t pos = kv_len - Lq + i;
    int64_t first = lo;
    if (window > 0) first = std::max(first, pos - window + 1);
    if (kv_start != nullptr) first = std::max(first, kv_start[b]);
    *a = first;
    *e = pos;
  }

  // Row j of K (or V) in the codes' layout order, and each block's factor: a full-precision window row as is
  // (factor 1); a code row as raw centroids with factor n_blk / sqrt(R).
  void row_of(bool key, int64_t bh, int64_t j, int64_t slot_j, float* out, float* factor) const {
    const Window& sink = key ? k_sink : v_sink;
    const Window& recent = key ? k_recent : v_recent;
    const Window* w = nullptr;
    int64_t wi = 0;
    if (j < sink.len) {
      w = &sink;
      wi = j;
    } else if (recent.len > 0 && j >= kv_len - recent.len) {
      w = &recent;
      wi = j % recent.len;
    }
    if (w != nullptr) {
      alignas(32) float tmp[kMaxHeadDim];
      load_row(w->row(bh, wi, D), w->dt, 1, D, tmp);
      const int* dim = key ? k_dim : v_dim;
      for (int p = 0; p < D; ++p) out[p] = tmp[dim[p]];
      for (int b = 0; b < NB; ++b) factor[b] = 1.0f;
      return;
    }
    const int64_t slot = bh * C + slot_j;
    const float inv = inv_sqrt_r;
    if (key) {
      kdec(kc + slot * k_row_bytes, D, kcb, out);
      for (int b = 0; b < NB; ++b) factor[b] = kn[slot * NB + b] * inv;
    } else {
      vdec(vc + slot * v_row_bytes, D, vcb, out);
      for (int b = 0; b < NB; ++b) factor[b] = vn[slot * NB + b] * inv;
    }
  }

  // Unnormalised softmax state of positions [ja, je] for every query row of (b, h): acc [rows, D] (values'
  // layout), running max m and denominator l. Tile by tile: decode the keys once for all rows, score, update
  // the online softmax, decode the values once for all rows, accumulate.
  void run(int64_t b, int64_t h, int64_t ja, int64_t je, float* acc, float* m, float* l) const {
    const int64_t bh = b * Hkv + h;
    const float* q = qrot + bh * rows * D;
    std::fill(acc, acc + static_cast<size_t>(rows) * D, 0.0f);
    std::fill(m, m + rows, kNegInf);
    std::fill(l, l + rows, 0.0f);
    std::vector<int64_t> ra(Lq), re(Lq);
    for (int64_t i = 0; i < Lq; ++i) interval(b, i, &ra[i], &re[i]);
    const int stride = kTile * NB;  // of s, p and pv rows
    std::vector<float> s(static_cast<size_t>(rows) * stride), pv(static_cast<size_t>(rows) * stride);
    std::vector<float> kbuf(static_cast<size_t>(tile) * D), vbuf(static_cast<size_t>(tile) * D);
    std::vector<float> kf(static_cast<size_t>(tile) * NB), vf(static_cast<size_t>(tile) * NB);
    std::vector<char> live(rows), needed(tile);
    for (int64_t t0 = ja; t0 <= je; t0 += tile) {
      const int nt = static_cast<int>(std::min<int64_t>(tile, je - t0 + 1));
      // Slots t0 % C + j, wrapped once at most (a tile spans at most C held positions): no division per row.
      const int64_t slot0 = t0 % C;
      auto slot = [&](int j) { return slot0 + j < C ? slot0 + j : slot0 + j - C; };
      for (int j = 0; j < nt; ++j)
        row_of(true, bh, t0 + j, slot(j), kbuf.data() + static_cast<int64_t>(j) * D, kf.data() + j * NB);
      for (int r0 = 0; r0 < rows; r0 += kRowGroup) {
        const int nr = std::min(kRowGroup, rows - r0);
        Kernels::score[nr - 1](q + static_cast<int64_t>(r0) * D, D, R, NB, kbuf.data(), kf.data(), nt,
                               s.data() + static_cast<int64_t>(r0) * stride, stride);
      }
      std::fill(needed.begin(), needed.end(), 0);
      for (int r = 0; r < rows; ++r) {
        float* sr = s.data() + static_cast<int64_t>(r) * stride;
        float* pr = pv.data() + static_cast<int64_t>(r) * stride;
        const int64_t i = r % Lq;
        const int j0 = static_cast<int>(std::max<int64_t>(ra[i] - t0, 0));
        const int j1 = static_cast<int>(std::min<int64_t>(re[i] - t0, nt - 1));
        live[r] = j0 <= j1;
        if (!live[r]) {
          std::fill(pr, pr + stride, 0.0f);
          continue;
        }
        for (int j = 0; j < j0; ++j) sr[j] = kNegInf;
        for (int j = j1 + 1; j < nt; ++j) sr[j] = kNegInf;
        if (softcap > 0.0f) {
          for (int j = j0; j <= j1; ++j) sr[j] = softcap * std::tanh(sr[j] / softcap);
        }
        float mt = kNegInf;
        for (int j = j0; j <= j1; ++j) mt = std::max(mt, sr[j]);
        const float mnew = std::max(m[r], mt);
        if (m[r] != mnew) {
          const float alpha = m[r] == kNegInf ? 0.0f : std::exp(m[r] - mnew);
          scale_row(acc + static_cast<int64_t>(r) * D, alpha, D);
          l[r] *= alpha;
          m[r] = mnew;
        }
        // p into the first nt entries of s's row, then spread per block with the value factors below.
        l[r] += exp_shifted_sum(sr, mnew, nt, sr);
        for (int j = j0; j <= j1; ++j) needed[j] = 1;
      }
      // Values of the positions some row sees (a fully masked position's codes are never read).
      for (int j = 0; j < nt; ++j) {
        float* vrow = vbuf.data() + static_cast<int64_t>(j) * D;
        if (needed[j]) {
          row_of(false, bh, t0 + j, slot(j), vrow, vf.data() + j * NB);
        } else {
          std::fill(vrow, vrow + D, 0.0f);
          for (int blk = 0; blk < NB; ++blk) vf[j * NB + blk] = 0.0f;
        }
      }
      for (int r = 0; r < rows; ++r) {
        if (!live[r]) continue;
        const float* pr = s.data() + static_cast<int64_t>(r) * stride;
        float* out = pv.data() + static_cast<int64_t>(r) * stride;
        if (NB == 1) {
          for (int j = 0; j < nt; ++j) out[j] = pr[j] * vf[j];
        } else {
          for (int j = 0; j < nt; ++j)
            for (int blk = 0; blk < NB; ++blk) out[j * NB + blk] = pr[j] * vf[j * NB + blk];
        }
      }
      for (int r0 = 0; r0 < rows; r0 += kRowGroup) {
        const int nr = std::min(kRowGroup, rows - r0);
        Kernels::accumulate[nr - 1](acc + static_cast<int64_t>(r0) * D, D, R, NB,
                                    pv.data() + static_cast<int64_t>(r0) * stride, stride, vbuf.data(), nt);
      }
    }
  }
};

at::Tensor flash_attn_vec_tq(const at::Tensor& q_in, const at::Tensor& k_codes, const at::Tensor& k_norms,
                             const at::Tensor& v_codes, const at::Tensor& v_norms, int64_t kv_len, double scale,
                             int64_t bits, int64_t v_bits, int64_t sliding_window, double softcap,
                             const std::optional<at::Tensor>& kv_start, const at::Tensor& signs,
                             const std::optional<at::Tensor>& lse, const std::optional<at::Tensor>& k_sink,
                             const std::optional<at::Tensor>& v_sink, const std::optional<at::Tensor>& k_recent,
                             const std::optional<at::Tensor>& v_recent, const at::Tensor& k_centroids,
                             const at::Tensor& v_centroids) {
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Lq = q_in.size(2);
  const int D = static_cast<int>(q_in.size(3));
  const int64_t Hkv = k_codes.size(1), C = k_codes.size(2);
  const int64_t G = Hq / Hkv;
  const int R = rotation_block(D), NB = D / R;
  const int rows = static_cast<int>(G * Lq);
  at::Tensor out = at::empty({B, Hq, Lq, D}, q_in.options());
  const Dt out_dt = dt_of(out);

  // Rotated, scaled queries [B, Hkv, rows, D] (query head h*G + g, query i -> row g*Lq + i).
  const at::Tensor q = q_in.to(at::kFloat).contiguous();
  const float* qp = q.data_ptr<float>();
  const float* sg = signs.data_ptr<float>();
  std::vector<float> qrot(static_cast<size_t>(B * Hq * Lq) * D);
  const float sc = static_cast<float>(scale);
  const std::vector<int> k_dim = layout_of(static_cast<int>(bits), D), v_dim = layout_of(static_cast<int>(v_bits), D);
  for (int64_t row = 0; row < B * Hq * Lq; ++row) {
    alignas(32) float y[kMaxHeadDim];
    std::memcpy(y, qp + row * D, sizeof(float) * D);
    rotate(y, sg, D);
    float* r = qrot.data() + row * D;  // q's own [B, Hq, Lq] order is [B, Hkv, G, Lq] = [B, Hkv, rows]
    for (int p = 0; p < D; ++p) r[p] = y[k_dim[p]] * sc;
  }

  const std::vector<float> kcb = padded_codebook(k_centroids), vcb = padded_codebook(v_centroids);
  Attention at_{};
  at_.B = B; at_.Hq = Hq; at_.Hkv = Hkv; at_.G = G; at_.Lq = Lq; at_.C = C; at_.kv_len = kv_len;
  at_.D = D; at_.R = R; at_.NB = NB; at_.rows = rows;
  at_.tile = std::min(kTile, std::max(8, 8192 / D));
  at_.inv_sqrt_r = inv_sqrt_block(R);
  at_.k_dim = k_dim.data(); at_.v_dim = v_dim.data();
  at_.lo = std::max<int64_t>(0, kv_len - C);
  at_.window = sliding_window;
  at_.softcap = static_cast<float>(softcap);
  at_.qrot = qrot.data();
  at_.kc = k_codes.data_ptr<uint8_t>(); at_.kn = k_norms.data_ptr<float>();
  at_.vc = v_codes.data_ptr<uint8_t>(); at_.vn = v_norms.data_ptr<float>();
  at_.k_row_bytes = static_cast<int>(k_codes.size(3)); at_.v_row_bytes = static_cast<int>(v_codes.size(3));
  at_.kdec = layout_decoder_for(static_cast<int>(bits)); at_.vdec = layout_decoder_for(static_cast<int>(v_bits));
  at_.kcb = kcb.data(); at_.vcb = vcb.data();
  at_.k_sink = window_of(k_sink); at_.v_sink = window_of(v_sink);
  at_.k_recent = window_of(k_recent); at_.v_recent = window_of(v_recent);
  at::Tensor starts;
  if (kv_start.has_value()) {
    starts = kv_start->contiguous();
    at_.kv_start = starts.data_ptr<int64_t>();
  } else {
    at_.kv_start = nullptr;
  }

  // Positions any query row of sequence b sees: [first of query 0's range, last query's position].
  std::vector<int64_t> span_a(B), span_e(B);
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    int64_t a = std::numeric_limits<int64_t>::max(), e = -1;
    for (int64_t i = 0; i < Lq; ++i) {
      int64_t ai, ei;
      at_.interval(b, i, &ai, &ei);
      if (ai <= ei) {
        a = std::min(a, ai);
        e = std::max(e, ei);
      }
    }
    span_a[b] = a;
    span_e[b] = e;
    if (e >= a) longest = std::max(longest, e - a + 1);
  }

  // Work split: (b, KV head, position block). Blocks of >= kMinSplit positions, enough of them to give
  // every thread ~4 tasks; the partial softmax states are merged exactly (log-sum-exp) afterwards.
  constexpr int64_t kMinSplit = 256;
  const int64_t threads = std::max(1, at::get_num_threads());
  int64_t splits = 1;
  if (longest > kMinSplit) {
    const int64_t want = (4 * threads + B * Hkv - 1) / (B * Hkv);
    splits = std::max<int64_t>(1, std::min(want, (longest + kMinSplit - 1) / kMinSplit));
  }
  const int64_t block = splits > 1 ? (longest + splits - 1) / splits : std::max<int64_t>(longest, 1);
  const int64_t tasks = B * Hkv * splits;
  const size_t state = static_cast<size_t>(rows) * (D + 2);
  std::vector<float> partial(static_cast<size_t>(tasks) * state);
  // Tasks of less than ~1k key rows are not worth a thread hand-off.
  const int64_t work_per_task = std::max<int64_t>(1, std::min(block, longest) * rows * D / 64);
  const int64_t grain = std::max<int64_t>(1, 16384 / work_per_task);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t split = task % splits, bh = task / splits, b = bh / Hkv, h = bh % Hkv;
      float* acc = partial.data() + task * state;
      float* m = acc + static_cast<size_t>(rows) * D;
      float* l = m + rows;
      const int64_t ja = span_a[b] + split * block;
      const int64_t je = std::min(span_e[b], ja + block - 1);
      if (span_e[b] < span_a[b] || ja > je) {
        std::fill(acc, acc + static_cast<size_t>(rows) * D, 0.0f);
        std::fill(m, m + rows, kNegInf);
        std::fill(l, l + rows, 0.0f);
        continue;
      }
      at_.run(b, h, ja, je, acc, m, l);
    }
  });

  // Merge the splits of each (b, h) and un-rotate: out = Σ_k e^{m_k - M} acc_k / Σ_k e^{m_k - M} l_k.
  char* op = static_cast<char*>(out.data_ptr());
  float* lp = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  at::parallel_for(0, B * Hkv * rows, std::max<int64_t>(1, 8192 / D), [&](int64_t begin, int64_t end) {
    alignas(32) float y[kMaxHeadDim];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task % rows, bh = task / rows;
      const float* base = partial.data() + bh * splits * state;
      float M = kNegInf;
      for (int64_t k = 0; k < splits; ++k) M = std::max(M, base[k * state + rows * D + r]);
      const int64_t g = r / Lq, i = r % Lq, b = bh / Hkv, h = bh % Hkv;
      const int64_t out_row = (b * Hq + h * G + g) * Lq + i;
      if (M == kNegInf) {
        std::fill(y, y + D, 0.0f);
        store_row(y, out_dt, D, op + out_row * D * dt_size(out_dt));
        if (lp != nullptr) lp[out_row] = kNegInf;
        continue;
      }
      float L = 0.0f;
      std::fill(y, y + D, 0.0f);
      for (int64_t k = 0; k < splits; ++k) {
        const float* st = base + k * state;
        const float mk = st[rows * D + r];
        if (mk == kNegInf) continue;
        const float w = std::exp(mk - M);
        L += w * st[rows * D + rows + r];
        axpy(y, w, st + r * D, D);
      }
      const float inv = 1.0f / L;
      alignas(32) float x[kMaxHeadDim];
      for (int p = 0; p < D; ++p) x[v_dim[p]] = y[p] * inv;  // back from the values' layout
      unrotate(x, sg, D);
      std::memcpy(y, x, sizeof(float) * D);
      store_row(y, out_dt, D, op + out_row * D * dt_size(out_dt));
      if (lp != nullptr) lp[out_row] = M + std::log(L);
    }
  });
  return out;
}

// What the build was compiled for (reported by torch-tq info).
std::string build_info() {
  std::string s;
#ifdef TQ_AVX2
  s += "AVX2+FMA";
#else
  s += "portable C++";
#endif
#ifdef _OPENMP
  s += ", OpenMP";
#else
  s += ", single-threaded";
#endif
  return s;
}

}  // namespace
}  // namespace tq_cpu

TORCH_LIBRARY(tq_cpu, m) {
  m.def("hadamard_quantize_kv(Tensor src, Tensor(a!) codes, Tensor(b!) norms, int write_pos, bool is_sliding, "
        "int bits, Tensor signs, Tensor? offset, bool norm_correction, Tensor(c!)? sink, Tensor(d!)? recent, "
        "Tensor centroids, Tensor boundaries) -> ()");
  m.def("dequantize_kv(Tensor codes, Tensor norms, int start, int length, int bits, bool rotated, Tensor signs, "
        "Tensor centroids) -> Tensor");
  m.def("flash_attn_vec_tq(Tensor q, Tensor k_codes, Tensor k_norms, Tensor v_codes, Tensor v_norms, int kv_len, "
        "float scale, int bits, int v_bits, int sliding_window, float softcap, Tensor? kv_start, Tensor signs, "
        "Tensor(a!)? lse, Tensor? k_sink, Tensor? v_sink, Tensor? k_recent, Tensor? v_recent, Tensor k_centroids, "
        "Tensor v_centroids) -> Tensor");
  m.def("kv_cache_copy(Tensor src, Tensor(a!) cache, int write_pos, bool is_sliding) -> ()");
  m.def("build_info() -> str", &tq_cpu::build_info);
}

TORCH_LIBRARY_IMPL(tq_cpu, CPU, m) {
  m.impl("hadamard_quantize_kv", &tq_cpu::hadamard_quantize_kv);
  m.impl("dequantize_kv", &tq_cpu::dequantize_kv);
  m.impl("flash_attn_vec_tq", &tq_cpu::flash_attn_vec_tq);
  m.impl("kv_cache_copy", &tq_cpu::kv_cache_copy);
}
