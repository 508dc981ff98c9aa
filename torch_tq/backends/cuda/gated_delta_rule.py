"""The gated delta rule's entry ops on CUDA: FLA's Triton kernels when flash-linear-attention is installed.

FLA (``pip install torch_tq[cuda]``) is the reference implementation of these ops on NVIDIA GPUs,
with the same names, argument order, shapes and GVA convention; torch_tq does not rewrite it. It
is called only for CUDA tensors (its kernels cannot run elsewhere). Without it, CUDA tensors run
``gated_delta_torch``: the same math in plain PyTorch, arranged for a GPU (batched over chunks, one
kernel per chunk in the state pass), with the CPU reference's semantics; ``torch-tq info`` says
which is active.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, Optional

import torch

from ... import _gated_delta_validation as _v
from . import gated_delta_torch as _gpu_torch


_TORCH_PATH = "torch_tq's GPU-shaped PyTorch path (backends/cuda/gated_delta_torch.py)"


def fla_status() -> tuple[bool, str]:
    """(usable, reason): whether FLA's gated-delta kernels can serve the CUDA entry ops (imports now)."""
    try:
        _fla_ops()
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] != "fla":
            return False, f"flash-linear-attention does not import ({exc}); {_TORCH_PATH} runs"
        return False, f"flash-linear-attention is not installed (pip install torch_tq[cuda]); {_TORCH_PATH} runs"
    except Exception as exc:  # noqa: BLE001 - an FLA that does not import (wrong triton, ...) must not break torch_tq
        return False, f"flash-linear-attention does not import ({type(exc).__name__}: {exc}); {_TORCH_PATH} runs"
    return True, "flash-linear-attention"


def _fla_ops():
    return importlib.import_module("fla.ops.gated_delta_rule")


@functools.lru_cache(maxsize=None)
def _use_fla() -> bool:
    """Decided once per process: a failed import is not retried at every call."""
    return fla_status()[0]


def _entry(op: str, fla_name: str) -> Callable:
    torch_path = getattr(_gpu_torch, op)

    def kernel(q, k, v, g, beta, scale: Optional[float] = None, initial_state=None, output_final_state: bool = False,
               use_qk_l2norm_in_kernel: bool = False, cu_seqlens=None) -> tuple[torch.Tensor, torch.Tensor]:
        if not _use_fla():
            return torch_path(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                              cu_seqlens)
        geo = _v.check_gated_delta_rule(op, q, k, v, g, beta, scale, initial_state, cu_seqlens)
        # Keywords: FLA's fused_recurrent takes (q, k, v, g, gk, gv, beta, ...) positionally.
        o, final_state = getattr(_fla_ops(), fla_name)(
            q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(torch.long))
        if final_state is None:  # the schema returns an empty state instead of None
            final_state = q.new_empty((0, geo.value_heads, geo.head_dim, geo.value_dim), dtype=torch.float32)
        return o.to(q.dtype), final_state

    kernel.__name__ = op
    kernel.__doc__ = f"tq.{op} on CUDA: FLA's ``{fla_name}`` when installed, else ``gated_delta_torch.{op}``."
    return kernel


chunk_gated_delta_rule = _entry("chunk_gated_delta_rule", "chunk_gated_delta_rule")
fused_recurrent_gated_delta_rule = _entry("fused_recurrent_gated_delta_rule", "fused_recurrent_gated_delta_rule")
