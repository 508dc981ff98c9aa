#include "utils.h"
struct Op {
  virtual float apply(float x) const { return x; }  // expect: virtual
};
[[kernel]] void k(device float* out [[buffer(0)]], uint tid [[thread_position_in_grid]]) {
  Op op;
  out[tid] = op.apply(out[tid]);
}
