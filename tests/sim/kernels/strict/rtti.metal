#include "utils.h"
struct Base { int kind; };
[[kernel]] void k(device float* out [[buffer(0)]], uint tid [[thread_position_in_grid]]) {
  Base b{1};
  out[tid] = sizeof(typeid(b));  // expect: rtti
}
