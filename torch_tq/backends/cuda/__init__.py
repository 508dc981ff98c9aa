"""The CUDA backend of ``torch.ops.tq``: Triton kernels of the TurboQuant ops (``turboquant.py``,
``kv_cache.py``) and FLA for the gated-delta ops (``gated_delta_rule.py``).

Importing this package is cheap and never imports Triton: :func:`status` says whether the Triton
kernels can run, and :func:`op_impl` returns, per TurboQuant op, the function registered for the CUDA
key, which imports its kernel module at its first call.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

OPS = ("hadamard_quantize_kv", "dequantize_kv", "flash_attn_vec_tq", "kv_cache_copy")
_KERNEL_MODULE = {"hadamard_quantize_kv": "turboquant", "dequantize_kv": "turboquant",
                  "flash_attn_vec_tq": "turboquant", "kv_cache_copy": "kv_cache"}


def triton_installed() -> bool:
    """Whether a ``triton`` package is installed (found without importing it)."""
    return importlib.util.find_spec("triton") is not None


def status() -> tuple[bool, str]:
    """(available, reason) of the CUDA backend: Triton importable and a CUDA device visible."""
    if not triton_installed():
        return False, "triton is not installed (pip install triton)"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False (no CUDA device, or a CPU-only torch build)"
    try:
        import triton
    except Exception as exc:  # noqa: BLE001  (any import failure is the reason)
        return False, f"triton is installed but does not import: {exc}"
    return True, f"Triton {triton.__version__} kernels"


def op_impl(op: str):
    """The CUDA-key implementation of ``tq.<op>``: imports its kernel module on first use."""
    module_name = _KERNEL_MODULE[op]
    resolved = []  # the kernel module's function, looked up once (a decode step calls this per layer)

    def impl(*args, **kwargs):
        if not resolved:
            resolved.append(getattr(importlib.import_module(f"{__name__}.{module_name}"), op))
        return resolved[0](*args, **kwargs)

    impl.__name__ = f"{op}_cuda"
    return impl
