// Correct kernels: the simulator must reproduce the reference results exactly.
#include "../../../mps_ops/kernels/utils.h"

struct ReduceParams {
  uint n;
  float scale;
};

// One threadgroup sums `threads_per_threadgroup` float4 items: swizzles, a simd_shuffle_xor
// butterfly, threadgroup memory + barrier, then simd_sum. Also writes half/bfloat conversions.
template <typename T>
[[kernel]] void tg_reduce(device const float4* x [[buffer(0)]], device float* sums [[buffer(1)]],
                          device half* as_half [[buffer(2)]], device bfloat* as_bf16 [[buffer(3)]],
                          constant ReduceParams& p [[buffer(4)]],
                          uint3 tgid [[threadgroup_position_in_grid]],
                          uint tid [[thread_index_in_threadgroup]],
                          uint3 tpg [[threads_per_threadgroup]],
                          ushort lane [[thread_index_in_simdgroup]],
                          ushort sg [[simdgroup_index_in_threadgroup]],
                          uint nsg [[simdgroups_per_threadgroup]]) {
  threadgroup T partial[32];
  const uint gid = tgid.x * tpg.x + tid;
  float4 a = x[gid];
  float4 b = float4(a.yx, a.zw);             // constructor from two float2 swizzles
  b.xy = b.yx;                               // swizzle assignment: back to (x, y, z, w)
  float s = dot(b, float4(1.0f, 2.0f, 3.0f, 4.0f)) * p.scale;
  as_half[gid] = half(a.x);
  as_bf16[gid] = bfloat(a.y);
  for (ushort m = 16; m >= 1; m >>= 1) s += simd_shuffle_xor(s, m);
  if (lane == 0) partial[sg] = T(s);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    float t = lane < nsg ? float(partial[lane]) : 0.0f;
    t = simd_sum(t);
    if (lane == 0) sums[tgid.x] = t;
  }
}
instantiate_kernel("tg_reduce_float", tg_reduce, float)
instantiate_kernel("tg_reduce_half", tg_reduce, half)  // its own `partial` array

// Every lane records the results of several collectives.
[[kernel]] void simd_ops(device const int* x [[buffer(0)]], device int* out [[buffer(1)]],
                         uint gid [[thread_position_in_grid]], uint lane [[thread_index_in_simdgroup]]) {
  int v = x[gid];
  device int* o = out + gid * 10;
  o[0] = simd_prefix_exclusive_sum(v);
  o[1] = simd_shuffle_down(v, 3);
  o[2] = simd_shuffle_up(v, 5);
  o[3] = simd_broadcast(v, 7);
  o[4] = simd_max(v);
  o[5] = simd_min(v);
  o[6] = simd_shuffle(v, (lane * 7) % 32);
  o[7] = simd_all(v > -1000) ? 1 : 0;
  o[8] = simd_any(v == x[gid - lane]) ? 1 : 0;
  o[9] = int(uint64_t(simd_ballot(v > 0)) & 0xffffffffu);
}

// Atomics on device and threadgroup memory.
[[kernel]] void count_positive(device const float* x [[buffer(0)]], device atomic_uint* count [[buffer(1)]],
                               device uint* per_group [[buffer(2)]],
                               uint gid [[thread_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
                               uint3 tgid [[threadgroup_position_in_grid]]) {
  threadgroup atomic_uint local;
  if (tid == 0) atomic_store_explicit(&local, 0u, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (x[gid] > 0.0f) {
    atomic_fetch_add_explicit(&local, 1u, memory_order_relaxed);
    atomic_fetch_add_explicit(count, 1u, memory_order_relaxed);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) per_group[tgid.x] = atomic_load_explicit(&local, memory_order_relaxed);
}

// Values written by different threads across several barriers (the optimiser must not keep
// threadgroup values in registers across a barrier).
[[kernel, max_total_threads_per_threadgroup(64)]] void barrier_handoff(device int* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup int v;
  if (tid == 0) v = 1;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  int a = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 1) v = 2;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = a * 10 + v;
}

// Within one simdgroup, simdgroup_barrier orders threadgroup memory.
[[kernel]] void simd_handoff(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float buf[32];
  buf[tid] = float(tid);
  simdgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = buf[(tid + 1) % 32];
}

// 8x8 simdgroup matrices: C = A * B + C.
[[kernel]] void matmul8(device const float* a [[buffer(0)]], device const float* b [[buffer(1)]],
                        device float* c [[buffer(2)]]) {
  simdgroup_float8x8 ma, mb, mc;
  simdgroup_load(ma, a, 8);
  simdgroup_load(mb, b, 8);
  simdgroup_load(mc, c, 8);
  simdgroup_multiply_accumulate(mc, ma, mb, mc);
  simdgroup_store(mc, c, 8);
}

// Strict fp16: every half operation rounds.
[[kernel]] void half_ops(device const half* a [[buffer(0)]], device const half* b [[buffer(1)]],
                         device const half* c [[buffer(2)]], device half* out [[buffer(3)]],
                         uint gid [[thread_position_in_grid]]) {
  half p = a[gid] * b[gid];
  out[gid] = p + c[gid];
}

// Byte counting: a reload of the same bytes by the same thread before any synchronisation point
// is not counted again; after a collective it is.
[[kernel]] void reload(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                       uint gid [[thread_position_in_grid]]) {
  float4 a = *((device const float4*)(x + gid * 4));
  float b = x[gid * 4 + 2];          // inside the float4 just loaded: not counted
  float s = simd_sum(a.x + b);
  float c = x[gid * 4 + 1];          // after a collective: counted
  out[gid] = s + c;
}

// Buffers 0 and 1 may be views of one tensor: a write through one is visible through the other.
[[kernel]] void alias_rw(device const float* a [[buffer(0)]], device float* b [[buffer(1)]],
                         device float* out [[buffer(2)]], uint gid [[thread_position_in_grid]]) {
  b[gid] = float(gid);
  out[gid] = a[32 + gid];
}

// Every builtin, for a 3-D grid of 3-D threadgroups (thread_position_in_grid as uint3, others
// as uint/ushort/uint2 to exercise the conversions).
[[kernel]] void builtins(device uint* out [[buffer(0)]],
                         uint3 pos [[thread_position_in_grid]], uint3 tg [[threadgroup_position_in_grid]],
                         ushort2 tpos [[thread_position_in_threadgroup]], uint tidx [[thread_index_in_threadgroup]],
                         ushort lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]],
                         uint3 tpt [[threads_per_threadgroup]], uint3 ngroups [[threadgroups_per_grid]],
                         uint width [[threads_per_simdgroup]], uint nsg [[simdgroups_per_threadgroup]],
                         uint3 tpg [[threads_per_grid]]) {
  const uint linear = (pos.z * tpg.y + pos.y) * tpg.x + pos.x;
  device uint* o = out + linear * 12;
  o[0] = tg.x; o[1] = tg.y; o[2] = tg.z;
  o[3] = tpos.x; o[4] = tpos.y; o[5] = tidx;
  o[6] = lane; o[7] = sg; o[8] = tpt.x * tpt.y * tpt.z;
  o[9] = ngroups.x * ngroups.y * ngroups.z; o[10] = width; o[11] = nsg;
}
