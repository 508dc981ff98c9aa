"""torch.compile of a decode step's attention/cache code: one graph (fullgraph), no recompilation per token,
the custom ops' fake kernels and in-place schemas traced through AOT autograd, and the eager result."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

import torch_tq.integrations.transformers as tqhf  # noqa: E402
from test_transformers_integration import V, tiny_llama, tiny_qwen2_sliding  # noqa: E402


@torch.no_grad()
@pytest.mark.parametrize("model_name", ["llama", "qwen2_sliding"])
def test_compiled_attention_decode_steps_match_eager_without_recompiling(model_name):
    torch._dynamo.reset()
    build = tiny_llama if model_name == "llama" else tiny_qwen2_sliding
    model = build()
    compiled = copy.deepcopy(model)
    ids = torch.randint(1, V, (1, 20))
    caches = [tqhf.TurboQuantCache(m.config, bits=4, v_bits=3, max_cache_len=64) for m in (model, compiled)]
    # The prefill allocates the cache (eager); the decode steps after it run compiled.
    token = model(ids, past_key_values=caches[0]).logits[:, -1:].argmax(-1)
    compiled(ids, past_key_values=caches[1])
    counters = []
    for layer in compiled.model.layers:
        # aot_eager: Dynamo's graph, then AOT autograd's functionalization of the in-place tq ops
        # through their fake kernels, run eagerly (no C++ compiler needed).
        counter = CompileCounterWithBackend("aot_eager")
        layer.self_attn.forward = torch.compile(layer.self_attn.forward, fullgraph=True, backend=counter)
        counters.append(counter)
    steps = 8
    for step in range(steps):
        eager = model(token, past_key_values=caches[0]).logits[:, -1:]
        comp = compiled(token, past_key_values=caches[1]).logits[:, -1:]
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)
        token = eager.argmax(-1)
        if step == 1:
            frames_after_warmup = [c.frame_count for c in counters]
    # The first step compiles with the length as a constant; the second recompiles once with it
    # dynamic (Dynamo's automatic dynamic shapes); every later token reuses that graph.
    assert frames_after_warmup == [2] * len(counters), frames_after_warmup
    assert [c.frame_count for c in counters] == frames_after_warmup, "recompiled during decode"
    assert caches[1].get_seq_length() == 20 + steps
