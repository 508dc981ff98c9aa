// Exercises the shim's types and math library; each output slot has a numpy reference.
#include "../../../mps_ops/kernels/utils.h"

constant float kTable[4] = {0.5f, -1.25f, 2.0f, 3.5f};

struct FeatureParams {
  uint n;
  float lo;
  float hi;
};

template <typename T>
[[kernel]] void features(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                         device const bfloat* xb [[buffer(2)]], constant FeatureParams& p [[buffer(3)]],
                         uint2 gid2 [[thread_position_in_grid]], uint2 tpg [[threads_per_threadgroup]]) {
  const uint gid = gid2.x;
  if (gid >= p.n) return;
  const float v = x[gid];
  device float* o = out + gid * 16;
  T t = T(v);
  o[0] = float(metal::exp(t));
  o[1] = fast::exp2(v);
  o[2] = precise::tanh(v);
  o[3] = clamp(v, p.lo, p.hi);
  o[4] = metal::rsqrt(abs(v) + 1.0f);
  o[5] = as_type<float>(as_type<uint>(v) ^ 0x80000000u);
  o[6] = select(1.0f, 2.0f, v > 0.0f);
  o[7] = kTable[gid % 4] * v;
  half4 h = half4(v, 2.0h, half(0.5f), 1);
  float4 f = float4(h) * 2.0f;
  o[8] = f.x + f.y + f.z + f.w;
  bfloat b = xb[gid];
  bfloat b2 = b * bfloat(2.0f) + bfloat(1.0f);
  o[9] = float(b2);
  o[10] = fma(v, 3.0f, 1.0f);
  o[11] = float(metal::max(int(v * 10.0f), -3));
  uint4 u = uint4(gid, 1u, 2u, 3u);
  o[12] = float(popcount(u.x) + clz(u.y) + ctz(8u));
  o[13] = isnan(v) ? 1.0f : metal::numeric_limits<half>::max();
  o[14] = mix(0.0f, 10.0f, 0.25f) + float(tpg.y);
  float2 q = float2(v, 1.0f).yx;
  o[15] = length(q) + metal::floor(v) + float(all(float3(v) == v));
}
instantiate_kernel("features_half", features, half)
