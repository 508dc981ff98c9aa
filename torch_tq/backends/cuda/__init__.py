"""Triton kernels of the TurboQuant ops for the CUDA dispatch key.

Importing this package is cheap and never imports Triton: :func:`status` says whether the backend
can run, and :func:`op_impl` returns, per op, the function registered for the CUDA key, which
imports the kernel modules (``turboquant.py``, ``kv_cache.py``) at its first call.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Optional

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


def resolve_signs(signs: Optional[torch.Tensor], head_dim: int, device) -> torch.Tensor:
    """The sign vector the kernels receive: ``signs`` itself, or for ``None`` the canonical
    ``torch_tq.layout.hadamard_signs(head_dim)`` on ``device`` (cached)."""
    from ... import layout

    resolve = getattr(layout, "resolve_signs", None)
    if resolve is not None:
        return resolve(signs, head_dim, device)
    if signs is not None:
        return signs
    return _canonical_signs(head_dim, str(torch.device(device)))


@functools.lru_cache(maxsize=None)
def _canonical_signs(head_dim: int, device: str) -> torch.Tensor:
    from ...layout import hadamard_signs

    return hadamard_signs(head_dim, device=device)


def op_impl(op: str):
    """The CUDA-key implementation of ``tq.<op>``: imports its kernel module on first use."""
    module_name = _KERNEL_MODULE[op]

    def impl(*args, **kwargs):
        module = importlib.import_module(f"{__name__}.{module_name}")
        return getattr(module, op)(*args, **kwargs)

    impl.__name__ = f"{op}_cuda"
    return impl
