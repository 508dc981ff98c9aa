"""Pure-PyTorch CPU implementations: the executable specification every other backend is tested against."""

from .kv_cache import kv_cache_copy
from .turboquant import dequantize_kv, flash_attn_vec_tq, hadamard_quantize_kv

__all__ = ["dequantize_kv", "flash_attn_vec_tq", "hadamard_quantize_kv", "kv_cache_copy"]
