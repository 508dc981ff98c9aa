"""Device-memory traffic of torch_tq's Metal kernels as counted by the MSL simulator, next to each op's minimum.

    python benchmarks/mps_sim_traffic.py [--kv-len 4096] [--bits 4] [--v-bits B] [--windows S W]
                                         [--quant-tokens 256] [--chunk-T 256] [--json]

Default sizes (all printed with the table): decode attention B=1, Hq=32, Hkv=8, D=128, 4 bits,
kv_len 4096, float16 q; hadamard_quantize_kv of 256 tokens x 8 heads, D=128, float16; one recurrent
decode step B=1, T=1, H=16, HV=32, K=V=128 carrying a state; the chunked op B=1, T=256, H=2, HV=4,
K=V=128 with the q/k l2norm, initial and final state (gated-delta q/k/v float32). About half a
minute on 2 cores once the simulator's kernels are compiled (cached in $TQ_SIM_CACHE, default
<tmp>/torch_tq_sim_cache as in tests/mps_sim/_plans.py).

THIS IS NOT A TIMING BENCHMARK AND NOTHING HERE RUNS ON A GPU. Every op runs on CPU tensors through
its C++ launch plan (mps_ops/plans/) and the project's MSL simulator (mps_ops/sim/), exactly as the
tests in tests/mps_sim/ do, and the simulator counts the bytes each launch loads from and stores to
device buffers (inputs, outputs and scratch; the setBytes payloads -- params, codebook, dummy
buffers -- are constant data in the command buffer on a Mac and are left out, see
``_plans.device_bytes``). The simulator has no cache model: a thread's reload of bytes it already
loaded since its last barrier is free, every other re-read (by another thread or threadgroup, or
after a barrier) is counted (mps_ops/sim/README.md, "stats"). The counts are therefore roughly an
upper bound of the DRAM traffic of a GPU whose caches catch some of those re-reads (a 512-byte sign
vector read by every threadgroup surely stays in cache). They say how much a kernel moves beyond the
unavoidable minimum, not how long it takes.

Minimum traffic of an op: every input element it needs read once, every output element written
once, in the dtypes the plan binds (float32 gates/beta/state, codes as packed bytes):

  flash_attn_vec_tq (decode, Lq=1)   k_codes + v_codes (B Hkv kv_len D bits/8 each)
                                     + k_norms + v_norms (float32, B Hkv kv_len D/R each, R the
                                     rotation block: 128 at D=128)
                                     + signs (D float32) + q read + o written (B Hq D, q's dtype each)
                                     -- the formula of tests/mps_sim/test_mps_attention.py plus the
                                     512-byte sign vector, which that test leaves out
  ... with --windows S W              the S sink and W recent positions come from full-precision windows
                                     (q's dtype, B Hkv S|W D each for K and V, read once) instead of the
                                     codes: the minimum counts codes and norms of the other positions only
  hadamard_quantize_kv               src read (B T Hkv D, its dtype) + signs (D float32)
                                     + codes written (B Hkv T D bits/8) + norms written (float32, B Hkv T D/R)
  ... with --windows                 + offset read (float32 B Hkv D) + sink (4) and recent (32) windows
                                     written once (src's dtype), norm correction on
  fused_recurrent_gated_delta_rule   state read + final state written (float32, B HV K V each)
  (decode, T=1)                      + q, k (B T H K each) + v (B T HV V) + o written (B T HV V), dtype el
                                     + g, beta (float32, B T HV each)
                                     -- tests/mps_sim/test_mps_gated_delta_recurrent.py's formula
  chunk_gated_delta_rule (op)        q, k (B T H K) + v (B T HV V) read, o (B T HV V) written, dtype el
                                     + g, beta (float32, B T HV each) + initial state read + final state
                                     written (float32, N HV K V each)
                                     -- one fused launch (gated_delta_fused.h), no scratch

Each op, and each launch of the chunked op, also lists per operand the counted bytes over that
operand's logical size ("k 4.00x" = k was read four times over; split-KV partials, which are not
part of the minimum, in KiB). The chunked op's per-launch table splits each launch's counted bytes
by binding kind (op inputs read, scratch read, scratch written, op outputs written), next to the
launch's own minimum, and lists the scratch buffers the plan allocates (none since the fused
kernel). Each output
is also compared with the CPU reference op (relative RMS error, or the share of differing codes
for the quantizer, where ulp-level norm differences may flip a code at a decision boundary).
Never asserts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This checkout's torch_tq (not an installed one: the CPU references must match these plans and kernels);
# the simulator harness lives with the tests; its compile cache defaults like the tests' (_plans.py).
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "mps_sim"))
os.environ.setdefault("TQ_SIM_CACHE", str(Path(tempfile.gettempdir()) / "torch_tq_sim_cache"))

import torch  # noqa: E402

import torch_tq  # noqa: E402,F401  (defines torch.ops.tq: the CPU references)
import _plans  # noqa: E402
from _gdr import entry_inputs  # noqa: E402
from _timing import cpu_name  # noqa: E402
from torch_tq.layout import unpack_codes  # noqa: E402

KIND_NAMES = {_plans.ARG_INPUT: "input", _plans.ARG_OUTPUT: "output", _plans.ARG_SCRATCH: "scratch"}

# Names of the chunked op's bindings: Arg::Input / Arg::Output index (mps_ops/plans/chunk_gated_delta_rule.h).
CHUNK_INPUTS = ["q", "k", "v", "g", "beta", "initial_state", "cu_seqlens"]
CHUNK_OUTPUTS = ["o", "final_state"]


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def el(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def split(stats: list) -> dict:
    """Bytes of the launches in ``stats`` by binding kind: input/scratch/output x read/written."""
    out = {f"{kind}_{rw}": 0 for kind in KIND_NAMES.values() for rw in ("read", "written")}
    for s in stats:
        for n, (kind, _index) in enumerate(s["bindings"]):
            if kind in KIND_NAMES:
                out[f"{KIND_NAMES[kind]}_read"] += s["report"].bytes_read.get(n, 0)
                out[f"{KIND_NAMES[kind]}_written"] += s["report"].bytes_written.get(n, 0)
    return out


def per_operand(stats: list, namer, size: dict) -> dict:
    """Counted bytes (read + written) of each named operand over the launches in ``stats``, and the
    multiple of its logical size (None for operands outside the minimum, e.g. split-KV partials)."""
    out = {}
    for s in stats:
        for n, (kind, index) in enumerate(s["bindings"]):
            name = namer(s["kernel"], kind, index) if kind in KIND_NAMES else None
            if name is None:
                continue
            e = out.setdefault(name, dict(kind=KIND_NAMES[kind], bytes=0))
            e["bytes"] += s["report"].bytes_read.get(n, 0) + s["report"].bytes_written.get(n, 0)
    for name, e in out.items():
        e["times"] = e["bytes"] / size[name] if size.get(name) else None
    return out


def operand_text(per: dict) -> str:
    return ", ".join(f"{n} {e['times']:.2f}x" if e["times"] is not None else f"{n} {e['bytes'] / 2**10:.0f} KiB"
                     for n, e in per.items())


def op_namer(op: str, outputs=("o",), scratch=()):
    """Binding names of a single-launch-plan op: its schema tensors, then the plan's outputs and scratch."""
    inputs = _plans.OP_TENSORS[op]

    def name(_kernel, kind, index):
        return {_plans.ARG_INPUT: inputs, _plans.ARG_OUTPUT: outputs, _plans.ARG_SCRATCH: scratch}[kind][index]
    return name


def row(op: str, sizes: str, stats: list, size: dict, namer, check: str, seconds: float, **extra) -> dict:
    """A table row; the minimum is the sum of ``size`` (every operand of the op read or written once)."""
    moved, minimum = _plans.device_bytes(stats), sum(size.values())
    return dict(op=op, sizes=sizes, launches=len(stats), kernels=[s["kernel"] for s in stats], moved=moved,
                minimum=minimum, ratio=moved / minimum, check=check, sim_seconds=seconds, **split(stats),
                per_operand=per_operand(stats, namer, size), **extra)


# ---- the ops -------------------------------------------------------------------------------------

def attention_decode(kv_len: int, dtype: torch.dtype, bits: int, v_bits: int | None = None, sinks: int = 0,
                     recent: int = 0) -> dict:
    """tests/mps_sim/test_mps_attention.py::test_flash_attn_vec_tq_decode_bytes_moved at any kv_len; optionally
    with value codes of their own width and full-precision sink/recent windows (in q's dtype), whose positions
    are read from the windows instead of the codes (the minimum counts each position from its source once)."""
    B, Hq, Hkv, D = 1, 32, 8, 128
    C = kv_len
    v_bits = bits if v_bits is None else v_bits
    k_codes = torch.randint(0, 256, (B, Hkv, C, D * bits // 8), dtype=torch.uint8)
    v_codes = torch.randint(0, 256, (B, Hkv, C, D * v_bits // 8), dtype=torch.uint8)
    k_norms = torch.rand(B, Hkv, C, 1) * 10 + 1
    v_norms = torch.rand(B, Hkv, C, 1) * 10 + 1
    q = torch.randn(B, Hq, 1, D, dtype=dtype)
    signs = torch_tq.hadamard_signs(D)
    windows = dict(k_sink=None, v_sink=None, k_recent=None, v_recent=None)
    if sinks:
        windows.update(k_sink=torch.randn(B, Hkv, sinks, D, dtype=dtype), v_sink=torch.randn(B, Hkv, sinks, D, dtype=dtype))
    if recent:
        windows.update(k_recent=torch.randn(B, Hkv, recent, D, dtype=dtype),
                       v_recent=torch.randn(B, Hkv, recent, D, dtype=dtype))
    stats = []
    t0 = time.perf_counter()
    out = _plans.run("flash_attn_vec_tq", q=q, k_codes=k_codes, k_norms=k_norms, v_codes=v_codes, v_norms=v_norms,
                     kv_len=kv_len, scale=D**-0.5, bits=bits, signs=signs, v_bits=v_bits, **windows, stats=stats)
    seconds = time.perf_counter() - t0
    ref = torch.ops.tq.flash_attn_vec_tq(q, k_codes, k_norms, v_codes, v_norms, kv_len, D**-0.5, bits, signs=signs,
                                         v_bits=v_bits, **windows)
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    coded = kv_len - min(kv_len, sinks + recent)  # positions read from the codes
    size = dict(q=nbytes(q), k_codes=nbytes(k_codes) * coded // C, k_norms=nbytes(k_norms) * coded // C,
                v_codes=nbytes(v_codes) * coded // C, v_norms=nbytes(v_norms) * coded // C, signs=nbytes(signs),
                **{name: nbytes(t) for name, t in windows.items() if t is not None}, o=nbytes(q))
    test_minimum = sum(size.values()) - size["signs"]  # the test's formula (no sign vector)
    extra = (f" v{v_bits}" if v_bits != bits else "") + (f" S{sinks}" if sinks else "") + (f" W{recent}" if recent else "")
    return row("flash_attn_vec_tq decode", f"B{B} Hq{Hq} Hkv{Hkv} D{D} b{bits}{extra} kv{kv_len} {str(dtype)[6:]}",
               stats, size, op_namer("flash_attn_vec_tq", scratch=("partial_o", "partial_max_sum")),
               f"rel err {rel_rms(ref.float(), out.float()):.1e}", seconds,
               ratio_test_formula=_plans.device_bytes(stats) / test_minimum)


def quantize(T: int, dtype: torch.dtype, bits: int, decode_path: bool = False) -> dict:
    """hadamard_quantize_kv of T tokens; with ``decode_path`` also the key offset, the norm correction and
    full-precision sink (4) and recent (32) windows in src's dtype (written once: part of the minimum)."""
    B, Hkv, D = 1, 8, 128
    signs = torch_tq.hadamard_signs(D)
    src = (torch.randn(B, T, Hkv, D) * 2).to(dtype)
    codes, norms = torch_tq.allocate_quantized_kv(B, Hkv, T, D, bits)
    ref_codes, ref_norms = codes.clone(), norms.clone()
    options = dict(offset=None, norm_correction=False, sink=None, recent=None)
    if decode_path:
        options = dict(offset=torch.randn(B, Hkv, D), norm_correction=True,
                       sink=torch.zeros(B, Hkv, min(4, T), D, dtype=dtype),
                       recent=torch.zeros(B, Hkv, min(32, T), D, dtype=dtype))
    ref_options = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    torch.ops.tq.hadamard_quantize_kv(src, ref_codes, ref_norms, 0, False, bits, signs, **ref_options)
    stats = []
    t0 = time.perf_counter()
    _plans.run("hadamard_quantize_kv", src=src, codes=codes, norms=norms, write_pos=0, is_sliding=False, bits=bits,
               signs=signs, **options, stats=stats)
    seconds = time.perf_counter() - t0
    differ = (unpack_codes(codes, bits) != unpack_codes(ref_codes, bits)).double().mean().item()
    size = dict(src=src.numel() * src.element_size(), codes=codes.numel(), norms=4 * norms.numel(),
                signs=4 * signs.numel())
    if decode_path:
        size.update({name: t.numel() * t.element_size() for name, t in options.items() if isinstance(t, torch.Tensor)})
    return row("hadamard_quantize_kv", f"B{B} T{T} Hkv{Hkv} D{D} b{bits} {str(dtype)[6:]}"
               + (" offset+nc+S4+W32" if decode_path else ""), stats, size,
               op_namer("hadamard_quantize_kv"),
               f"codes differ {100 * differ:.3f}%, norms rel err {rel_rms(ref_norms, norms):.1e}", seconds)


def recurrent_decode(H: int, HV: int, K: int, V: int, dtype: torch.dtype) -> dict:
    B, T = 1, 1
    args = entry_inputs(B, T, H, HV, K, V, dtype, True, seed=3)
    ref_o, ref_state = torch.ops.tq.fused_recurrent_gated_delta_rule(**args, output_final_state=True)
    stats = []
    t0 = time.perf_counter()
    o, state = _plans.run("fused_recurrent_gated_delta_rule", **args, output_final_state=True, stats=stats)
    seconds = time.perf_counter() - t0
    e = el(dtype)
    size = dict(q=B * T * H * K * e, k=B * T * H * K * e, v=B * T * HV * V * e, g=B * T * HV * 4,
                beta=B * T * HV * 4, initial_state=B * HV * K * V * 4, o=B * T * HV * V * e,
                final_state=B * HV * K * V * 4)
    err = max(rel_rms(ref_o.float(), o.float()), rel_rms(ref_state, state))
    return row("fused_recurrent_gated_delta_rule", f"B{B} T{T} H{H} HV{HV} K{K} V{V} {str(dtype)[6:]} state in/out",
               stats, size, op_namer("fused_recurrent_gated_delta_rule", outputs=("o", "final_state")),
               f"rel err {err:.1e}", seconds)


def chunk_logical_sizes(B, T, H, HV, K, V, N, e) -> dict:
    """Bytes of each operand of the chunked op, read or written once (e: q/k/v/o element size)."""
    rows = B * T
    return {
        "q": rows * H * K * e, "k": rows * H * K * e, "v": rows * HV * V * e, "g": rows * HV * 4,
        "beta": rows * HV * 4, "initial_state": N * HV * K * V * 4, "o": rows * HV * V * e,
        "final_state": N * HV * K * V * 4,
    }


def chunk_binding_name(kernel: str, kind: int, index: int) -> str | None:
    if kind == _plans.ARG_INPUT:
        return CHUNK_INPUTS[index]
    if kind == _plans.ARG_OUTPUT:
        return CHUNK_OUTPUTS[index]
    return None


def chunk(T: int, H: int, HV: int, K: int, V: int, dtype: torch.dtype) -> tuple[dict, list, list]:
    B = N = 1
    args = entry_inputs(B, T, H, HV, K, V, dtype, True, seed=11)
    args.update(output_final_state=True)
    ref_o, ref_state = torch.ops.tq.chunk_gated_delta_rule(**args)
    p = _plans.plan("chunk_gated_delta_rule", **args)
    stats = []
    t0 = time.perf_counter()
    o, state = _plans.run("chunk_gated_delta_rule", **args, stats=stats)
    seconds = time.perf_counter() - t0
    size = chunk_logical_sizes(B, T, H, HV, K, V, N, el(dtype))
    op_size = dict(size)
    err = max(rel_rms(ref_o.float(), o.float()), rel_rms(ref_state, state))
    op_row = row("chunk_gated_delta_rule", f"B{B} T{T} H{H} HV{HV} K{K} V{V} {str(dtype)[6:]} l2norm, state in/out",
                 stats, op_size, chunk_binding_name, f"rel err {err:.1e}", seconds,
                 scratch_bytes=sum(p["scratch_bytes"]))

    stages = []
    for s in stats:
        per = per_operand([s], lambda *b: None if chunk_binding_name(*b) == "cu_seqlens" else chunk_binding_name(*b),
                          size)
        label = s["kernel"]
        stage_min = sum(size[name] for name in per)
        moved = _plans.device_bytes([s])
        stages.append(dict(stage=label, grid=s["grid"], moved=moved, minimum=stage_min, ratio=moved / stage_min,
                           **split([s]), per_operand=per))
    scratch = [dict(buffer=f"scratch {i}", bytes=b) for i, b in enumerate(p["scratch_bytes"])]
    return op_row, stages, scratch


# ---- output --------------------------------------------------------------------------------------

def mib(n: int) -> str:
    return f"{n / 2**20:.3f}"


def kib(n: int) -> str:
    return f"{n / 2**10:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-len", type=int, default=4096, help="decode attention context (B=1 Hq=32 Hkv=8 D=128)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"],
                        help="q of the attention and src of the quantizer")
    parser.add_argument("--v-bits", type=int, default=None, help="the values' code width (default: --bits)")
    parser.add_argument("--windows", type=int, nargs=2, default=[0, 0], metavar=("S", "W"),
                        help="also run decode attention with S sink and W recent full-precision positions "
                             "(and the quantizer with offset, norm correction and windows)")
    parser.add_argument("--quant-tokens", type=int, default=256, help="tokens hadamard_quantize_kv writes (Hkv=8)")
    parser.add_argument("--gdr-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="q/k/v/o of the gated-delta ops (g, beta, states are float32)")
    parser.add_argument("--recurrent-heads", type=int, nargs=2, default=[16, 32], metavar=("H", "HV"))
    parser.add_argument("--chunk-T", type=int, default=256)
    parser.add_argument("--chunk-heads", type=int, nargs=2, default=[2, 4], metavar=("H", "HV"))
    parser.add_argument("--K", type=int, default=128, help="key head dim of the gated-delta ops")
    parser.add_argument("--V", type=int, default=128, help="value head dim of the gated-delta ops")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype, gdr_dtype = getattr(torch, args.dtype), getattr(torch, args.gdr_dtype)

    start = time.perf_counter()
    rows = [attention_decode(args.kv_len, dtype, args.bits, args.v_bits)]
    if any(args.windows):
        rows.append(attention_decode(args.kv_len, dtype, args.bits, args.v_bits, *args.windows))
    rows.append(quantize(args.quant_tokens, dtype, args.bits))
    if any(args.windows):
        rows.append(quantize(args.quant_tokens, dtype, args.bits, decode_path=True))
    rows.append(recurrent_decode(*args.recurrent_heads, args.K, args.V, gdr_dtype))
    chunk_row, stages, scratch = chunk(args.chunk_T, *args.chunk_heads, args.K, args.V, gdr_dtype)
    rows.append(chunk_row)
    wall = time.perf_counter() - start

    machine = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   cpu=cpu_name(), cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version())
    if args.json:
        print(json.dumps(dict(machine=machine, what="simulated device bytes, not time", rows=rows, chunk_stages=stages,
                              chunk_scratch=scratch, sim_wall_seconds=wall), indent=2, default=str))
        return

    print("SIMULATED DEVICE-MEMORY TRAFFIC of the Metal kernels (MSL simulator on CPU; no GPU, not a time)")
    print(" | ".join(f"{k} {v}" for k, v in machine.items()))
    print("bytes = device loads + stores of inputs, outputs and scratch as the simulator counts them (no cache"
          " model; setBytes constants excluded); min = every input read once, every output written once")
    print()
    header = f"{'op':<34}{'sizes':<54}{'launches':>9}{'moved MiB':>11}{'min MiB':>10}{'ratio':>8}  check vs CPU ref"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['op']:<34}{r['sizes']:<54}{r['launches']:>9}{mib(r['moved']):>11}{mib(r['minimum']):>10}"
              f"{r['ratio']:>8.3f}  {r['check']}")
    print(f"(attention ratio with tests/mps_sim/test_mps_attention.py's minimum, which leaves out the sign vector:"
          f" {rows[0]['ratio_test_formula']:.4f})")
    print()
    print("per operand, counted bytes / logical size (scratch outside the minimum in KiB):")
    for r in rows[:-1]:
        print(f"  {r['op']:<34}{operand_text(r['per_operand'])}  [{', '.join(r['kernels'])}]")

    print()
    print(f"chunk_gated_delta_rule per launch ({rows[-1]['sizes']}); KiB by binding kind; "
          "stage min = the stage's operands once")
    header = (f"{'stage kernel':<34}{'grid':>12}{'in rd':>8}{'scr rd':>8}{'scr wr':>8}{'out wr':>8}"
              f"{'total':>8}{'min':>8}{'ratio':>7}  per operand: counted / logical size")
    print(header)
    print("-" * len(header))
    for s in stages:
        per = operand_text(s["per_operand"])
        grid = "x".join(str(g) for g in s["grid"])
        print(f"{s['stage']:<34}{grid:>12}{kib(s['input_read']):>8}{kib(s['scratch_read']):>8}"
              f"{kib(s['scratch_written']):>8}{kib(s['output_written']):>8}{kib(s['moved']):>8}"
              f"{kib(s['minimum']):>8}{s['ratio']:>7.2f}  {per}")
    total_stage_min = sum(s["minimum"] for s in stages)
    print(f"{'all stages':<34}{'':>12}{kib(chunk_row['input_read']):>8}{kib(chunk_row['scratch_read']):>8}"
          f"{kib(chunk_row['scratch_written']):>8}{kib(chunk_row['output_written']):>8}"
          f"{kib(chunk_row['moved']):>8}{kib(total_stage_min):>8}{chunk_row['moved'] / total_stage_min:>7.2f}"
          f"  (op minimum {kib(chunk_row['minimum'])} KiB: ratio {chunk_row['ratio']:.2f})")
    print("scratch allocated by the plan: " + (", ".join(f"{s['buffer']} {s['bytes'] / 2**10:.0f} KiB" for s in scratch)
                                               + " = " if scratch else "none, ") + f"{mib(chunk_row['scratch_bytes'])} MiB")
    print()
    print(f"simulation wall time {wall:.0f} s on this CPU (simulator speed only; says nothing about GPU time)")


if __name__ == "__main__":
    main()
