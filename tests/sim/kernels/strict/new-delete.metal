#include "utils.h"
[[kernel]] void k(device float* out [[buffer(0)]], uint tid [[thread_position_in_grid]]) {
  float* scratch = new float[4];  // expect: new-delete
  scratch[0] = out[tid];
  out[tid] = scratch[0];
  delete[] scratch;  // expect: new-delete
}
