"""Timings of torch_tq's gated-delta-rule ops next to transformers' pure-PyTorch fallback (CPU or CUDA).

    python benchmarks/gated_delta.py [--device cpu|cuda] [--T 4096] [--repeats 3] [--dtype float32] [--threads N]
                                     [--json] [--out FILE] [--profile]

Rows: the chunked prefill ``chunk_gated_delta_rule`` against transformers'
``torch_chunk_gated_delta_rule`` (Qwen3-Next modeling file), and one recurrent decode step
(T=1, carrying a state) ``fused_recurrent_gated_delta_rule`` against
``torch_recurrent_gated_delta_rule``. Shape B=1, H=16, HV=32, K=V=128 (Qwen3-Next-80B's linear
attention), q/k l2-normalised in the op. Each row's outputs and final states are compared with the
reference before timing; a row that disagrees prints "—" instead of a speedup. Median of
--repeats runs after one warm-up (CUDA: synchronized). On CUDA the "tq" column is what the op
dispatches to (FLA's kernels when flash-linear-attention is installed); further rows per op time
torch_tq's PyTorch reference and its GPU-shaped PyTorch path (``gated_delta_torch``, what CUDA runs
without FLA; chunked once per triangular-solve variant) on the GPU. A second table counts the aten
ops (not views: about one kernel launch each) per call and per extra chunk / token of every
implementation; --profile (CUDA) lists the GPU-shaped path's kernels by GPU time. --out FILE also
writes the JSON there. Never asserts.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import inspect
import json
import os

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from _timing import cpu_name, median_ms

import torch_tq  # noqa: F401  (defines torch.ops.tq)
from torch_tq import _gated_delta_ops as gdr
from torch_tq.backends.cpu import gated_delta_rule as torch_reference
from torch_tq.backends.cuda import gated_delta_torch
from torch_tq.integrations.gated_delta import fla_available


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


class _CountOps(TorchDispatchMode):
    """Counts the aten ops that are not views."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> int:
    with _CountOps() as mode:
        fn()
    return mode.count


def profile_table(fn, rows: int = 12) -> str:
    """The kernels of one ``fn()`` (after a warm-up) by GPU time, as torch.profiler's table; the error
    text where the profiler cannot run (the timings above do not depend on it)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows)
    except Exception as exc:  # noqa: BLE001 - a profile is informative only
        return f"profiler failed: {type(exc).__name__}: {exc}"


def inputs(B, T, H, HV, K, V, dtype, device):
    q, k = torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype)
    v = torch.randn(B, T, HV, V, dtype=dtype)
    g = -F.softplus(torch.randn(B, T, HV))  # log decays < 0, float32 as the models pass them
    beta = torch.randn(B, T, HV).sigmoid().to(dtype)
    return tuple(x.to(device) for x in (q, k, v, g, beta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--T", type=int, default=4096, help="prefill length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-repeats", type=int, default=50)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default); "
                        "1 gives steadier numbers on a shared machine")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", help="also write the JSON report to this file")
    parser.add_argument("--profile", action="store_true", help="CUDA: also print the GPU-shaped PyTorch path's "
                        "kernels by GPU time (torch.profiler, one call each)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers.models.qwen3_next import modeling_qwen3_next as qwen
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "falling back to PyTorch" notice, once per call site
    # The reference column is always transformers' pure-PyTorch functions, underneath the decorator
    # that binds them to FLA's kernels where FLA imports.
    device = torch.device(args.device)
    chunk_ref = inspect.unwrap(qwen.torch_chunk_gated_delta_rule)
    recurrent_ref = inspect.unwrap(qwen.torch_recurrent_gated_delta_rule)
    if device.type == "cuda":
        fla_note = "; tq = " + ("FLA's kernels" if fla_available(device) else "torch_tq's GPU-shaped PyTorch path (FLA absent)")
    else:
        fla_note = ("; FLA is installed but left out: its kernels need CUDA tensors"
                    if importlib.util.find_spec("fla") is not None else "")
    reference = ("transformers torch_chunk_gated_delta_rule / torch_recurrent_gated_delta_rule (Qwen3-Next, "
                 f"pure PyTorch){fla_note}")
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    B, H, HV, K, V = 1, 16, 32, 128, 128
    # The state check is relative to float32 rounding of a long recurrence; the output check to the dtype.
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    rows = []

    kw = dict(output_final_state=True, use_qk_l2norm_in_kernel=True)

    def add_row(op, T, ref_fn, tq_fn, repeats, name=None):
        (o_ref, s_ref), (o_tq, s_tq) = ref_fn(), tq_fn()
        err = max(rel_rms(o_ref, o_tq), rel_rms(s_ref, s_tq))
        rows.append(dict(op=name or op, B=B, T=T, H=H, HV=HV, K=K, V=V, dtype=args.dtype,
                         ref_ms=median_ms(ref_fn, repeats, device), tq_ms=median_ms(tq_fn, repeats, device),
                         rel_err=err, verified=err <= tol))
        return s_ref

    # transformers' functions take q/k with one head per value head (older releases have no GVA; the
    # Qwen3-Next model repeats them before the call): value head i reads key head i // (HV / H).
    per_value_head = lambda x: x.repeat_interleave(HV // H, dim=2)  # noqa: E731
    on_cuda = device.type == "cuda"
    # name -> (chunked, recurrent) functions of (q, k, v, g, beta, **kw) with q, k per key head.
    impls = {"tq": (gdr.chunk_gated_delta_rule, gdr.fused_recurrent_gated_delta_rule)}
    if on_cuda:  # (on CPU, "tq" is the reference or the native kernels)
        impls["torch_tq reference"] = (torch_reference.chunk_gated_delta_rule,
                                       torch_reference.fused_recurrent_gated_delta_rule)
    for solve in gated_delta_torch.SOLVES:
        impls[f"gpu torch, {solve}"] = (
            lambda *a, solve=solve, **kwargs: gated_delta_torch.chunk_gated_delta_rule(*a, solve=solve, **kwargs), None)
    impls["gpu torch"] = (None, gated_delta_torch.fused_recurrent_gated_delta_rule)
    transformers_fns = (lambda q, k, *a, **kw: chunk_ref(per_value_head(q), per_value_head(k), *a, **kw),
                        lambda q, k, *a, **kw: recurrent_ref(per_value_head(q), per_value_head(k), *a, **kw))

    q, k, v, g, beta = inputs(B, args.T, H, HV, K, V, dtype, device)
    ref_fn = lambda: transformers_fns[0](q, k, v, g, beta, **kw)  # noqa: E731
    s_ref = None
    for name, (chunk_fn, _) in impls.items():
        if chunk_fn is not None:
            s = add_row("chunk_gated_delta_rule", args.T, ref_fn, lambda f=chunk_fn: f(q, k, v, g, beta, **kw),
                        args.repeats, name=None if name == "tq" else f"chunk ({name})")
            s_ref = s if s_ref is None else s_ref

    q1, k1, v1, g1, beta1 = inputs(B, 1, H, HV, K, V, dtype, device)
    state = s_ref.clone()
    ref_fn = lambda: transformers_fns[1](q1, k1, v1, g1, beta1, initial_state=state, **kw)  # noqa: E731
    for name, (_, recurrent_fn) in impls.items():
        if recurrent_fn is not None:
            add_row("fused_recurrent_gated_delta_rule", 1, ref_fn,
                    lambda f=recurrent_fn: f(q1, k1, v1, g1, beta1, initial_state=state, **kw), args.decode_repeats,
                    name=None if name == "tq" else f"recurrent ({name})")

    # Op counts: per call at T (chunked) or T = 1 (decode), and the increments of one more chunk / token.
    def ops_of(fn, T):
        x = inputs(B, T, H, HV, K, V, dtype, device)
        return count_ops(lambda: fn(*x, initial_state=state, **kw))

    op_counts = []
    # Not "tq": it is one custom op to the counter (FLA's Triton launches are no aten ops either).
    counted = {"transformers": transformers_fns,
               "torch_tq reference": (torch_reference.chunk_gated_delta_rule,
                                      torch_reference.fused_recurrent_gated_delta_rule),
               **{name: fns for name, fns in impls.items() if name.startswith("gpu torch")}}
    for name, (chunk_fn, recurrent_fn) in counted.items():
        row = dict(impl=name)
        if chunk_fn is not None:
            row["chunk_ops"] = ops_of(chunk_fn, args.T)
            row["chunk_ops_per_chunk"] = ops_of(chunk_fn, 3 * 64) - ops_of(chunk_fn, 2 * 64)
        if recurrent_fn is not None:
            row["decode_ops"] = ops_of(recurrent_fn, 1)
            row["recurrent_ops_per_token"] = ops_of(recurrent_fn, 3) - ops_of(recurrent_fn, 2)
        op_counts.append(row)

    profiles = {}
    if args.profile and on_cuda:
        profiled = {name: (lambda f=fns[0]: f(q, k, v, g, beta, **kw)) if fns[0] else
                    (lambda f=fns[1]: f(q1, k1, v1, g1, beta1, initial_state=state, **kw))
                    for name, fns in impls.items() if name.startswith("gpu torch")}
        for name, fn in profiled.items():
            profiles[name] = profile_table(fn)

    machine = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   device=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
                   cores=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                   load_avg=" ".join(f"{x:.2f}" for x in os.getloadavg()))
    report = dict(machine=machine, reference=reference, rows=rows, op_counts=op_counts, profiles=profiles)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(" | ".join(f"{k} {v}" for k, v in machine.items()))
    print(f"reference: {reference}")
    header = f"{'op':<34}{'B':>3}{'T':>6}{'H':>4}{'HV':>4}{'K':>5}{'V':>5}  {'dtype':<9}{'ref ms':>10}{'tq ms':>10}{'speedup':>9}{'rel err':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        speedup = f"{r['ref_ms'] / r['tq_ms']:.1f}x" if r["verified"] else "—"
        print(f"{r['op']:<34}{r['B']:>3}{r['T']:>6}{r['H']:>4}{r['HV']:>4}{r['K']:>5}{r['V']:>5}  {r['dtype']:<9}"
              f"{r['ref_ms']:>10.2f}{r['tq_ms']:>10.2f}{speedup:>9}{r['rel_err']:>10.1e}")
    print(f"\naten ops (not views) per call (chunked at T={args.T}, decode at T=1) and per extra chunk / token")
    print(f"{'implementation':<34}{'chunk':>8}{'/chunk':>8}{'decode':>8}{'/token':>8}")
    for r in op_counts:
        cells = [r.get(key, "") for key in ("chunk_ops", "chunk_ops_per_chunk", "decode_ops", "recurrent_ops_per_token")]
        print(f"{r['impl']:<34}" + "".join(f"{c:>8}" for c in cells))
    for name, table in profiles.items():
        print(f"\nprofile, {name} (one call after warm-up):\n{table}")


if __name__ == "__main__":
    main()
