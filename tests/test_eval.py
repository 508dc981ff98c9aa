"""torch_tq.evaluation and ``torch-tq eval``: metrics against hand-computed values, decoding one token per step
against one full forward, lengths scored from one pass, KV bytes, and the CLI on a tiny random Llama."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import torch_tq.integrations.transformers  # noqa: E402,F401  (registers attn_implementation="tq")
from torch_tq import cli  # noqa: E402
from torch_tq import evaluation as ev  # noqa: E402
from torch_tq.integrations.transformers import cache_kwargs  # noqa: E402
from test_cli import tiny_model_dir  # noqa: E402,F401  (the tiny Llama checkpoint + byte tokenizer saved to disk)

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 64


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=512,
                      initializer_range=0.04, eos_token_id=None, bos_token_id=None, pad_token_id=0,
                      attn_implementation="tq")
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


# ---------------------------------------------------------------------------------------------
# Metric functions
# ---------------------------------------------------------------------------------------------


def test_kl_divergence_of_known_distributions():
    p = torch.tensor([[0.5, 0.5], [0.25, 0.75]], dtype=torch.float64)
    q = torch.tensor([[0.9, 0.1], [0.25, 0.75]], dtype=torch.float64)
    kld = ev.kl_divergence(p.log(), q.log())
    # 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) by hand; identical rows diverge by 0.
    assert kld[0].item() == pytest.approx(0.5 * math.log(5 / 9) + 0.5 * math.log(5), rel=1e-12)
    assert kld[1].item() == 0.0
    # Not symmetric: KL(q || p) is another number.
    assert ev.kl_divergence(q.log(), p.log())[0].item() == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2))


def test_kl_divergence_matches_torch_on_random_logits():
    ref, other = torch.randn(3, 7, 50, dtype=torch.float64), torch.randn(3, 7, 50, dtype=torch.float64)
    lp_ref, lp = torch.log_softmax(ref, -1), torch.log_softmax(other, -1)
    expected = torch.nn.functional.kl_div(lp, lp_ref, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(ev.kl_divergence(lp_ref, lp), expected)


def test_percentile_by_hand_and_against_numpy():
    np = pytest.importorskip("numpy")
    assert ev.percentile(torch.arange(101.0)[torch.randperm(101)], 99) == pytest.approx(99.0)
    assert ev.percentile(torch.tensor([1.0, 2.0, 3.0, 4.0]), 50) == pytest.approx(2.5)
    # 4 values: the 99th percentile lies 0.97 of the way from the 3rd to the 4th.
    assert ev.percentile(torch.tensor([0.0, 0.0, 1.0, 11.0]), 99) == pytest.approx(1.0 + 0.97 * 10.0)
    values = torch.rand(1000) ** 4
    assert ev.percentile(values, 99) == pytest.approx(float(np.percentile(values.numpy(), 99)), rel=1e-6)


def test_metrics_of_hand_made_scores():
    full = ev.TokenScores(nll=torch.tensor([[1.0, 2.0, 3.0, 2.0]], dtype=torch.float64), kld=torch.zeros(1, 4),
                          top1=torch.ones(1, 4, dtype=torch.bool), bytes_per_token={5: 100.0})
    mine = ev.TokenScores(nll=torch.tensor([[1.5, 2.0, 3.5, 2.0]], dtype=torch.float64),
                          kld=torch.tensor([[0.0, 0.1, 0.3, 0.2]], dtype=torch.float64),
                          top1=torch.tensor([[True, False, True, True]]), bytes_per_token={5: 25.0})
    m = ev.metrics(mine, full, row=0, scored=4, length=5)
    assert m.perplexity == pytest.approx(math.exp(9.0 / 4))
    assert m.delta_ppl_pct == pytest.approx(100 * (math.exp(9.0 / 4) / math.exp(8.0 / 4) - 1))
    assert m.mean_kld == pytest.approx(0.15) and m.top1 == pytest.approx(0.75)
    assert m.p99_kld == pytest.approx(0.2 + 0.97 * 0.1)
    assert m.bytes_per_token == 25.0 and m.scored_tokens == 4
    # The first two positions only.
    assert ev.metrics(mine, full, 0, 2, 5).top1 == pytest.approx(0.5)
    mean = ev.mean_metrics([m, ev.metrics(mine, full, 0, 2, 5)])
    assert mean.top1 == pytest.approx(0.625) and mean.scored_tokens == 6


def test_quality_goal():
    goal = ev.QUALITY_GOALS[4]
    good = ev.Metrics(20.0, -0.9, 0.0019, 0.02, 0.981, 30.0, 100)
    assert goal.met_by(good)
    assert not goal.met_by(ev.Metrics(20.0, -1.1, 0.0019, 0.02, 0.981, 30.0, 100))  # |dppl| counts both ways
    assert not goal.met_by(ev.Metrics(20.0, 0.1, 0.0021, 0.02, 0.99, 30.0, 100))
    assert not goal.met_by(ev.Metrics(20.0, 0.1, 0.001, 0.02, 0.979, 30.0, 100))


def test_decode_spans():
    assert ev.decode_spans(4, [12]) == [(0, 4)] + [(i, i + 1) for i in range(4, 11)]
    # Chunks of 3, also cut where the length 8 ends (its last input is token 6).
    assert ev.decode_spans(4, [8, 12], chunk=3) == [(0, 4), (4, 7), (7, 10), (10, 11)]
    assert ev.decode_spans(4, [9, 12], chunk=3) == [(0, 4), (4, 7), (7, 8), (8, 10), (10, 11)]


def test_settings_cross_product_and_labels():
    settings = ev.turboquant_settings([4, 8], v_bits=[None, 4], recent_tokens=[None, 64])
    assert [s.label() for s in settings] == [
        "TQ 4-bit", "TQ 4-bit (recent 64)", "TQ 8-bit", "TQ 8-bit (recent 64)", "TQ K8/V4", "TQ K8/V4 (recent 64)"]
    assert settings[0].uses_defaults and not settings[1].uses_defaults and not settings[4].uses_defaults
    windows = ev.turboquant_settings([4], recent_tokens=[None, 64], window_dtypes=[None, "bfloat16"])
    assert [s.label() for s in windows] == [
        "TQ 4-bit", "TQ 4-bit (bfloat16 windows)", "TQ 4-bit (recent 64)", "TQ 4-bit (recent 64, bfloat16 windows)"]
    assert not windows[1].uses_defaults
    with pytest.raises(ValueError, match="window dtype must be one of"):
        ev.window_dtype_from_name("bf16")
    # bits None: TurboQuantCache's default widths, which answer to the 4-bit goal (they have its bytes).
    default = ev.turboquant_settings([None, 5, 8], v_bits=[None, 3])
    assert [s.label() for s in default] == ["TQ 4-bit default", "TQ K4/V3 default", "TQ 5-bit", "TQ K5/V3", "TQ 8-bit",
                                            "TQ K8/V3"]
    assert default[0].widths() == (4, 4) and [s.goal_bits for s in default] == [4, None, None, None, 8, None]
    assert ev.TurboQuantSetting(4, recent_tokens=64).goal_bits is None
    assert ev.QuantoPeer(4).label() == "quanto int4 (residual 128)"


def test_tokenize_renders_a_chat_without_template(tmp_path):
    class CharTokenizer:
        chat_template = None

        def __call__(self, text):
            return {"input_ids": [ord(c) for c in text]}

    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]))
    assert ev.tokenize(CharTokenizer(), chat) == [ord(c) for c in "user: hi\nassistant: yo\n"]


def test_shipped_texts_exist_and_some_are_held_out():
    texts = ev.shipped_texts()
    assert {t.name for t in texts} >= {"lighthouse", "ferry", "code", "docs", "chat", "numbers"}
    assert any(t.held_out for t in texts) and not all(t.held_out for t in texts)
    assert not next(t for t in texts if t.name == "lighthouse").held_out  # the text defaults were tuned on
    for t in texts:
        assert t.path.is_file() and t.path.stat().st_size > 4000, t.name


# ---------------------------------------------------------------------------------------------
# Scoring through caches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 5])
def test_full_cache_decoding_equals_one_full_forward(model, chunk):
    prefix, length = 6, 30
    ids = torch.randint(0, 256, (2, length))
    scores = ev.score_texts(model, ids, prefix, [length], [], chunk=chunk)
    assert list(scores) == [ev.FULL]
    with torch.no_grad():
        logits = model(ids).logits.double()
    # Position t predicts token t + 1; the prefill's last position is the first scored one.
    logprobs = torch.log_softmax(logits[:, prefix - 1 : length - 1], -1)
    expected_nll = -logprobs.gather(-1, ids[:, prefix:length, None]).squeeze(-1)
    torch.testing.assert_close(scores[ev.FULL].nll, expected_nll, atol=1e-5, rtol=1e-5)
    assert scores[ev.FULL].kld.abs().max().item() == 0.0 and scores[ev.FULL].top1.all()


def test_turboquant_divergence_grows_as_bits_shrink(model):
    ids = torch.randint(0, 256, (2, 24))
    s8, s2 = ev.TurboQuantSetting(8, sink_tokens=0, recent_tokens=0), ev.TurboQuantSetting(2, sink_tokens=0, recent_tokens=0)
    scores = ev.score_texts(model, ids, 8, [24], [s8, s2])
    kld8, kld2 = scores[s8].kld[:, 1:].mean().item(), scores[s2].kld[:, 1:].mean().item()
    assert 0.0 < kld8 < kld2
    # The prefill attends over full-precision K/V: its prediction is the full cache's.
    assert scores[s2].kld[:, 0].max().item() < 1e-9


@pytest.mark.parametrize("chunk", [1, 4])
def test_two_lengths_from_one_pass_equal_separate_passes(model, chunk):
    ids = torch.randint(0, 256, (2, 26))
    setting = ev.TurboQuantSetting(3, sink_tokens=1, recent_tokens=3)
    together = ev.score_texts(model, ids, 7, [17, 26], [setting], chunk=chunk)[setting]
    alone = ev.score_texts(model, ids, 7, [17], [setting], chunk=chunk)[setting]
    torch.testing.assert_close(together.kld[:, :10], alone.kld, atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(together.nll[:, :10], alone.nll, atol=1e-9, rtol=1e-6)
    assert together.bytes_per_token[17] == alone.bytes_per_token[17]
    assert together.kld.shape == (2, 19)


def test_kv_bytes_per_token(model):
    ids = torch.randint(0, 256, (3, 16))
    tq8 = ev.TurboQuantSetting(8, sink_tokens=0, recent_tokens=0)
    windows = {name: ev.TurboQuantSetting(4, sink_tokens=2, recent_tokens=4, window_dtype=name)
               for name in ("float32", "bfloat16", "auto")}
    scores = ev.score_texts(model, ids, 5, [16], [tq8, *windows.values()])
    per_vector = LAYERS * KV_HEADS * 2  # K and V of every layer and KV head
    assert scores[ev.FULL].bytes_per_token[16] == per_vector * HEAD_DIM * 4  # float32
    # 8-bit codes + one float32 norm per vector (norm blocks of the whole head dim here).
    assert scores[tq8].bytes_per_token[16] == per_vector * (HEAD_DIM + 4)
    # 4-bit codes + norms of every token held (15: the last token is only predicted), and 2 + 4 of them
    # also in the windows' dtype (auto: bfloat16 for this float32 model).
    for name, itemsize in (("float32", 4), ("bfloat16", 2), ("auto", 2)):
        expected = per_vector * (HEAD_DIM // 2 + 4 + HEAD_DIM * itemsize * (2 + 4) / 15)
        assert scores[windows[name]].bytes_per_token[16] == pytest.approx(expected, rel=1e-12)


def test_quanto_peer_bytes_count_codes_scales_and_residual(model):
    pytest.importorskip("optimum.quanto")
    ids = torch.randint(0, 256, (1, 28))
    peer = ev.QuantoPeer(4, residual_length=8)
    scores = ev.score_texts(model, ids, 5, [28], [peer])
    # The same run by hand, to look at what the cache holds after it.
    cache = peer.make_cache(model, 28)
    with torch.no_grad():
        for start, stop in ev.decode_spans(5, [28]):
            model(ids[:, start:stop], **cache_kwargs(cache))
    layer = cache.layers[0]
    residual = layer.keys.shape[-2]
    quantized = 27 - residual
    assert 0 < residual < 8
    # int4: 32 bytes of codes per 64 coordinates + a float32 scale and zero-point per group of 64.
    expected = LAYERS * KV_HEADS * 2 * (quantized * (HEAD_DIM // 2 + 8) + residual * HEAD_DIM * 4)
    assert ev.kv_bytes(cache) == expected
    assert scores[peer].bytes_per_token[28] == expected / 27
    assert scores[peer].kld[:, 1:].mean().item() > 0.0


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def test_eval_cli_multi_text_smoke(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    plot, raw = tmp_path / "eval.png", tmp_path / "eval.json"
    rc = cli.main(["eval", "--model-dir", tiny_model_dir, "--texts", "code", "chat", "docs", "--max-tokens", "24", "40",
                   "--prefix", "8", "--bits", "2", "8", "--recent-tokens", "0", "--sink-tokens", "0",
                   "--plot", str(plot), "--json", str(raw)])
    assert rc == 0
    out = capsys.readouterr().out
    for needle in ("one token per forward call", "length 24 tokens (16 scored per text)", "length 40 tokens",
                   "docs (held out)", "mean of texts", "TQ 2-bit (sinks 0, recent 0)", "KLD mean"):
        assert needle in out, needle
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(raw.read_text())
    assert [t["name"] for t in report["texts"]] == ["code", "chat", "docs"]
    assert len(report["rows"]) == 2 * 3 * (3 + 1)  # lengths x caches x (texts + mean)
    rows = {(r["text"], r["length"], r["setting"]): r for r in report["rows"]}
    # The full cache's perplexity is the model's own, from one forward over the text (no cache).
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = torch.tensor([ev.tokenize(tokenizer, ev.DATA_DIR / "code_scheduler.py.txt")[:40]])
    with torch.no_grad():
        logits = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits[0, 7:39]
    ppl = math.exp(torch.nn.functional.cross_entropy(logits.double(), ids[0, 8:40]).item())
    assert rows[("code", 40, "full (float32)")]["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert 0 < rows[("mean", 40, "TQ 8-bit (sinks 0, recent 0)")]["mean_kld"] < rows[("mean", 40, "TQ 2-bit (sinks 0, recent 0)")]["mean_kld"]


def test_eval_cli_chunked_is_labelled(tiny_model_dir, capsys):  # noqa: F811
    assert cli.main(["eval", "--model-dir", tiny_model_dir, "--texts", "numbers", "--max-tokens", "40", "--prefix", "8",
                     "--chunk", "8", "--bits", "4", "--plot", ""]) == 0
    out = capsys.readouterr().out
    assert "CHUNKED: 8 tokens per forward call" in out and "mean of texts" not in out


def test_eval_cli_peer(tiny_model_dir, capsys, monkeypatch):  # noqa: F811
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        pytest.skip("optimum-quanto is not installed")
    assert cli.main(["eval", "--model-dir", tiny_model_dir, "--texts", "code", "--max-tokens", "30", "--prefix", "8",
                     "--bits", "4", "--peer", "--plot", ""]) == 0
    out = capsys.readouterr().out
    assert "quanto int4 (residual 128)" in out and "quanto int2 (residual 128)" in out


def _fails_with_one_line(capsys, argv, needle):
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse rejects the value
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert needle in last, err
    return err


@pytest.mark.parametrize("argv,needle", [
    (["--chunk", "0"], "--chunk: must be >= 1, got 0"),
    (["--chunk", "-5"], "--chunk: must be >= 1, got -5"),
    (["--prefix", "0"], "--prefix: must be >= 1, got 0"),
    (["--text", "/no/such/file.txt"], "text file '/no/such/file.txt' not found"),
    (["--texts", "lighthouse", "sonnets"], "unknown --texts sonnets"),
    (["--prefix", "64", "--max-tokens", "65", "512"], "--max-tokens must be >= --prefix + 2 = 66"),
    (["--v-bits", "7"], "--v-bits: must be 'same' or one of"),
])
def test_eval_argument_errors_before_loading_anything(argv, needle, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    monkeypatch.setattr(cli, "_load_tokenizer", lambda *a, **k: pytest.fail("the tokenizer must not load"))
    _fails_with_one_line(capsys, ["eval", *argv], needle)


def test_eval_text_too_short_is_found_before_the_model_loads(tiny_model_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    short = tmp_path / "short.txt"
    text = "A short text of a few dozen characters."
    short.write_text(text)  # one token per byte with the tiny tokenizer
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    err = _fails_with_one_line(capsys, ["eval", "--model-dir", tiny_model_dir, "--text", str(short), "--prefix", "8"],
                               f"--max-tokens 1024 is longer than these texts (tokens): short.txt ({len(text)})")
    assert err.count("\n") == 1


def test_eval_v_bits_labelled(tiny_model_dir, capsys, monkeypatch):  # noqa: F811
    argv = ["eval", "--model-dir", tiny_model_dir, "--texts", "code", "--max-tokens", "30", "--prefix", "8",
            "--bits", "8", "--v-bits", "4", "--plot", ""]
    assert cli.main(argv) == 0
    assert "TQ K8/V4" in capsys.readouterr().out


def test_eval_peer_without_quanto_names_install_command(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("optimum") else real(name, *a))
    _fails_with_one_line(capsys, ["eval", "--peer"], "pip install optimum-quanto")
