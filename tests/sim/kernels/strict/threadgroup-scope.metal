#include "utils.h"
static float staged(float x, uint tid) {
  threadgroup float buf[32];  // expect: threadgroup-scope
  buf[tid] = x;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return buf[31 - tid];
}
[[kernel]] void k(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  out[tid] = staged(out[tid], tid);
}
