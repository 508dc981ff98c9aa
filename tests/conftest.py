import os
import zlib
import sys

import pytest
import torch

# Tests import the oracle helpers next to them.
sys.path.insert(0, os.path.dirname(__file__))

# The CUDA backend's Triton kernels are tested on CPU tensors in Triton's interpreter
# (tests/test_cuda_triton.py). triton.jit reads TRITON_INTERPRET when it decorates a function, also
# triton.language's own helpers (tl.sum, tl.max) at `import triton`, and torch.compile imports triton,
# so the variable is set here, before any test imports it. Where CUDA is unavailable no Triton kernel
# can run compiled, so nothing else changes; on a GPU machine it is left alone.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A distinct, reproducible seed per test: fresh random inputs, never zeros."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of many tiny shapes: avoids OpenMP hand-offs on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
