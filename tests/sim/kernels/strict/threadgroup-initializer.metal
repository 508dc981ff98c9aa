#include "utils.h"
[[kernel]] void k(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float buf[32] = {};  // expect: threadgroup-initializer
  buf[tid] += out[tid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = buf[31 - tid];
}
