"""Builds the native MPS extension on macOS only; everywhere else torch_tq installs as pure Python.

The Metal backend (issue "MPS backend") fills in ``_mps_extension``; until then no platform builds
native code.
"""

import sys

from setuptools import setup


def _mps_extensions():
    if sys.platform != "darwin":
        return []
    return []


setup(ext_modules=_mps_extensions())
