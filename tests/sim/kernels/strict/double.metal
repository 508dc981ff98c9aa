#include "utils.h"
[[kernel]] void k(device float* out [[buffer(0)]], uint tid [[thread_position_in_grid]]) {
  double acc = 0;  // expect: double
  float x = out[tid];
  out[tid] = x * 0.5;  // expect: double
}
