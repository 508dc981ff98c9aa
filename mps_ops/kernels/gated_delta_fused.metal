// Instantiations of the fused chunked gated delta rule (the entry op tq.chunk_gated_delta_rule):
//   chunk_gated_delta_rule_<q/k/v/o dtype>_k<K>
// g, beta and the states are float32 (the host converts g and beta); V is a runtime size.
#include "utils.h"
#include "gated_delta_fused.h"

#define instantiate_chunk_gated_delta_rule(tname, type, kdim) \
  instantiate_kernel("chunk_gated_delta_rule_" #tname "_k" #kdim, chunk_gated_delta_rule, type, kdim)

#define instantiate_chunk_gated_delta_rule_dims(tname, type) \
  instantiate_chunk_gated_delta_rule(tname, type, 64)        \
  instantiate_chunk_gated_delta_rule(tname, type, 128)       \
  instantiate_chunk_gated_delta_rule(tname, type, 256)

instantiate_chunk_gated_delta_rule_dims(float32, float)
instantiate_chunk_gated_delta_rule_dims(float16, half)
TQ_IF_BFLOAT(instantiate_chunk_gated_delta_rule_dims(bfloat16, bfloat))
