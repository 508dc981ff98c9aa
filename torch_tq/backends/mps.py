"""Finds and loads the native MPS extension (``torch_tq._C_mps``) and reports whether it is usable.

The extension is built by ``setup.py`` on macOS only; importing it registers the Metal kernels for
the MPS dispatch key of ``torch.ops.tq``.
"""

from __future__ import annotations

import functools
import importlib
import sys
import warnings


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


def warmup() -> list[str]:
    """Compiles every Metal kernel family now rather than at the first call of one of its ops.

    The Metal kernels are compiled from source, one library per family (``mps_ops/kernels/*.metal``)
    at the first use of that family, which takes noticeable time once per process; call this at
    start-up to pay it ahead of time. Returns the names of the families compiled. A family that
    does not compile raises ``RuntimeError`` here with Metal's error message (the other families
    are compiled all the same, and their ops keep working). Without a usable MPS backend (not
    macOS, extension not built, no MPS device) this does nothing, warns why, and returns ``[]``.
    """
    available, reason = status()
    if not available:
        warnings.warn(f"torch_tq.backends.mps.warmup(): nothing to compile: {reason}", RuntimeWarning, stacklevel=2)
        return []
    results = importlib.import_module("torch_tq._C_mps").compile_metal_families()
    failed = {family: error for family, error in results.items() if error}
    if failed:
        details = "\n".join(f"  {family} (mps_ops/kernels/{family}.metal): {error}" for family, error in sorted(failed.items()))
        raise RuntimeError(f"torch_tq: {len(failed)} Metal kernel famil{'y' if len(failed) == 1 else 'ies'} failed to "
                           f"compile; the ops using them raise this error, the others work:\n{details}")
    return sorted(results)
