// Buggy kernels: the simulator must report each bug as a SimError.
#include "../../../mps_ops/kernels/utils.h"

[[kernel]] void oob_write(device float* out [[buffer(0)]], uint gid [[thread_position_in_grid]]) {
  out[gid + 1] = 1.0f;  // the last thread writes one past the end
}

[[kernel]] void oob_read(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                         uint gid [[thread_position_in_grid]]) {
  out[gid] = x[gid + 3];
}

[[kernel]] void wild_write(device float* out [[buffer(0)]], uint gid [[thread_position_in_grid]]) {
  out[gid * 100000000u] = 1.0f;
}

[[kernel]] void divergent_sum(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                              uint gid [[thread_position_in_grid]], uint lane [[thread_index_in_simdgroup]]) {
  float v = x[gid];
  if (lane < 16) v = simd_sum(v);  // only half of the simdgroup calls it
  out[gid] = v;
}

[[kernel]] void divergent_kinds(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                                uint gid [[thread_position_in_grid]], uint lane [[thread_index_in_simdgroup]]) {
  float v = x[gid];
  if (lane < 16) v = simd_sum(v); else v = simd_max(v);
  out[gid] = v;
}

[[kernel]] void missing_barrier(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                                uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float buf[64];
  buf[tid] = x[tid];
  out[tid] = buf[(tid + 32) % 64];  // another simdgroup's value, no barrier
}

[[kernel]] void write_after_read(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                                 uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float buf[64];
  buf[tid] = x[tid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float v = tid < 32 ? buf[tid + 32] : 0.0f;
  if (tid >= 32) buf[tid] = 2.0f;  // overwrites what another simdgroup may still read
  out[tid] = v;
}

[[kernel]] void uninitialised(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float buf[64];
  if (tid < 32) buf[tid] = 1.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = buf[63 - tid];
}

[[kernel]] void barrier_exit(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float buf[64];
  if (tid == 5) return;  // never reaches the barrier
  buf[tid] = 1.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = buf[tid];
}

[[kernel]] void barrier_split(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  if (tid < 32) {
    out[tid] = 1.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = 2.0f;
  }
}

[[kernel]] void barrier_none(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float buf[64];
  buf[tid] = float(tid);
  threadgroup_barrier(mem_flags::mem_none);  // execution barrier only: no memory ordering
  out[tid] = buf[63 - tid];
}

[[kernel]] void int_div_zero(device const int* x [[buffer(0)]], device int* out [[buffer(1)]],
                             uint gid [[thread_position_in_grid]]) {
  out[gid] = 7 / x[gid];
}

[[kernel]] void scalar_race(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                            uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float s;
  if (tid == 0) s = x[0];
  out[tid] = s;  // thread 1.. read thread 0's write without a barrier
}

[[kernel]] void simd_no_barrier(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float buf[32];
  buf[tid] = float(tid);
  out[tid] = buf[(tid + 1) % 32];  // lockstep on hardware, but MSL needs simdgroup_barrier
}

__attribute__((noinline)) static float helper_sum(float v) { return simd_sum(v); }

[[kernel]] void divergent_helper(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                                 uint gid [[thread_position_in_grid]], uint lane [[thread_index_in_simdgroup]]) {
  float v = x[gid];
  if (lane & 1) v = helper_sum(v) * 2.0f; else v = helper_sum(v + 1.0f);
  out[gid] = v;
}

[[kernel]] void spin_forever(device atomic_uint* counter [[buffer(0)]]) {
  // counter starts odd and grows by 2: it never becomes 0.
  while (atomic_fetch_add_explicit(counter, 2u, memory_order_relaxed) != 0u) {
  }
}

[[kernel]] void stack_hog(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                          uint tid [[thread_index_in_threadgroup]]) {
  float big[200000];  // 800 KB on a 128 KiB fiber stack
  for (uint i = 0; i < 200000; ++i) big[i] = x[tid] + float(i);
  out[tid] = big[x[tid] > 0.0f ? 7 : 9];
}

[[kernel]] void atomic_uninit(device uint* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup atomic_uint counter;  // never atomic_store'd
  out[tid] = atomic_fetch_add_explicit(&counter, 1u, memory_order_relaxed);
}
