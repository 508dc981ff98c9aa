// Instantiations of tq.fused_recurrent_gated_delta_rule: fused_recurrent_gated_delta_rule_<q dtype>_k<K>
// (g and beta are always float32: the host converts them; V is a runtime size).
#include "utils.h"
#include "gated_delta_recurrent.h"

#define instantiate_fused_recurrent_gdr(tname, type, kdim) \
  instantiate_kernel("fused_recurrent_gated_delta_rule_" #tname "_k" #kdim, fused_recurrent_gated_delta_rule, type, kdim)

#define instantiate_fused_recurrent_gdr_dims(tname, type) \
  instantiate_fused_recurrent_gdr(tname, type, 64)         \
  instantiate_fused_recurrent_gdr(tname, type, 128)        \
  instantiate_fused_recurrent_gdr(tname, type, 256)

instantiate_fused_recurrent_gdr_dims(float32, float)
instantiate_fused_recurrent_gdr_dims(float16, half)
TQ_IF_BFLOAT(instantiate_fused_recurrent_gdr_dims(bfloat16, bfloat))
