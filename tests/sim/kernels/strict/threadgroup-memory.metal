#include "utils.h"
[[kernel]] void k(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {  // expect: threadgroup-memory
  threadgroup float a[4096];
  threadgroup float b[4096];
  threadgroup float c[32];
  a[tid] = out[tid];
  b[tid] = out[tid];
  c[tid] = out[tid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = a[4095 - tid] + b[tid] + c[31 - tid];
}
