#include "utils.h"
#include <array>  // expect: std-library
[[kernel]] void k(device float* out [[buffer(0)]], uint tid [[thread_position_in_grid]]) {
  out[tid] = std::max(out[tid], 0.0f);  // expect: std-library
}
