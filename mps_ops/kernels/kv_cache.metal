// Instantiations of tq.kv_cache_copy: kv_cache_copy_<src dtype>_<cache dtype>.
#include "utils.h"
#include "kv_cache.h"

#define instantiate_kv_cache_copy(sname, stype, cname, ctype) \
  instantiate_kernel("kv_cache_copy_" #sname "_" #cname, kv_cache_copy, stype, ctype)

#define instantiate_kv_cache_copy_to(cname, ctype)                   \
  instantiate_kv_cache_copy(float32, float, cname, ctype)            \
  instantiate_kv_cache_copy(float16, half, cname, ctype)             \
  TQ_IF_BFLOAT(instantiate_kv_cache_copy(bfloat16, bfloat, cname, ctype))

instantiate_kv_cache_copy_to(float32, float)
instantiate_kv_cache_copy_to(float16, half)
TQ_IF_BFLOAT(instantiate_kv_cache_copy_to(bfloat16, bfloat))
