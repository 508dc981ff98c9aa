"""Integrations of torch_tq with other libraries. Each submodule imports its library lazily (optional extras).

* :mod:`torch_tq.integrations.transformers` — ``TurboQuantCache`` and the ``"tq"`` attention
  implementation for Hugging Face transformers (``pip install "torch_tq[hf]"``).
  ``use_tq_gated_delta(model)`` routes Qwen3-Next / Qwen3.5 linear-attention layers through
  ``torch.ops.tq`` (implemented in :mod:`torch_tq.integrations.gated_delta`).

``import torch_tq`` registers ``attn_implementation="tq"`` with transformers without importing it:
:func:`register_tq_attention_when_transformers_loads` runs when the package is imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# transformers' attention registry (AttentionInterface) lives here; from_pretrained needs it.
_TRANSFORMERS_MODULE = "transformers.modeling_utils"
_INTEGRATION_MODULE = "torch_tq.integrations.transformers"


def _register_tq_attention() -> None:
    try:
        importlib.import_module(_INTEGRATION_MODULE)  # registers "tq" as an import side effect
    except ImportError:
        pass  # transformers too old or incomplete: importing the integration by hand says why
    except Exception as exc:  # noqa: BLE001 - never break the user's transformers import
        warnings.warn(f"torch_tq could not register attn_implementation='tq' with transformers: {exc!r}; "
                      f"import {_INTEGRATION_MODULE} to see the error", stacklevel=2)


class _RegisterAfterTransformersImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when transformers' modeling_utils is about to load, it makes the real
    loader register the "tq" attention right after the module has run, then removes itself."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRANSFORMERS_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader  # a loader object of this module alone; patched on the instance only
        run_module = loader.exec_module

        def exec_module(module):
            try:
                run_module(module)
            finally:
                del loader.exec_module
            _register_tq_attention()

        loader.exec_module = exec_module
        return spec


def register_tq_attention_when_transformers_loads() -> None:
    """Make ``attn_implementation="tq"`` known to transformers however the imports are ordered.

    Registers now when transformers' model code is already imported; otherwise right after it is
    imported (a one-shot import hook), so ``import torch_tq`` never imports transformers itself
    (that takes seconds). Called by ``import torch_tq``. Without any torch_tq import, transformers
    does not know "tq": import ``torch_tq.integrations.transformers`` (or ``torch_tq``) first.
    """
    if _TRANSFORMERS_MODULE in sys.modules:
        _register_tq_attention()
    elif not any(isinstance(finder, _RegisterAfterTransformersImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformersImport())
