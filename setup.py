"""Builds the native MPS extension ``torch_tq._C_mps`` on macOS only; elsewhere torch_tq installs as pure Python.

On macOS build against the torch you run with: ``pip install --no-build-isolation -e .``
(an isolated build environment may fetch a different torch, whose ABI the extension would not match).
The extension definition (sources, embedded Metal source, frameworks) lives in mps_ops/build_config.py.
"""

import sys
from pathlib import Path

from setuptools import setup


def _mps_build() -> dict:
    if sys.platform != "darwin":
        return {}
    from torch.utils.cpp_extension import BuildExtension

    sys.path.insert(0, str(Path(__file__).resolve().parent / "mps_ops"))
    from build_config import mps_extension

    return dict(ext_modules=[mps_extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})


setup(**_mps_build())
