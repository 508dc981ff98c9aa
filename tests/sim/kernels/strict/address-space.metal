// Pointers keep their address space; constant memory is read-only.
#include "utils.h"
static void scale(device float* x, uint i) { x[i] *= 2.0f; }
static void clear(constant float* x) { x[0] = 0.0f; }  // expect: address-space
[[kernel]] void k(device float* out [[buffer(0)]], constant float* c [[buffer(1)]],
                  uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float buf[32];
  buf[tid] = c[0];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  scale(buf, tid);  // expect: address-space
  device float& first = c[0];  // expect: address-space
  out[tid] = buf[tid] + first;
}
