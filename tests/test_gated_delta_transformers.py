"""use_tq_gated_delta on tiny random-weight Qwen3-Next / Qwen3.5 models: logits equal the model's own torch fallback.

float32, <= 1e-4 relative RMS, for a prefill with a partial last chunk, prefill + decode steps
(the recurrent op with a cached state), and a second prefill on the existing cache (the chunked op
with an initial state). A spy checks that torch_tq's ops really ran.
"""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from torch_tq import _gated_delta_ops
from torch_tq.integrations.gated_delta import fla_available, fla_or_torch_fallback
from torch_tq.integrations.transformers import cache_kwargs, use_tq_gated_delta
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


def _tiny_pair(monkeypatch, module_name, config_name, model_name, extra):
    try:
        module = importlib.import_module(module_name)
        config_cls, model_cls = getattr(module, config_name), getattr(module, model_name)
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"the installed transformers has no {model_name} ({exc})")
    # The reference is the model's torch fallback on these CPU tensors, also where transformers bound FLA.
    modeling = sys.modules[model_cls.__module__]
    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"):
        monkeypatch.setattr(modeling, name, fla_or_torch_fallback(getattr(modeling, name), "cpu"))
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
def test_use_tq_gated_delta_matches_the_torch_fallback(model_id, module_name, config_name, model_name, extra, calls,
                                                       monkeypatch):
    reference, ours = _tiny_pair(monkeypatch, module_name, config_name, model_name, extra)
    prompt = torch.randint(0, 128, (2, 70))
    with torch.no_grad():
        ref, out = reference(prompt, use_cache=True), ours(prompt, use_cache=True)
        assert_close("prefill logits", ref.logits, out.logits, 1e-4)
        assert calls["chunk_gated_delta_rule"] == 2
        for step in range(2):
            token = torch.randint(0, 128, (2, 1))
            ref = reference(token, **cache_kwargs(ref.past_key_values), use_cache=True)
            out = ours(token, **cache_kwargs(out.past_key_values), use_cache=True)
            assert_close(f"decode step {step} logits", ref.logits, out.logits, 1e-4)
        assert calls["fused_recurrent_gated_delta_rule"] == 4
        more = torch.randint(0, 128, (2, 5))
        ref = reference(more, **cache_kwargs(ref.past_key_values), use_cache=True)
        out = ours(more, **cache_kwargs(out.past_key_values), use_cache=True)
        assert_close("second prefill logits", ref.logits, out.logits, 1e-4)
        assert calls["chunk_gated_delta_rule"] == 4


def test_other_models_keep_their_own_path(calls, monkeypatch):
    reference, _ = _tiny_pair(monkeypatch, *MODELS[0][1:])
    with torch.no_grad():
        reference(torch.randint(0, 128, (1, 10)))
    assert calls == {"chunk_gated_delta_rule": 0, "fused_recurrent_gated_delta_rule": 0}


# An FLA that imports but cannot run, as on a machine without a GPU (Triton: "0 active drivers").
_FAKE_FLA_KERNELS = """
def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kwargs):
    raise RuntimeError("0 active drivers ([]). There should only be one.")


fused_recurrent_gated_delta_rule = chunk_gated_delta_rule
"""


def _install_fake_fla(root: Path) -> Path:
    package = root / "fla" / "ops" / "gated_delta_rule"
    package.mkdir(parents=True)
    (root / "fla" / "__init__.py").write_text("")
    (root / "fla" / "ops" / "__init__.py").write_text("")
    (package / "__init__.py").write_text(_FAKE_FLA_KERNELS)
    return root


def test_fla_available_only_for_cuda_tensors(monkeypatch):
    fake = types.ModuleType("fla.ops.gated_delta_rule")
    exec(_FAKE_FLA_KERNELS, fake.__dict__)
    for name, module in (("fla", types.ModuleType("fla")), ("fla.ops", types.ModuleType("fla.ops")),
                         ("fla.ops.gated_delta_rule", fake)):
        monkeypatch.setitem(sys.modules, name, module)
    assert not fla_available("cpu") and not fla_available(torch.device("meta"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fla_available("cuda") and fla_available("cuda:1")
    monkeypatch.setitem(sys.modules, "fla.ops.gated_delta_rule", None)  # FLA not importable
    assert not fla_available("cuda")


def test_fla_or_torch_fallback_unwraps_on_cpu(monkeypatch):
    def torch_fallback(x):
        return "torch"

    def fla_kernel(x):
        raise RuntimeError("0 active drivers")

    fla_kernel.__wrapped__ = torch_fallback  # what transformers' functools.wraps leaves on its decorator
    assert fla_or_torch_fallback(fla_kernel, "cpu")(0) == "torch"
    monkeypatch.setattr("torch_tq.integrations.gated_delta.fla_available", lambda device: True)
    assert fla_or_torch_fallback(fla_kernel, "cuda") is fla_kernel


def test_gated_delta_benchmark_leaves_an_unrunnable_fla_out(tmp_path):
    """benchmarks/gated_delta.py at a tiny size with an FLA that imports but cannot run (transformers binds it)."""
    pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(_install_fake_fla(tmp_path)), str(root)]))
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "gated_delta.py"), "--T", "70", "--repeats", "1",
                          "--decode-repeats", "1", "--threads", "1"], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "FLA is installed but left out: its kernels need CUDA tensors" in out.stdout
    assert "—" not in out.stdout.split("reference:")[1], "a row disagreed with the reference"
