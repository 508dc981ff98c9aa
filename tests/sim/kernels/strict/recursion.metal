#include "utils.h"
static float sum_to(uint n) { return n == 0 ? 0.0f : float(n) + sum_to(n - 1); }  // expect: recursion
[[kernel]] void k(device float* out [[buffer(0)]], uint tid [[thread_position_in_grid]]) {
  out[tid] = sum_to(tid);
}
