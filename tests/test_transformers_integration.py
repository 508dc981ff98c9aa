"""torch_tq.integrations.transformers: TurboQuantCache + the "tq" attention on tiny random-weight models."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import torch_tq  # noqa: E402
import torch_tq.integrations.transformers as tqhf  # noqa: E402

V = 256
COMMON = dict(vocab_size=V, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, max_position_embeddings=512, initializer_range=0.04,
              eos_token_id=None, bos_token_id=None, pad_token_id=0)


def tiny_llama(seed: int = 0, attn: str = "tq") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**COMMON, attn_implementation=attn)).eval()


def tiny_qwen2_sliding(window: int = 8) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=window, max_window_layers=1,
                      layer_types=["full_attention", "sliding_attention"], attn_implementation="tq")
    return Qwen2ForCausalLM(cfg).eval()


@torch.no_grad()
def chunked_logits(model, ids, cache, prefix, chunk, mask=None):
    """Teacher-forced logits: prefill ``prefix`` tokens, then ``chunk`` tokens per forward call."""
    def m(a, b):
        return None if mask is None else mask[:, :b]
    outs = [model(ids[:, :prefix], attention_mask=m(0, prefix), past_key_values=cache).logits]
    for s in range(prefix, ids.shape[1], chunk):
        e = min(s + chunk, ids.shape[1])
        outs.append(model(ids[:, s:e], attention_mask=m(s, e), past_key_values=cache).logits)
    return torch.cat(outs, dim=1)


class _Recorder(TorchDispatchMode):
    """Counts torch.ops.tq calls and records every floating-point tensor allocated outside them.

    Ops inside a tq kernel are not seen (the mode is inactive while it handles a call), so what is
    recorded is exactly what the model and the cache allocate around the fused kernels.
    """

    def __init__(self):
        super().__init__()
        self.tq_calls: dict[str, int] = {}
        self.float_shapes: list[tuple[str, tuple[int, ...]]] = []
        self.dequantize_lengths: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if name.startswith("tq."):
            self.tq_calls[name] = self.tq_calls.get(name, 0) + 1
            if name == "tq.dequantize_kv":
                self.dequantize_lengths.append(args[3])
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # Fresh floating-point allocations only (views such as weight transposes share storage).
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.untyped_storage().data_ptr() not in inputs:
                self.float_shapes.append((name, tuple(t.shape)))
        return out


def _greedy_margin(model, ids, new_tokens):
    """(greedy continuation with the full-precision cache, smallest top-1/top-2 logit gap along it)."""
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, past_key_values=DynamicCache(config=model.config))
    logits = model(out).logits[0, ids.shape[1] - 1 : -1]
    top2 = logits.topk(2, dim=-1).values
    return out, (top2[:, 0] - top2[:, 1]).min().item()


@torch.no_grad()
def test_greedy_8bit_matches_full_precision():
    # Random tiny models have near-tied logits (top-1/top-2 gaps of 1e-3..3e-2, against an 8-bit logit
    # error of ~2e-2). Take the first seed whose full-precision greedy path keeps a gap of 1.5x the
    # measured 8-bit logit error at every step; a broken cache has a large error and fails here.
    for seed in range(12):
        model = tiny_llama(seed)
        ids = torch.randint(1, V, (1, 12))
        ref, margin = _greedy_margin(model, ids, 24)
        tf = chunked_logits(model, ref, tqhf.TurboQuantCache(model.config, bits=8), prefix=12, chunk=1)
        err = (tf - model(ref).logits).abs().max().item()
        assert err < 0.1, f"8-bit logit error {err:.3f} is far above TurboQuant's"
        if margin > 1.5 * err:
            break
    else:
        pytest.fail("no seed with a clear greedy margin")
    cache = tqhf.TurboQuantCache(model.config, bits=8)
    out = model.generate(ids, max_new_tokens=24, do_sample=False, past_key_values=cache)
    assert torch.equal(out, ref), "8-bit TurboQuant greedy generation diverged from the full-precision cache"
    assert cache.get_seq_length() == 12 + 24 - 1


@torch.no_grad()
@pytest.mark.parametrize("bits,max_err", [(8, 0.1), (4, 1.0)])
def test_teacher_forced_logits_close(bits, max_err):
    model = tiny_llama()
    ids = torch.randint(1, V, (1, 40))
    full = model(ids).logits
    out = chunked_logits(model, ids, tqhf.TurboQuantCache(model.config, bits=bits), prefix=12, chunk=5)
    torch.testing.assert_close(out[:, :12], full[:, :12], rtol=1e-5, atol=1e-5)  # the prefill is full precision
    err = (out - full).abs().max().item()
    assert err < max_err, f"{bits}-bit logit error {err:.3f}"
    agree = (out.argmax(-1) == full.argmax(-1)).float().mean().item()
    assert agree >= (0.9 if bits == 8 else 0.6)  # near-tied random logits flip easily


@torch.no_grad()
@pytest.mark.parametrize("sinks, recent", [(0, 0), (4, 8)])
def test_decode_uses_fused_op_on_every_layer_without_dequantized_copy(sinks, recent):
    model = tiny_llama()
    L = model.config.num_hidden_layers
    ids = torch.randint(1, V, (1, 24))
    cache = tqhf.TurboQuantCache(model.config, bits=4, sink_tokens=sinks, recent_tokens=recent)
    model(ids, past_key_values=cache)
    Hkv, D = model.config.num_key_value_heads, model.config.head_dim
    steps = 6
    with _Recorder() as rec:
        token = ids[:, -1:]
        for _ in range(steps):
            token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
    # One quantize per tensor (norm correction, key centring and the window writes inside it) and one
    # attention per layer and step; nothing is decoded outside the fused op.
    assert rec.tq_calls == {"tq.flash_attn_vec_tq": L * steps, "tq.hadamard_quantize_kv": 2 * L * steps}
    assert rec.dequantize_lengths == []
    # No float tensor as large as one layer's K (Hkv x seq x D) exists outside the fused kernels.
    smallest_cache = Hkv * ids.shape[1] * D
    big = [(n, s) for n, s in rec.float_shapes if torch.Size(s).numel() >= smallest_cache]
    assert big == [], f"full-size float tensors allocated during decode: {big[:5]}"


class _OpCounter(TorchDispatchMode):
    """Counts the non-view ops dispatched (each one a kernel launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _ops_per_decode_step(model, cache, prompt: int = 20, warmup: int = 2) -> list[str]:
    ids = torch.randint(1, V, (1, prompt))
    token = model(ids, past_key_values=cache).logits[:, -1:].argmax(-1)
    for _ in range(warmup):  # the first steps may grow or convert buffers once
        token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
    with _OpCounter() as counter:
        model(token, past_key_values=cache)
    return counter.ops


OP_BUDGET_PER_LAYER = 4  # issue 9: at most 4 more non-view ops per attention layer than DynamicCache + SDPA


@torch.no_grad()
@pytest.mark.parametrize("model_name", ["llama", "qwen2_sliding"])
def test_decode_step_op_budget_against_dynamic_cache_and_sdpa(model_name):
    """One decode step with the default TurboQuantCache (4 sinks + 32 recent tokens) dispatches at most
    OP_BUDGET_PER_LAYER more non-view ops per attention layer than DynamicCache + SDPA."""
    build = tiny_llama if model_name == "llama" else tiny_qwen2_sliding
    tq_model, sdpa_model = build(), build()
    sdpa_model.config._attn_implementation = "sdpa"
    L = tq_model.config.num_hidden_layers
    tq_ops = _ops_per_decode_step(tq_model, tqhf.TurboQuantCache(tq_model.config))
    sdpa_ops = _ops_per_decode_step(sdpa_model, DynamicCache(config=sdpa_model.config))
    extra = (len(tq_ops) - len(sdpa_ops)) / L
    assert extra <= OP_BUDGET_PER_LAYER, (
        f"{extra:+.1f} non-view ops per layer over DynamicCache+SDPA ({len(tq_ops)} vs {len(sdpa_ops)} for {L} layers)\n"
        f"tq:   {sorted(tq_ops)}\nsdpa: {sorted(sdpa_ops)}")
    assert tq_ops.count("tq.flash_attn_vec_tq") == L and tq_ops.count("tq.hadamard_quantize_kv") == 2 * L


@torch.no_grad()
def test_recorder_detects_dequantized_copy_with_other_attention():
    # The control for the test above: with attn_implementation="sdpa" the cache must hand out K/V
    # tensors, and the recorder sees them.
    model = tiny_llama(attn="sdpa")
    ids = torch.randint(1, V, (1, 24))
    with pytest.warns(UserWarning, match="dequantizes a full-size copy"):
        cache = tqhf.TurboQuantCache(model.config, bits=4, sink_tokens=0, recent_tokens=0)
    model(ids, past_key_values=cache)
    with _Recorder() as rec:
        model(ids[:, -1:], past_key_values=cache)
    assert max(rec.dequantize_lengths) == 25  # the whole cache, dequantized for SDPA
    Hkv, D = model.config.num_key_value_heads, model.config.head_dim
    assert any(torch.Size(s).numel() >= Hkv * 24 * D for _n, s in rec.float_shapes)
    # It still generates correctly (8-bit is close to full precision).
    full = model(torch.cat([ids, ids[:, :3]], 1)).logits[:, -3:]
    cache = tqhf.TurboQuantCache(model.config, bits=8, attn_implementation="sdpa")
    model(ids, past_key_values=cache)
    out = model(ids[:, :3], past_key_values=cache).logits
    assert (out - full).abs().max() < 0.1


@torch.no_grad()
def test_left_padded_batch_matches_unpadded():
    model = tiny_llama()
    a, b = torch.randint(1, V, (1, 12)), torch.randint(1, V, (1, 7))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 12, dtype=torch.long),
                      torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1)])
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                             past_key_values=tqhf.TurboQuantCache(model.config, bits=8))
    solo = model.generate(b, max_new_tokens=16, do_sample=False, past_key_values=tqhf.TurboQuantCache(model.config, bits=8))
    # The padded row quantizes the same tokens and, through kv_start, never sees the padding.
    assert torch.equal(batched[1, 12:], solo[0, 7:])
    # Teacher-forced: the padded batch through the compressed cache is close to full precision.
    full_mask = torch.cat([mask, torch.ones(2, 16, dtype=torch.long)], 1)
    full = model(batched, attention_mask=full_mask).logits
    out = chunked_logits(model, batched, tqhf.TurboQuantCache(model.config, bits=8), prefix=12, chunk=4, mask=full_mask)
    assert (out[0] - full[0]).abs().max() < 0.1
    assert (out[1, 5:] - full[1, 5:]).abs().max() < 0.1


@torch.no_grad()
def test_sampling_and_beam_search():
    model = tiny_llama()
    ids = torch.randint(1, V, (2, 6))
    torch.manual_seed(1)
    out = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=20,
                         past_key_values=tqhf.TurboQuantCache(model.config, bits=4))
    assert out.shape == (2, 14) and int(out.max()) < V
    cache = tqhf.TurboQuantCache(model.config, bits=8)
    beams = model.generate(ids[:1], max_new_tokens=6, num_beams=3, do_sample=False, past_key_values=cache)
    ref = model.generate(ids[:1], max_new_tokens=6, num_beams=3, do_sample=False)
    assert beams.shape == ref.shape


@torch.no_grad()
def test_sliding_window_layers_wrap():
    W = 8
    model = tiny_qwen2_sliding(W)
    cache = tqhf.TurboQuantCache(model.config, bits=8, decode_chunk=4)
    assert [type(layer) for layer in cache.layers] == [tqhf.TurboQuantLayer, tqhf.TurboQuantSlidingLayer]
    assert cache.is_sliding == [False, True]
    ids = torch.randint(1, V, (1, 40))
    full = model(ids).logits
    out = chunked_logits(model, ids, cache, prefix=10, chunk=3)
    assert cache.get_seq_length() == 40
    sliding = cache.layers[1].kv
    assert sliding.capacity == W + 4 - 1 and sliding.seq_len == 40  # wrapped ring buffer
    assert (out - full).abs().max() < 0.1
    with pytest.raises(ValueError, match="decode_chunk=4"):
        model(ids[:, :5], past_key_values=cache)
    with pytest.raises(RuntimeError, match="cannot be cropped"):
        cache.crop(-2)


def test_cache_api_semantics():
    model = tiny_llama()
    cache = tqhf.TurboQuantCache(model.config, bits=4, max_cache_len=20)
    assert len(cache) == 2 and cache.get_seq_length() == 0 and not cache.is_compileable
    assert repr(cache.layers[0]) == "TurboQuantLayer(uninitialized)"
    with torch.no_grad():
        model(torch.randint(1, V, (2, 15)), past_key_values=cache)
    layer = cache.layers[0]
    assert layer.keys is None and layer.values is None  # no full-precision copy
    assert cache.get_seq_length() == 15 and cache.batch_size == 2
    assert layer.kv.k_codes.shape == (2, 2, 20, 32) and layer.kv.k_norms.shape == (2, 2, 20, 1)
    assert cache.get_mask_sizes(3, 0) == (18, 0)
    with torch.no_grad():
        model(torch.randint(1, V, (2, 10)), past_key_values=cache)  # grows past max_cache_len
    assert cache.get_seq_length() == 25 and layer.kv.capacity >= 25
    # Every token is in the codes; the 4 sinks and the newest 20 (the default 112, capped at
    # max_cache_len=20) also in 16 bits (window_dtype "auto": bfloat16 for this float32 model):
    # layers x (codes + K/V x B x Hkv x D x 2 bytes x tokens).
    assert layer.kv.recent_k.shape[2] == 20 and layer.kv.recent_k.dtype == torch.bfloat16
    codes = 2 * torch_tq.quantized_nbytes(2, 2, 25, 64, 4)
    assert cache.nbytes_used == 2 * (codes + 2 * 2 * 2 * 64 * 2 * (4 + 20))
    cache.crop(-5)
    assert cache.get_seq_length() == 20
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)
    cache.reorder_cache(torch.tensor([1, 0]))
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 4
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert cache.batch_size == 2
    with pytest.raises(NotImplementedError, match="offloading"):
        cache.offload(0)
    cache.reset()
    assert cache.get_seq_length() == 0


@torch.no_grad()
@pytest.mark.parametrize("window_dtype, stored", [(torch.bfloat16, torch.bfloat16), ("auto", torch.bfloat16),
                                                  ("model", torch.float32), (torch.float32, torch.float32)])
def test_window_dtype_of_a_float32_model(window_dtype, stored):
    """TurboQuantCache(window_dtype=...) stores the sink/recent windows of every layer in that dtype and
    counts them at their real size; 16-bit windows move the logits by far less than the 4-bit codes do."""
    model = tiny_llama()
    ids = torch.randint(1, V, (2, 30))
    cache = tqhf.TurboQuantCache(model.config, bits=4, sink_tokens=4, recent_tokens=8, window_dtype=window_dtype)
    out = chunked_logits(model, ids, cache, prefix=12, chunk=1)
    kv = cache.layers[0].kv
    assert {t.dtype for t in (kv.sink_k, kv.sink_v, kv.recent_k, kv.recent_v)} == {stored}
    assert "windows=" + str(stored).removeprefix("torch.") in repr(cache.layers[0])
    codes = 2 * torch_tq.quantized_nbytes(2, 2, 30, 64, 4)
    assert cache.nbytes_used == 2 * (codes + 2 * 2 * 2 * 64 * stored.itemsize * (4 + 8))
    f32 = chunked_logits(model, ids, tqhf.TurboQuantCache(model.config, bits=4, sink_tokens=4, recent_tokens=8,
                                                          window_dtype=torch.float32), prefix=12, chunk=1)
    full = model(ids).logits
    window_err, code_err = (out - f32).abs().max().item(), (f32 - full).abs().max().item()
    assert window_err <= 0.1 * code_err, (window_err, code_err)
    assert (window_err > 0) == (stored != torch.float32)


def test_cache_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="bits must be one of"):
        tqhf.TurboQuantCache(model.config, bits=7)
    with pytest.raises(ValueError, match="window_dtype must be one of"):
        tqhf.TurboQuantCache(model.config, window_dtype=torch.int8)
    cfg = LlamaConfig(**{**COMMON, "head_dim": 80}, attn_implementation="tq")
    with pytest.raises(ValueError, match="head_dim must be one of"):
        tqhf.TurboQuantCache(cfg)
    cfg = Qwen2Config(**COMMON, layer_types=["full_attention", "linear_attention"], attn_implementation="tq")
    with pytest.raises(ValueError, match="linear_attention"):
        tqhf.TurboQuantCache(cfg)


def test_attention_without_cache_is_sdpa():
    model = tiny_llama()
    ref = tiny_llama(attn="sdpa")
    ids = torch.randint(1, V, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        assert torch.equal(model(ids, past_key_values=DynamicCache(config=model.config)).logits, ref(ids).logits)


def test_cache_defaults_are_4_bit_with_112_recent_16_bit_tokens():
    """TurboQuantCache(config) is the measured default (README, multi-text quality table); bits=b alone is
    b-bit keys and values; v_bits alone keeps the default 4-bit keys."""
    config = tiny_llama().config
    default = tqhf.TurboQuantCache(config)
    assert (default.bits, default.v_bits) == (4, 4)
    layer = default.layers[0]
    assert (layer.sink_tokens, layer.recent_tokens, layer.window_dtype) == (4, 112, "auto")
    assert (tqhf.TurboQuantCache(config, bits=5).v_bits, tqhf.TurboQuantCache(config, v_bits=3).bits) == (5, 4)


def test_cache_rejects_negative_windows():
    model = tiny_llama()
    with pytest.raises(ValueError, match="recent_tokens must be >= 0, got -1"):
        tqhf.TurboQuantCache(model.config, recent_tokens=-1)


@torch.no_grad()
def test_device_lengths_mode_matches_host_lengths_and_adds_two_ops_per_step():
    """TurboQuantCache(device_lengths=True) (what a CUDA graph captures) gives the same logits as the
    host-length cache, prefill and decode, and costs two tiny launches per step, not per layer."""
    model = tiny_llama()
    ids = torch.randint(1, V, (2, 24))
    host = tqhf.TurboQuantCache(model.config, max_cache_len=64)
    device = tqhf.TurboQuantCache(model.config, max_cache_len=64, device_lengths=True)
    want = chunked_logits(model, ids, host, prefix=16, chunk=1)
    got = chunked_logits(model, ids, device, prefix=16, chunk=1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert device.layers[0].lengths.total.tolist() == [24, 24]
    ops_host = _ops_per_decode_step(model, tqhf.TurboQuantCache(model.config, max_cache_len=64))
    ops_device = _ops_per_decode_step(model, tqhf.TurboQuantCache(model.config, max_cache_len=64, device_lengths=True))
    assert len(ops_device) - len(ops_host) == 2, sorted(set(ops_device) - set(ops_host))


def test_device_lengths_mode_refuses_what_it_cannot_capture():
    model = tiny_llama()
    with pytest.raises(ValueError, match="needs max_cache_len"):
        tqhf.TurboQuantCache(model.config, device_lengths=True)
    with pytest.raises(ValueError, match="full_attention layers only"):
        tqhf.TurboQuantCache(tiny_qwen2_sliding().config, max_cache_len=64, device_lengths=True)
    cache = tqhf.TurboQuantCache(model.config, max_cache_len=20, device_lengths=True)
    with torch.no_grad(), pytest.raises(ValueError, match="21 tokens exceed max_cache_len=20"):
        model(torch.randint(1, V, (1, 21)), past_key_values=cache)
    cache = tqhf.TurboQuantCache(model.config, max_cache_len=20, device_lengths=True)
    with torch.no_grad():
        model(torch.randint(1, V, (1, 8)), past_key_values=cache)
    with pytest.raises(ValueError, match="does not support crop"):
        cache.crop(-2)
