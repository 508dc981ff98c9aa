// A call that binds to the host C library (Metal has no sqrtf).
#include "utils.h"
[[kernel]] void k(device float* out [[buffer(0)]], uint tid [[thread_position_in_grid]]) {
  out[tid] = sqrtf(out[tid]);  // expect: std-library
}
