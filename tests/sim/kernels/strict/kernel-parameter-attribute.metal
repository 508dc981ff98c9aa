#include "utils.h"
[[kernel]] void k(device float* out [[buffer(0)]],
                  uint tid) {  // expect: kernel-parameter-attribute
  out[tid] = 1.0f;
}
