"""The pure-PyTorch CPU reference of the TurboQuant ops (the executable specification, DESIGN §5).

``torch.ops.tq.*`` on CPU run the native C++ kernels when they are built (see
:mod:`torch_tq.backends.cpu_native`, and ``TQ_CPU_KERNELS=reference`` to use the reference there
too); these functions always run the reference, with the same arguments, validation and results::

    out = torch_tq.reference.flash_attn_vec_tq(q, k_codes, k_norms, v_codes, v_norms, kv_len, scale, bits)
"""

from .backends.cpu import dequantize_kv, flash_attn_vec_tq, hadamard_quantize_kv, kv_cache_copy

__all__ = ["dequantize_kv", "flash_attn_vec_tq", "hadamard_quantize_kv", "kv_cache_copy"]
