#include "utils.h"
[[kernel]] void k(device float* out [[buffer(0)]], uint tid [[thread_position_in_grid]]) {
  if (out[tid] < 0.0f) throw 1;  // expect: exceptions
}
