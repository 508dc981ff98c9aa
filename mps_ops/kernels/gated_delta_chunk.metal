// Instantiations of the chunked gated-delta-rule stages (beta, A, g, w, u, v_new, h and the states
// are always float32: the host converts them; V is a runtime size):
//   recompute_w_u_<k dtype>_<v dtype>   chunk_fwd_h_<k dtype>_k<K>   chunk_fwd_o_<q/k dtype>_float32
// (tq.chunk_fwd_o writes float32; the entry op chunk_gated_delta_rule has its own fused kernel,
// gated_delta_fused.metal, so no other output dtype is instantiated).
#include "utils.h"
#include "gated_delta_chunk.h"

#define instantiate_recompute_w_u(kname, ktype, vname, vtype) \
  instantiate_kernel("recompute_w_u_" #kname "_" #vname, recompute_w_u, ktype, vtype)

#define instantiate_recompute_w_u_k(kname, ktype)                   \
  instantiate_recompute_w_u(kname, ktype, float32, float)           \
  instantiate_recompute_w_u(kname, ktype, float16, half)            \
  TQ_IF_BFLOAT(instantiate_recompute_w_u(kname, ktype, bfloat16, bfloat))

#define instantiate_chunk_fwd_h(kname, ktype, kdim) \
  instantiate_kernel("chunk_fwd_h_" #kname "_k" #kdim, chunk_fwd_h, ktype, kdim)

#define instantiate_chunk_fwd_h_dims(kname, ktype) \
  instantiate_chunk_fwd_h(kname, ktype, 64)        \
  instantiate_chunk_fwd_h(kname, ktype, 128)       \
  instantiate_chunk_fwd_h(kname, ktype, 256)

#define instantiate_chunk_fwd_o(tname, type, oname, otype) \
  instantiate_kernel("chunk_fwd_o_" #tname "_" #oname, chunk_fwd_o, type, otype)


instantiate_recompute_w_u_k(float32, float)
instantiate_recompute_w_u_k(float16, half)
TQ_IF_BFLOAT(instantiate_recompute_w_u_k(bfloat16, bfloat))

instantiate_chunk_fwd_h_dims(float32, float)
instantiate_chunk_fwd_h_dims(float16, half)
TQ_IF_BFLOAT(instantiate_chunk_fwd_h_dims(bfloat16, bfloat))

instantiate_chunk_fwd_o(float32, float, float32, float)
instantiate_chunk_fwd_o(float16, half, float32, float)
TQ_IF_BFLOAT(instantiate_chunk_fwd_o(bfloat16, bfloat, float32, float))
