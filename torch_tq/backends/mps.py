"""Finds and loads the native MPS extension (``torch_tq._C_mps``) and reports whether it is usable.

The extension is built by ``setup.py`` on macOS only; importing it registers the Metal kernels for
the MPS dispatch key of ``torch.ops.tq``.
"""

from __future__ import annotations

import functools
import importlib
import sys


@functools.lru_cache(maxsize=None)
def status() -> tuple[bool, str]:
    """(available, reason): whether the MPS implementations of ``torch.ops.tq`` are registered."""
    if sys.platform != "darwin":
        return False, f"the Metal extension is only built on macOS (this is {sys.platform})"
    try:
        importlib.import_module("torch_tq._C_mps")
    except ImportError as exc:
        return False, f"the Metal extension torch_tq._C_mps is not built or failed to load ({exc})"
    import torch

    if not torch.backends.mps.is_available():
        return False, "the Metal extension is built, but torch.backends.mps.is_available() is False"
    return True, "native Metal extension loaded"
