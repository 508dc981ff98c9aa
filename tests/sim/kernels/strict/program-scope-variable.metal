#include "utils.h"
float calls;  // expect: program-scope-variable
constant float kScale = 2.0f;
[[kernel]] void k(device float* out [[buffer(0)]], uint tid [[thread_position_in_grid]]) {
  calls += 1.0f;
  out[tid] = calls * kScale;
}
