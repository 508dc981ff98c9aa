"""Quality of a compressed KV cache: how far a model's next-token predictions move from the full-precision cache's.

Used by ``torch-tq eval`` and ``benchmarks/quality.py``. A *setting* is one way to hold the KV cache
(full precision, a TurboQuant configuration, or transformers' ``QuantizedCache`` as the peer baseline).
:func:`score_texts` feeds a batch of texts through the full-precision cache and every setting in
lockstep, the way ``generate`` decodes by default (prefill a prefix, then one token per forward call,
teacher-forced on the text), and keeps per-position scores; :func:`summarize` turns them into
metrics per text and length; :func:`format_table` prints them.

Metrics, over the scored positions of a text (every position after the prefix):

* perplexity, and its change against the full-precision cache (Δ perplexity, percent);
* KL(P_full || P_setting) of the next-token distribution: mean and 99th percentile;
* top-1 agreement: how often both caches predict the same most likely token;
* KV bytes per token: the cache's bytes (codes, norms or scales, full-precision windows) divided
  by the tokens it holds, at the end of the text.

Perplexity alone misleads on a small model (noise moves it either way); the divergence does not.
Several lengths of the same texts are scored from one pass: decoding is causal, so the first L
tokens of a longer run score exactly as a run of L tokens would (chunk boundaries are cut at
each length too).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

DATA_DIR = Path(__file__).parent / "data"
MANIFEST = DATA_DIR / "texts.json"

# Settings torch-tq eval compares by default: TurboQuantCache's defaults (None: 4-bit K and V), then b-bit K and V.
DEFAULT_BITS = (None, 8, 3)
DEFAULT_LENGTHS = (512, 1024)
DEFAULT_PREFIX = 64
# transformers' QuantizedCache defaults (q_group_size 64, newest 128 tokens in full precision).
PEER_BITS = (4, 2)
PEER_RESIDUAL = 128
PEER_GROUP_SIZE = 64


@dataclass(frozen=True)
class QualityGoal:
    """Issue 14's goals for a TurboQuant bit width with default options, on every text, one token per step."""

    max_abs_delta_ppl: float  # percent
    max_mean_kld: Optional[float] = None
    min_top1: Optional[float] = None  # fraction

    def describe(self) -> str:
        parts = []
        if self.max_mean_kld is not None:
            parts.append(f"mean KLD <= {self.max_mean_kld:g}")
        if self.min_top1 is not None:
            parts.append(f"top-1 >= {100 * self.min_top1:g}%")
        parts.append(f"|dppl| <= {self.max_abs_delta_ppl:g}%")
        return ", ".join(parts)

    def met_by(self, m: "Metrics") -> bool:
        return (abs(m.delta_ppl_pct) <= self.max_abs_delta_ppl
                and (self.max_mean_kld is None or m.mean_kld <= self.max_mean_kld)
                and (self.min_top1 is None or m.top1 >= self.min_top1))


QUALITY_GOALS = {
    8: QualityGoal(max_abs_delta_ppl=0.1),
    4: QualityGoal(max_abs_delta_ppl=1.0, max_mean_kld=0.002, min_top1=0.98),
    3: QualityGoal(max_abs_delta_ppl=3.0, max_mean_kld=0.006),
}


# ---------------------------------------------------------------------------------------------
# Settings: how the KV cache is held
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FullPrecision:
    """transformers' ``DynamicCache``: the reference every other setting is compared with."""

    kind: str = field(default="full", init=False)

    def label(self, dtype_name: str = "") -> str:
        return f"full ({dtype_name})" if dtype_name else "full"

    def make_cache(self, model, max_cache_len: int):
        from transformers import DynamicCache

        return DynamicCache(config=model.config)


@dataclass(frozen=True)
class TurboQuantSetting:
    """``TurboQuantCache(config, bits=k_bits, v_bits=v_bits, sink_tokens=..., recent_tokens=..., window_dtype=...)``.

    ``None`` leaves an option at ``TurboQuantCache``'s default (``k_bits`` None: its default widths, 5-bit
    keys and 3-bit values; ``v_bits`` None: the same as ``k_bits``, or the default's 3 when ``k_bits`` is
    None). ``window_dtype`` is a name: ``"float32"``, ``"float16"``, ``"bfloat16"``, ``"model"`` or ``"auto"``.
    """

    k_bits: Optional[int]
    v_bits: Optional[int] = None
    sink_tokens: Optional[int] = None
    recent_tokens: Optional[int] = None
    window_dtype: Optional[str] = None
    kind: str = field(default="turboquant", init=False)

    @property
    def uses_defaults(self) -> bool:
        """Same bits for K and V and the default windows: the setting the quality goals are about."""
        return (self.v_bits in (None, self.k_bits) and self.sink_tokens is None and self.recent_tokens is None
                and self.window_dtype is None)

    @property
    def goal_bits(self) -> Optional[int]:
        """The width whose issue-14 goal applies (:data:`QUALITY_GOALS`), for settings with the default options:
        ``bits=b`` answers to the b-bit goal, ``TurboQuantCache``'s default widths (``DEFAULT_BITS``/``DEFAULT_V_BITS``) to the 4-bit
        goal (their bytes are those of 4-bit keys and values)."""
        if not self.uses_defaults:
            return None
        bits = 4 if self.k_bits is None else self.k_bits
        return bits if bits in QUALITY_GOALS else None

    def widths(self) -> tuple[int, int]:
        """(key bits, value bits) of the cache this setting makes."""
        if self.k_bits is None:
            from torch_tq.integrations import transformers as tqhf

            return tqhf.DEFAULT_BITS, tqhf.DEFAULT_V_BITS if self.v_bits is None else self.v_bits
        return self.k_bits, self.k_bits if self.v_bits is None else self.v_bits

    def label(self, dtype_name: str = "") -> str:
        k, v = self.widths()
        bits = f"{k}-bit" if k == v else f"K{k}/V{v}"
        if self.k_bits is None:
            bits += " default"
        windows = [f"{name} {value}" for name, value in (("sinks", self.sink_tokens), ("recent", self.recent_tokens))
                   if value is not None]
        if self.window_dtype is not None:
            windows.append(f"{self.window_dtype} windows")
        return f"TQ {bits}" + (f" ({', '.join(windows)})" if windows else "")

    def make_cache(self, model, max_cache_len: int):
        from torch_tq.integrations.transformers import TurboQuantCache

        options = {name: getattr(self, name) for name in ("v_bits", "sink_tokens", "recent_tokens")
                   if getattr(self, name) is not None}
        if self.window_dtype is not None:
            options["window_dtype"] = window_dtype_from_name(self.window_dtype)
        return TurboQuantCache(model.config, bits=self.k_bits, max_cache_len=max_cache_len, **options)


WINDOW_DTYPE_NAMES = ("float32", "float16", "bfloat16", "model", "auto")


def window_dtype_from_name(name: str):
    """``TurboQuantCache``'s ``window_dtype`` for a name of :data:`WINDOW_DTYPE_NAMES` (a dtype or a rule)."""
    if name not in WINDOW_DTYPE_NAMES:
        raise ValueError(f"window dtype must be one of {WINDOW_DTYPE_NAMES}, got {name!r}")
    return name if name in ("model", "auto") else getattr(torch, name)


@dataclass(frozen=True)
class QuantoPeer:
    """transformers' ``QuantizedCache`` (optimum-quanto backend, int2/int4 per group of head-dim coordinates
    with a float scale and zero-point each, plus a full-precision residual of up to ``residual_length`` tokens)."""

    bits: int
    residual_length: int = PEER_RESIDUAL
    q_group_size: int = PEER_GROUP_SIZE
    kind: str = field(default="quanto", init=False)

    def label(self, dtype_name: str = "") -> str:
        return f"quanto int{self.bits} (residual {self.residual_length})"

    def make_cache(self, model, max_cache_len: int):
        from transformers import QuantizedCache

        return QuantizedCache("quanto", model.config, nbits=self.bits, residual_length=self.residual_length,
                              q_group_size=self.q_group_size)


Setting = Union[FullPrecision, TurboQuantSetting, QuantoPeer]
FULL = FullPrecision()


def turboquant_settings(bits: Sequence[Optional[int]], v_bits: Sequence[Optional[int]] = (None,),
                        sink_tokens: Sequence[Optional[int]] = (None,),
                        recent_tokens: Sequence[Optional[int]] = (None,),
                        window_dtypes: Sequence[Optional[str]] = (None,)) -> list[TurboQuantSetting]:
    """Every combination of the options, in the given order, without duplicates (``v_bits`` equal to the
    key bits is the same setting as ``None``; ``bits`` None is ``TurboQuantCache``'s default widths)."""
    settings = []
    for k in bits:
        for v in v_bits:
            for s in sink_tokens:
                for r in recent_tokens:
                    for w in window_dtypes:
                        setting = TurboQuantSetting(k, None if v == k else v, s, r, w)
                        if setting not in settings:
                            settings.append(setting)
    return settings


def _stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; quanto's quantized tensors count their packed codes, scales and shifts."""
    parts = [getattr(t, name, None) for name in ("_data", "_scale", "_shift")]
    parts = [p for p in parts if isinstance(p, torch.Tensor)]
    if parts:
        return sum(_stored_bytes(p) for p in parts)
    return t.numel() * t.element_size()


def kv_bytes(cache) -> int:
    """Bytes of K/V a transformers cache holds for its current tokens (no spare capacity).

    TurboQuant: codes + norms + the full-precision windows (its ``nbytes_used``). ``QuantizedCache``:
    the quantized K/V (codes, scales, zero-points) + the full-precision residual. Others: K and V tensors.
    """
    if hasattr(cache, "nbytes_used"):
        return cache.nbytes_used
    total = 0
    for layer in cache.layers:
        for name in ("_quantized_keys", "_quantized_values", "keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += _stored_bytes(t)
    return total


# ---------------------------------------------------------------------------------------------
# Texts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShippedText:
    """One entry of ``torch_tq/data/texts.json``; ``held_out`` texts are never used to tune defaults."""

    name: str
    file: str
    kind: str
    held_out: bool

    @property
    def path(self) -> Path:
        return DATA_DIR / self.file


def shipped_texts() -> list[ShippedText]:
    entries = json.loads(MANIFEST.read_text(encoding="utf-8"))
    return [ShippedText(e["name"], e["file"], e["kind"], e["held_out"]) for e in entries]


@dataclass(frozen=True)
class EvalText:
    """A text ready to score: its token ids and where it came from."""

    name: str
    token_ids: tuple[int, ...]
    held_out: Optional[bool] = None  # None: a user's text

    def __len__(self) -> int:
        return len(self.token_ids)


def tokenize(tokenizer, path: Path) -> list[int]:
    """Token ids of a text file. A ``.json`` file is a chat (a list of ``{"role", "content"}``), rendered
    with the tokenizer's chat template (plain ``role: content`` lines when it has none)."""
    if path.suffix == ".json":
        messages = json.loads(path.read_text(encoding="utf-8"))
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            return list(ids)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    else:
        text = path.read_text(encoding="utf-8")
    return list(tokenizer(text)["input_ids"])


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def decode_spans(prefix: int, lengths: Sequence[int], chunk: int = 1) -> list[tuple[int, int]]:
    """The ``[start, stop)`` input spans of one pass: the prefill ``[0, prefix)``, then ``chunk`` tokens per call.

    The last token of the longest length is only a target. Spans also end at every ``length - 1``, so each
    shorter length is scored exactly as a pass of its own would score it.
    """
    end = max(lengths) - 1
    cuts = sorted({*range(prefix, end, chunk), *(n - 1 for n in lengths), end})
    return [(0, prefix)] + list(zip(cuts[:-1], cuts[1:]))


def kl_divergence(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P) over the last dimension, from log-probabilities (≥ 0; rounding below 0 is clamped)."""
    return (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1).clamp_min(0.0)


@dataclass
class TokenScores:
    """Scores of one setting at every scored position, ``[texts, positions]``, and its bytes at each length."""

    nll: torch.Tensor  # -log P_setting(next token), float64
    kld: torch.Tensor  # KL(P_full || P_setting), float64
    top1: torch.Tensor  # argmax agrees with the full-precision cache's, bool
    bytes_per_token: dict[int, float]  # length -> KV bytes per token (per text) at its end


@torch.no_grad()
def score_texts(model, token_ids: torch.Tensor, prefix: int, lengths: Sequence[int], settings: Sequence[Setting],
                chunk: int = 1, progress: Optional[Callable[[Iterable], Iterable]] = None) -> dict[Setting, TokenScores]:
    """Feed ``token_ids [texts, max(lengths)]`` through the full-precision cache and each setting in lockstep.

    Every cache is prefilled with ``prefix`` tokens, then the text is teacher-forced ``chunk`` tokens per
    forward call (1: as ``generate`` decodes). Returns the scores of :data:`FULL` and of every setting;
    the texts of one batch are scored independently (no padding: they have the same length).
    """
    batch, total = token_ids.shape
    if total < max(lengths):
        raise ValueError(f"score_texts: {total} tokens, fewer than the longest length {max(lengths)}")
    if not (1 <= prefix and min(lengths) >= prefix + 2 and chunk >= 1):
        raise ValueError(f"score_texts: need 1 <= prefix, lengths >= prefix + 2 and chunk >= 1; got prefix {prefix}, "
                         f"lengths {list(lengths)}, chunk {chunk}")
    from torch_tq.integrations.transformers import cache_kwargs

    spans = decode_spans(prefix, lengths, chunk)
    everyone = [FULL] + [s for s in settings if s != FULL]
    caches = {s: s.make_cache(model, max(lengths)) for s in everyone}
    records = {s: {"nll": [], "kld": [], "top1": []} for s in everyone}
    bytes_per_token = {s: {} for s in everyone}
    checkpoints = {n - 1: n for n in lengths}
    for start, stop in (progress(spans) if progress else spans):
        ids = token_ids[:, start:stop]
        first = stop - 1 if start == 0 else start  # the prefill scores only its last position
        targets = token_ids[:, first + 1 : stop + 1]
        ref = None
        for s in everyone:
            logits = model(ids, use_cache=True, **cache_kwargs(caches[s])).logits[:, first - start :]
            logprobs = torch.log_softmax(logits.double(), dim=-1)
            if ref is None:
                ref = logprobs
            rec = records[s]
            rec["nll"].append(-logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
            rec["kld"].append(kl_divergence(ref, logprobs))
            rec["top1"].append(logprobs.argmax(-1) == ref.argmax(-1))
            if stop in checkpoints:
                bytes_per_token[s][checkpoints[stop]] = kv_bytes(caches[s]) / (batch * stop)
    return {s: TokenScores(**{k: torch.cat(v, dim=1) for k, v in records[s].items()}, bytes_per_token=bytes_per_token[s])
            for s in everyone}


# ---------------------------------------------------------------------------------------------
# Metrics and reports
# ---------------------------------------------------------------------------------------------


def perplexity(nll: torch.Tensor) -> float:
    return math.exp(nll.double().mean().item())


def percentile(values: torch.Tensor, q: float) -> float:
    """The ``q``-th percentile with linear interpolation between order statistics (numpy's default)."""
    return torch.quantile(values.double().flatten(), q / 100.0).item()


@dataclass(frozen=True)
class Metrics:
    perplexity: float
    delta_ppl_pct: float  # against the full-precision cache, percent
    mean_kld: float
    p99_kld: float
    top1: float  # fraction of positions
    bytes_per_token: float
    scored_tokens: int


def metrics(scores: TokenScores, full: TokenScores, row: int, scored: int, length: int) -> Metrics:
    """Metrics of text ``row`` over its first ``scored`` positions (a text of ``length`` tokens)."""
    ppl, ref = perplexity(scores.nll[row, :scored]), perplexity(full.nll[row, :scored])
    kld = scores.kld[row, :scored]
    return Metrics(ppl, 100.0 * (ppl / ref - 1.0), kld.mean().item(), percentile(kld, 99),
                   scores.top1[row, :scored].double().mean().item(), scores.bytes_per_token[length], scored)


def mean_metrics(per_text: Sequence[Metrics]) -> Metrics:
    """The mean over texts of every metric (the texts have equal numbers of scored tokens)."""
    mean = {name: sum(getattr(m, name) for m in per_text) / len(per_text) for name in asdict(per_text[0])}
    mean["scored_tokens"] = sum(m.scored_tokens for m in per_text)
    return Metrics(**mean)


def describe_machine() -> str:
    """CPU model, cores and torch threads, OS and torch version: the context every timing-free number still needs."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {platform.system()}, "
            f"torch {torch.__version__}")


@dataclass
class Report:
    """Everything one evaluation measured, with what is needed to read it honestly."""

    model: str
    dtype: str
    device: str
    mode: str
    prefix: int
    lengths: list[int]
    texts: list[dict]  # name, tokens, held_out
    settings: list[dict]  # label + the setting's options, in row order (full first)
    rows: list[dict]  # {"text": name or "mean", "length", "setting": label, **Metrics}
    machine: str = field(default_factory=lambda: describe_machine())
    date: str = field(default_factory=lambda: datetime.date.today().isoformat())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def rows_for(self, length: int, text: str) -> list[dict]:
        return [r for r in self.rows if r["length"] == length and r["text"] == text]

    def rows_for_setting(self, label: str, length: int) -> list[dict]:
        return [r for r in self.rows if r["setting"] == label and r["length"] == length]


def mode_description(chunk: int) -> str:
    if chunk == 1:
        return "one token per forward call through the cache (as generate decodes), teacher-forced"
    return f"CHUNKED: {chunk} tokens per forward call through the cache (not how generate decodes), teacher-forced"


def summarize(scores: dict[Setting, TokenScores], texts: Sequence[EvalText], prefix: int, lengths: Sequence[int],
              chunk: int, model: str, dtype_name: str, device: str) -> Report:
    """Per-text and mean metrics of every setting at every length."""
    full = scores[FULL]
    labels = {s: s.label(dtype_name) for s in scores}
    rows = []
    for length in sorted(lengths):
        scored = length - prefix
        for s, sc in scores.items():
            per_text = [metrics(sc, full, i, scored, length) for i in range(len(texts))]
            for text, m in zip(texts, per_text):
                rows.append({"text": text.name, "length": length, "setting": labels[s], **asdict(m)})
            rows.append({"text": "mean", "length": length, "setting": labels[s], **asdict(mean_metrics(per_text))})
    settings = [{"label": labels[s], **asdict(s)} for s in scores]
    return Report(model=model, dtype=dtype_name, device=device, mode=mode_description(chunk), prefix=prefix,
                  lengths=sorted(lengths), texts=[{"name": t.name, "tokens": len(t), "held_out": t.held_out} for t in texts],
                  settings=settings, rows=rows)


def _text_label(report: Report, name: str) -> str:
    held_out = {t["name"]: t["held_out"] for t in report.texts}.get(name)
    return name + (" (held out)" if held_out else "")


def format_table(report: Report) -> str:
    """The plain-text report: a header that says what was measured, then one table per length."""
    names = [t["name"] for t in report.texts]
    lines = [f"model: {report.model}  [{report.dtype}, device {report.device}; {report.machine}; {report.date}]",
             f"mode: {report.mode}; prefix {report.prefix} tokens prefilled",
             "texts: " + ", ".join(f"{_text_label(report, t['name'])} {t['tokens']} tok" for t in report.texts),
             "columns: B/tok = KV bytes per token held (codes + norms/scales + full-precision windows); "
             "KLD = KL(P_full || P_cache) of the next-token distribution; top-1 = same argmax as the full cache"]
    header = f"{'text':<22}{'cache':<30}{'B/tok':>8}{'ppl':>10}{'dppl':>9}{'KLD mean':>11}{'KLD p99':>10}{'top-1':>8}"
    for length in report.lengths:
        lines += ["", f"length {length} tokens ({length - report.prefix} scored per text)", header, "-" * len(header)]
        for name in names + (["mean"] if len(names) > 1 else []):
            for i, r in enumerate(report.rows_for(length, name)):
                first = i == 0
                is_full = r["setting"] == report.settings[0]["label"]
                text = (_text_label(report, name) if name != "mean" else "mean of texts") if first else ""
                lines.append(
                    f"{text:<22}{r['setting']:<30}{r['bytes_per_token']:>8,.0f}{r['perplexity']:>10.3f}"
                    + (f"{'':>9}{'':>11}{'':>10}{'':>8}" if is_full else
                       f"{r['delta_ppl_pct']:>+8.2f}%{r['mean_kld']:>11.5f}{r['p99_kld']:>10.4f}{100 * r['top1']:>7.1f}%"))
    return "\n".join(lines)


def goal_verdicts(report: Report, settings: Sequence[Setting]) -> list[str]:
    """One line per TurboQuant default setting with a goal: on how many texts it meets it, per length."""
    lines = []
    for s in settings:
        if not (isinstance(s, TurboQuantSetting) and s.goal_bits is not None):
            continue
        goal = QUALITY_GOALS[s.goal_bits]
        label = s.label(report.dtype)
        parts = []
        for length in report.lengths:
            rows = [r for r in report.rows_for_setting(label, length) if r["text"] != "mean"]
            missed = [r["text"] for r in rows if not goal.met_by(Metrics(**{k: r[k] for k in Metrics.__dataclass_fields__}))]
            parts.append(f"{length} tok: {len(rows) - len(missed)}/{len(rows)} texts"
                         + (f" (missed: {', '.join(missed)})" if missed else ""))
        lines.append(f"goal {label} ({goal.describe()}): " + "; ".join(parts))
    return lines


def format_markdown(report: Report, length: int, per_text: str = "delta_ppl_pct") -> str:
    """A markdown table of one length: ``per_text`` (``delta_ppl_pct`` or ``mean_kld``) for every text, then the
    mean metrics, one row per setting."""
    names = [t["name"] for t in report.texts]
    full_label = report.settings[0]["label"]
    column, cell = {"delta_ppl_pct": ("Δppl", "{:+.2f}%"), "mean_kld": ("KLD", "{:.5f}")}[per_text]
    head = (["cache", "B/token"] + [f"{column} {_text_label(report, n)}" for n in names]
            + ["Δppl mean", "KLD mean", "KLD p99 (mean)", "top-1 mean", "worst text KLD"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting in report.settings:
        label = setting["label"]
        rows = {r["text"]: r for r in report.rows_for_setting(label, length)}
        mean = rows.get("mean", rows[names[0]])
        if label == full_label:
            cells = [label, f"{mean['bytes_per_token']:,.0f}"] + [f"ppl {rows[n]['perplexity']:.3f}" for n in names] \
                + [f"ppl {mean['perplexity']:.3f}", "—", "—", "—", "—"]
        else:
            worst = max(names, key=lambda n: rows[n]["mean_kld"])
            cells = [label, f"{mean['bytes_per_token']:,.0f}"] + [cell.format(rows[n][per_text]) for n in names] \
                + [f"{mean['delta_ppl_pct']:+.2f}%", f"{mean['mean_kld']:.5f}", f"{mean['p99_kld']:.4f}",
                   f"{100 * mean['top1']:.1f}%", f"{rows[worst]['mean_kld']:.5f} ({worst})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
