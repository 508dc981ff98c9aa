"""use_tq_gated_delta on tiny random-weight Qwen3-Next / Qwen3.5 models: logits equal the model's own torch fallback.

float32, <= 1e-4 relative RMS, for a prefill with a partial last chunk, prefill + decode steps
(the recurrent op with a cached state), and a second prefill on the existing cache (the chunked op
with an initial state). A spy checks that torch_tq's ops really ran.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from torch_tq import _gated_delta_ops
from torch_tq.integrations.transformers import use_tq_gated_delta
from _utils import assert_close

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
            layer_types=["linear_attention", "full_attention", "linear_attention"], num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=64, linear_value_head_dim=128)

MODELS = [
    # id, modeling module, config class, model class, extra config
    ("qwen3_next", "transformers.models.qwen3_next", "Qwen3NextConfig", "Qwen3NextForCausalLM",
     dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    ("qwen3_5", "transformers.models.qwen3_5", "Qwen3_5TextConfig", "Qwen3_5ForCausalLM", {}),
]


def _tiny_pair(module_name, config_name, model_name, extra):
    try:
        module = importlib.import_module(module_name)
        config_cls, model_cls = getattr(module, config_name), getattr(module, model_name)
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"the installed transformers has no {model_name} ({exc})")
    reference = model_cls(config_cls(**TINY, **extra)).eval()
    ours = copy.deepcopy(reference)
    assert use_tq_gated_delta(ours) == 2
    assert use_tq_gated_delta(ours) == 2  # idempotent
    return reference, ours


@pytest.fixture
def calls(monkeypatch):
    counts = {"chunk_gated_delta_rule": 0, "fused_recurrent_gated_delta_rule": 0}
    for name in counts:
        fn = getattr(_gated_delta_ops, name)

        def spy(*args, _fn=fn, _name=name, **kwargs):
            counts[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(_gated_delta_ops, name, spy)
    return counts


@pytest.mark.parametrize("model_id, module_name, config_name, model_name, extra", MODELS, ids=[m[0] for m in MODELS])
def test_use_tq_gated_delta_matches_the_torch_fallback(model_id, module_name, config_name, model_name, extra, calls):
    reference, ours = _tiny_pair(module_name, config_name, model_name, extra)
    prompt = torch.randint(0, 128, (2, 70))
    with torch.no_grad():
        ref, out = reference(prompt, use_cache=True), ours(prompt, use_cache=True)
        assert_close("prefill logits", ref.logits, out.logits, 1e-4)
        assert calls["chunk_gated_delta_rule"] == 2
        for step in range(2):
            token = torch.randint(0, 128, (2, 1))
            ref = reference(token, past_key_values=ref.past_key_values, use_cache=True)
            out = ours(token, past_key_values=out.past_key_values, use_cache=True)
            assert_close(f"decode step {step} logits", ref.logits, out.logits, 1e-4)
        assert calls["fused_recurrent_gated_delta_rule"] == 4
        more = torch.randint(0, 128, (2, 5))
        ref = reference(more, past_key_values=ref.past_key_values, use_cache=True)
        out = ours(more, past_key_values=out.past_key_values, use_cache=True)
        assert_close("second prefill logits", ref.logits, out.logits, 1e-4)
        assert calls["chunk_gated_delta_rule"] == 4


def test_other_models_keep_their_own_path(calls):
    reference, _ = _tiny_pair(*MODELS[0][1:])
    with torch.no_grad():
        reference(torch.randint(0, 128, (1, 10)))
    assert calls == {"chunk_gated_delta_rule": 0, "fused_recurrent_gated_delta_rule": 0}
