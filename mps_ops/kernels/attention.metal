// Instantiations of tq.flash_attn_vec_tq:
//   flash_attn_vec_tq_<q dtype>_d<D>_b<bits>   and   flash_attn_vec_tq_reduce_<q dtype>_d<D>.
#include "utils.h"
#include "attention.h"

#define instantiate_attention(tname, type, D, BITS) \
  instantiate_kernel("flash_attn_vec_tq_" #tname "_d" #D "_b" #BITS, flash_attn_vec_tq, type, D, BITS)

#define instantiate_attention_dim(tname, type, D)                                       \
  instantiate_attention(tname, type, D, 2)                                              \
  instantiate_attention(tname, type, D, 3)                                              \
  instantiate_attention(tname, type, D, 4)                                              \
  instantiate_attention(tname, type, D, 5)                                              \
  instantiate_attention(tname, type, D, 6)                                              \
  instantiate_attention(tname, type, D, 8)                                              \
  instantiate_kernel("flash_attn_vec_tq_reduce_" #tname "_d" #D, flash_attn_vec_tq_reduce, type, D)

#define instantiate_attention_dtype(tname, type) \
  instantiate_attention_dim(tname, type, 64)     \
  instantiate_attention_dim(tname, type, 128)    \
  instantiate_attention_dim(tname, type, 256)    \
  instantiate_attention_dim(tname, type, 512)

instantiate_attention_dtype(float32, float)
instantiate_attention_dtype(float16, half)
TQ_IF_BFLOAT(instantiate_attention_dtype(bfloat16, bfloat))
