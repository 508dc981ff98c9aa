// a * b + c written as two statements: one fused multiply-add under TQ_SIM_FP_CONTRACT=fast.
#include "utils.h"
[[kernel]] void mul_add(device const float* x [[buffer(0)]], device float* out [[buffer(1)]]) {
  const float product = x[0] * x[1];
  out[0] = product + x[2];
}
