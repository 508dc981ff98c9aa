"""Route transformers' Qwen3-Next / Qwen3.5 linear-attention layers through ``torch.ops.tq``.

transformers' gated-delta-rule layers (``Qwen3NextGatedDeltaNet``, ``Qwen3_5GatedDeltaNet``, ...)
call two module-level functions of their modeling file, ``torch_chunk_gated_delta_rule`` (prefill)
and ``torch_recurrent_gated_delta_rule`` (one-token decode with a cached state). Without FLA those
are transformers' pure-PyTorch fallbacks. :func:`use_tq_gated_delta` replaces the two names in
the model's modeling module, once per module, by dispatchers that call torch_tq's
``chunk_gated_delta_rule`` / ``fused_recurrent_gated_delta_rule`` while a switched layer is running
and the original function otherwise, so other models in the process keep their own path. A
switched layer's ``forward`` marks the running layer in a thread-local counter.

FLA (``flash-linear-attention``) imports on machines without a GPU but its Triton kernels run on
CUDA tensors only, while transformers (5.x) binds those two names to FLA's kernels whenever FLA
imports. :func:`fla_available` says where FLA can run; :func:`fla_or_torch_fallback` gives the
function to compare with on a device (the benchmarks and tests use both).
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import types

import torch

from .. import _gated_delta_ops

# transformers' name -> torch_tq's name (looked up at call time).
_FUNCTIONS = {
    "torch_chunk_gated_delta_rule": "chunk_gated_delta_rule",
    "torch_recurrent_gated_delta_rule": "fused_recurrent_gated_delta_rule",
}
_running = threading.local()


def _depth() -> int:
    return getattr(_running, "depth", 0)


def _dispatcher(original, tq_name: str):
    @functools.wraps(original)
    def dispatch(query, key, value, g, beta, *args, **kwargs):
        if _depth() == 0 or args:
            return original(query, key, value, g, beta, *args, **kwargs)
        # transformers passes everything after beta by keyword; chunk_size (always 64 there) and
        # any other keyword it forwards do not change the result.
        o, state = getattr(_gated_delta_ops, tq_name)(
            query, key, value, g, beta,
            initial_state=kwargs.get("initial_state"),
            output_final_state=kwargs.get("output_final_state", False),
            use_qk_l2norm_in_kernel=kwargs.get("use_qk_l2norm_in_kernel", False),
            cu_seqlens=kwargs.get("cu_seqlens"),
        )
        return o, state

    dispatch._tq_original = original
    return dispatch


def _install(module: types.ModuleType) -> None:
    for hf_name, tq_name in _FUNCTIONS.items():
        current = getattr(module, hf_name)
        if not hasattr(current, "_tq_original"):
            setattr(module, hf_name, _dispatcher(current, tq_name))


def _is_gated_delta_layer(layer: torch.nn.Module) -> bool:
    module = sys.modules.get(type(layer).__module__)
    return (type(layer).__name__.endswith("GatedDeltaNet") and module is not None
            and all(hasattr(module, name) for name in _FUNCTIONS))


def use_tq_gated_delta(model: torch.nn.Module) -> int:
    r"""Make every gated-delta-rule linear-attention layer of ``model`` use torch_tq's ops.

    Works for the transformers models whose linear-attention layers call
    ``torch_chunk_gated_delta_rule`` / ``torch_recurrent_gated_delta_rule`` (Qwen3-Next and, when the
    installed transformers has them, Qwen3.5 / Qwen3.5-MoE), on any device torch_tq serves. The
    model's caches, masks and weights are untouched; calling it again is a no-op.

    Args:
        model (torch.nn.Module): a transformers model (or any module containing such layers).

    Returns:
        int: the number of layers switched (0 when the model has none).
    """
    switched = 0
    for layer in model.modules():
        if not _is_gated_delta_layer(layer):
            continue
        switched += 1
        if getattr(layer, "_tq_gated_delta", False):
            continue
        _install(sys.modules[type(layer).__module__])
        forward = layer.forward

        def tq_forward(self, *args, _forward=forward, **kwargs):
            _running.depth = _depth() + 1
            try:
                return _forward(*args, **kwargs)
            finally:
                _running.depth -= 1

        layer.forward = types.MethodType(tq_forward, layer)
        layer._tq_gated_delta = True
    return switched


def fla_available(device) -> bool:
    """Whether FLA's Triton kernels can run on tensors of ``device``: a CUDA device that torch can
    use, and FLA's gated-delta ops import."""
    from ..backends.cuda.gated_delta_rule import fla_status

    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and fla_status()[0]


def fla_or_torch_fallback(function, device):
    """transformers' gated-delta ``function`` (e.g. ``torch_chunk_gated_delta_rule``) as it can run on ``device``.

    Returned as bound when :func:`fla_available` (it may then be FLA's kernel), else transformers'
    pure-PyTorch function underneath the decorator that swaps in FLA (the function itself on
    transformers versions without that decorator).
    """
    return function if fla_available(device) else inspect.unwrap(function)
