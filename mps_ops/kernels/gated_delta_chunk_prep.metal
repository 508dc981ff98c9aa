// Instantiations of the first chunked gated-delta stages:
//   chunk_local_cumsum_<g dtype>, chunk_scaled_dot_kkt_<k dtype>, and solve_tril
//   (not a template: A is read in float32 only).
// g, beta and A of the later stages are float32 (the host converts them); K is a runtime size.
#include "utils.h"
#include "gated_delta_chunk_prep.h"

#define instantiate_gdr_chunk_prep(tname, type)                                        \
  instantiate_kernel("chunk_local_cumsum_" #tname, chunk_local_cumsum, type)           \
  instantiate_kernel("chunk_scaled_dot_kkt_" #tname, chunk_scaled_dot_kkt, type)

instantiate_gdr_chunk_prep(float32, float)
instantiate_gdr_chunk_prep(float16, half)
TQ_IF_BFLOAT(instantiate_gdr_chunk_prep(bfloat16, bfloat))
