"""How a user reaches the transformers integration: attn_implementation="tq" whatever the import
order (fresh interpreters), and the cache passed to generate / forward without deprecation warnings."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")

TINY_LLAMA = dict(vocab_size=64, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=64)

_LOAD_WITH_TQ = f"""
from transformers import AutoModelForCausalLM, LlamaConfig
model = AutoModelForCausalLM.from_config(LlamaConfig(**{TINY_LLAMA!r}), attn_implementation="tq")
print(model.config._attn_implementation)
"""

IMPORT_ORDERS = {
    # `import torch_tq` must not import transformers (seconds): the registration waits for it.
    "torch_tq-first": "import sys, torch_tq\nassert 'transformers' not in sys.modules\n" + _LOAD_WITH_TQ,
    "transformers-first": "import transformers.modeling_utils\nimport torch_tq\n" + _LOAD_WITH_TQ,
}


@pytest.mark.parametrize("order", IMPORT_ORDERS)
def test_tq_attention_is_registered_whatever_the_import_order(order):
    out = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", textwrap.dedent(IMPORT_ORDERS[order])],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "tq"


def _tiny_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    import torch_tq.integrations.transformers  # noqa: F401

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA), attn_implementation="tq").eval()


def test_cache_kwargs_generate_and_forward_without_deprecation_warnings():
    import torch_tq.integrations.transformers as tqhf

    model = _tiny_model()
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (1, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = tqhf.TurboQuantCache(model.config, bits=8)
        out = model.generate(ids, **tqhf.cache_kwargs(cache), max_new_tokens=3, do_sample=False,
                             pad_token_id=0)
        assert cache.get_seq_length() == out.shape[1] - 1, "generate did not use the cache it was given"
        forward_cache = tqhf.TurboQuantCache(model.config, bits=8)
        with torch.no_grad():
            model(ids, **tqhf.cache_kwargs(forward_cache))
        assert forward_cache.get_seq_length() == ids.shape[1]


def test_cache_kwargs_uses_the_name_the_installed_transformers_declares():
    import inspect

    from transformers import GenerationMixin

    import torch_tq.integrations.transformers as tqhf

    (name,) = tqhf.cache_kwargs(None)
    assert name in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
