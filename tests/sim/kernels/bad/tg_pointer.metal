#include "../../../../mps_ops/kernels/utils.h"
static inline float first(threadgroup float* p) { return p[0]; }
[[kernel]] void k(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float buf[32];
  buf[tid] = 1.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = first(buf);
}
