#include "utils.h"
[[kernel]] void k(device float* out [[buffer(0)]],
                  device const float* in [[buffer(0)]],  // expect: buffer-index
                  device const float* far [[buffer(31)]],  // expect: buffer-index
                  uint tid [[thread_position_in_grid]]) {
  out[tid] = in[tid] + far[tid];
}
