"""Which implementation of each ``torch.ops.tq`` op runs on which device, and why one is missing.

* ``cpu`` — native C++ kernels built just in time (``torch_tq.backends.cpu_native``), or the pure-PyTorch
  reference (``torch_tq.backends.cpu``) where they cannot be built; always available.
* ``mps`` — the native Objective-C++/Metal extension (``torch_tq.backends.mps``), built on macOS only.
* ``cuda`` — Triton kernels (``torch_tq.backends.cuda``): available when ``triton`` imports and
  ``torch.cuda.is_available()``.
"""

from __future__ import annotations

from typing import Optional

import torch


def backend_status() -> dict[str, tuple[bool, str]]:
    """``{device type: (available, reason)}`` for every backend torch_tq knows."""
    from . import cpu_native, cuda, mps

    return {
        "cpu": (True, cpu_native.status()[1]),
        "mps": mps.status(),
        "cuda": cuda.status(),
    }


def registered_backend_error(op: str, device: torch.device) -> Optional[str]:
    """None when ``tq.<op>`` has an implementation for ``device``; otherwise the reason why not."""
    device_type = torch.device(device).type
    if device_type in ("cpu", "meta"):
        return None
    available, reason = backend_status().get(device_type, (False, "torch_tq has no backend for this device type"))
    if available:
        return None
    return f"tq.{op}: no implementation for device '{device_type}': {reason}"
