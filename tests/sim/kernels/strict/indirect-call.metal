#include "utils.h"
static float twice(float x) { return 2.0f * x; }
static float half_of(float x) { return 0.5f * x; }
[[kernel]] void k(device float* out [[buffer(0)]], uint tid [[thread_position_in_grid]]) {
  float (*op)(float) = tid % 2 ? twice : half_of;
  out[tid] = op(out[tid]);  // expect: indirect-call
}
