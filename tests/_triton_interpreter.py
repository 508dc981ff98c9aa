"""The CUDA backend's Triton kernels, loaded in the Triton interpreter so they run on CPU tensors.

``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a function, triton.language's own helpers
(``tl.sum``, ``tl.max``) included, so the variable must be set before ``triton`` is first imported:
tests/conftest.py sets it for the session where CUDA is unavailable. :func:`interpreted_kernels`
imports the kernel modules fresh (a GPU run may have imported compiled copies) and puts the previous
ones back afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

import pytest

MODULES = ("torch_tq.backends.cuda.turboquant", "torch_tq.backends.cuda.kv_cache")


@contextlib.contextmanager
def interpreted_kernels():
    """Yields ``(turboquant, kv_cache)``, the kernel modules with every kernel an interpreter function."""
    pytest.importorskip("triton", reason="triton is not installed: pip install -e '.[test]' installs it, and the "
                                         "CUDA backend's kernels are tested on CPU through its interpreter")
    from triton import knobs

    if not knobs.runtime.interpret:
        pytest.skip("TRITON_INTERPRET is not set (tests/conftest.py sets it only where CUDA is unavailable): these "
                    "tests run the kernels on CPU tensors in the interpreter; run them with TRITON_INTERPRET=1, and "
                    "benchmarks/cuda_ops.py checks every op on the GPU")
    import torch_tq.backends.cuda as package

    saved = {name: sys.modules.pop(name, None) for name in MODULES}
    saved_attrs = {name: getattr(package, name.rsplit(".", 1)[1], None) for name in MODULES}
    modules = tuple(importlib.import_module(name) for name in MODULES)
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(modules[0].hadamard_quantize_kv_fwd_kernel, InterpretedFunction)
    try:
        yield modules
    finally:
        for name in MODULES:
            short = name.rsplit(".", 1)[1]
            if saved[name] is None:
                sys.modules.pop(name, None)
                if hasattr(package, short):
                    delattr(package, short)
            else:
                sys.modules[name] = saved[name]
                setattr(package, short, saved_attrs[name])
