"""Integrations of torch_tq with other libraries. Each submodule imports its library lazily (optional extras).

* :mod:`torch_tq.integrations.transformers` — ``TurboQuantCache`` and the ``"tq"`` attention
  implementation for Hugging Face transformers (``pip install "torch_tq[hf]"``).
  ``use_tq_gated_delta(model)`` routes Qwen3-Next / Qwen3.5 linear-attention layers through
  ``torch.ops.tq`` (implemented in :mod:`torch_tq.integrations.gated_delta`).
"""
