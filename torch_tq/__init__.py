"""torch_tq: TurboQuant KV-cache compression and fused decode attention as ``torch.ops.tq`` custom ops.

Importing the package defines the op library (``torch.ops.tq.*``), registers every backend
available on this machine, and makes ``attn_implementation="tq"`` known to Hugging Face transformers
once transformers is imported (see :mod:`torch_tq.integrations`).
"""

from . import _gated_delta_ops, _ops, reference
from . import integrations as _integrations
from ._ops import dequantize_kv, flash_attn_vec_tq, hadamard_quantize_kv, kv_cache_copy
from ._gated_delta_ops import (
    chunk_fwd_h,
    chunk_fwd_o,
    chunk_gated_delta_rule,
    chunk_local_cumsum,
    chunk_scaled_dot_kkt,
    fused_recurrent_gated_delta_rule,
    recompute_w_u,
    solve_tril,
)
from .backends import backend_status
from .backends import mps as _mps
from .codebooks import lloyd_max_codebook
from .layout import QuantizedKV, allocate_quantized_kv, hadamard_signs, quantized_nbytes

# Load the native Metal extension when it was built (macOS), so torch.ops.tq.* dispatch to it.
_mps.status()
# attn_implementation="tq" for transformers, registered when (and only if) transformers is imported.
_integrations.register_tq_attention_when_transformers_loads()

__version__ = "0.1.0"

__all__ = [
    "QuantizedKV",
    "allocate_quantized_kv",
    "backend_status",
    "dequantize_kv",
    "flash_attn_vec_tq",
    "hadamard_quantize_kv",
    "hadamard_signs",
    "kv_cache_copy",
    "lloyd_max_codebook",
    "quantized_nbytes",
]
__all__ += _gated_delta_ops.__all__
