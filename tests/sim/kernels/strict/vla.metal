#include "utils.h"
[[kernel]] void k(device float* out [[buffer(0)]], constant uint& n [[buffer(1)]],
                  uint tid [[thread_position_in_grid]]) {
  float values[n];  // expect: vla
  values[0] = out[tid];
  out[tid] = values[0];
}
