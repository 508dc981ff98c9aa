#include "utils.h"
[[kernel]] void k(device const half* a [[buffer(0)]], device float* out [[buffer(1)]]) {
  simdgroup_float8x8 m;
  simdgroup_load(m, a, 8);  // expect: simdgroup-matrix-type
  simdgroup_half8x8 h;
  simdgroup_multiply_accumulate(m, h, h, m);  // expect: simdgroup-matrix-type
  simdgroup_store(m, out, 8);
}
