#include "utils.h"
[[kernel]] void k(float* out [[buffer(0)]],  // expect: kernel-parameter-space
                  device const float* in [[buffer(1)]],
                  uint tid [[thread_position_in_grid]]) {
  out[tid] = in[tid];
}
