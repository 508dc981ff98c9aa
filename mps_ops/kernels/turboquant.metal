// Instantiations of the TurboQuant encode and decode kernels:
//   hadamard_quantize_kv_<src dtype>_d<D>_b<bits>   and   dequantize_kv_float32_d<D>_b<bits>.
#include "utils.h"
#include "turboquant.h"

#define instantiate_quantize(tname, type, D, BITS) \
  instantiate_kernel("hadamard_quantize_kv_" #tname "_d" #D "_b" #BITS, hadamard_quantize_kv, type, D, BITS)

#define instantiate_quantize_bits(tname, type, D) \
  instantiate_quantize(tname, type, D, 2)         \
  instantiate_quantize(tname, type, D, 3)         \
  instantiate_quantize(tname, type, D, 4)         \
  instantiate_quantize(tname, type, D, 5)         \
  instantiate_quantize(tname, type, D, 6)         \
  instantiate_quantize(tname, type, D, 8)

#define instantiate_quantize_dims(tname, type) \
  instantiate_quantize_bits(tname, type, 64)   \
  instantiate_quantize_bits(tname, type, 128)  \
  instantiate_quantize_bits(tname, type, 256)  \
  instantiate_quantize_bits(tname, type, 512)

instantiate_quantize_dims(float32, float)
instantiate_quantize_dims(float16, half)
TQ_IF_BFLOAT(instantiate_quantize_dims(bfloat16, bfloat))

#define instantiate_dequantize(D, BITS) \
  instantiate_kernel("dequantize_kv_float32_d" #D "_b" #BITS, dequantize_kv, D, BITS)

#define instantiate_dequantize_bits(D) \
  instantiate_dequantize(D, 2)         \
  instantiate_dequantize(D, 3)         \
  instantiate_dequantize(D, 4)         \
  instantiate_dequantize(D, 5)         \
  instantiate_dequantize(D, 6)         \
  instantiate_dequantize(D, 8)

instantiate_dequantize_bits(64)
instantiate_dequantize_bits(128)
instantiate_dequantize_bits(256)
instantiate_dequantize_bits(512)
