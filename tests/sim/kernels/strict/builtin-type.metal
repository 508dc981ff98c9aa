#include "utils.h"
[[kernel]] void k(device float* out [[buffer(0)]],
                  float x [[thread_position_in_grid]],  // expect: builtin-type
                  uint3 lane [[thread_index_in_simdgroup]],  // expect: builtin-type
                  int sg [[simdgroup_index_in_threadgroup]]) {  // expect: builtin-type
  out[uint(x)] = float(lane.x + sg);
}
[[kernel]] void mixed(device float* out [[buffer(0)]],  // expect: builtin-type
                      uint2 gid [[threadgroup_position_in_grid]],
                      uint3 groups [[threadgroups_per_grid]]) {
  out[gid.x] = float(groups.x);
}
