#include "utils.h"
[[kernel]] void k(device float4* out [[buffer(0)]], uint tid [[thread_position_in_grid]]) {
  out[tid] = (float4)tid;  // expect: simulator-convention (a bit-cast in the simulator)
}
