#include "utils.h"
[[kernel]] void k(device float* out [[buffer(0)]], uint tid [[thread_position_in_grid]]) {
  if (tid == 0) goto done;  // expect: goto
  out[tid] = 1.0f;
done:
  return;
}
