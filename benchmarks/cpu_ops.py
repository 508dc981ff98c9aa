"""CPU decode attention: the native TurboQuant kernels vs the pure-PyTorch reference vs SDPA over full caches.

    python benchmarks/cpu_ops.py [--threads N] [--contexts 1024 4096 16384 65536] [--shapes smollm2 llama]
                                 [--repeats 5] [--bits 4] [--reference-max 16384] [--json]

One decode step (B=1, Lq=1) of one attention layer at each context length N, for two shapes:
SmolLM2-135M (Hq=9, Hkv=3, D=64) and a Llama-like layer (Hq=32, Hkv=8, D=128). Columns:

* ``native``: ``tq.flash_attn_vec_tq`` on the packed 4-bit cache (the C++ kernels);
* ``reference``: ``torch_tq.reference.flash_attn_vec_tq`` (dequantizes the whole cache every call;
  skipped above ``--reference-max``);
* ``sdpa f32`` / ``sdpa bf16``: ``scaled_dot_product_attention(enable_gqa=True)`` over a float32 /
  bfloat16 ``[B, Hkv, N, D]`` cache (what a full-precision decode step reads, GQA not expanded).

Each number is the median of ``--repeats`` runs after one warm-up. Threads: ``torch.set_num_threads
(--threads)`` (default: torch's default, all cores); the native kernels split each call over
(batch, KV head, position block) on that many threads, SDPA uses the same pool. The native kernel
is checked against the reference on the first context before anything is timed (``check``).
The header records the machine, the thread count and the load average: on a shared machine,
numbers measured under load say little.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
import torch.nn.functional as F

from _timing import cpu_name, median_ms

import torch_tq
from torch_tq.backends import cpu_native

SHAPES = {"smollm2": (9, 3, 64), "llama": (32, 8, 128)}


def make_cache(Hkv: int, D: int, N: int, bits: int, signs: torch.Tensor):
    """Packed K/V of N random tokens (written in chunks, as a prefill would) and the float32 K/V themselves."""
    kc = torch_tq.allocate_quantized_kv(1, Hkv, N, D, bits)
    vc = torch_tq.allocate_quantized_kv(1, Hkv, N, D, bits)
    k, v = torch.randn(1, N, Hkv, D), torch.randn(1, N, Hkv, D)
    for start in range(0, N, 4096):
        stop = min(N, start + 4096)
        torch_tq.hadamard_quantize_kv(k[:, start:stop], *kc, start, bits=bits, signs=signs)
        torch_tq.hadamard_quantize_kv(v[:, start:stop], *vc, start, bits=bits, signs=signs)
    return kc, vc, k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--reference-max", type=int, default=16384, help="skip the reference above this context")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    native, impl = cpu_native.status()  # builds the kernels once, before anything is timed
    if not native:
        print(f"# note: torch.ops.tq on CPU is the reference here: {impl}")
    torch.manual_seed(0)
    bits = args.bits
    rows = []
    for shape in args.shapes:
        Hq, Hkv, D = SHAPES[shape]
        signs = torch_tq.hadamard_signs(D)
        scale = D**-0.5
        src = torch.randn(1, 1024, Hkv, D)
        cache = torch_tq.allocate_quantized_kv(1, Hkv, 1024, D, bits)
        q_ms = median_ms(lambda: torch_tq.hadamard_quantize_kv(src, *cache, 0, bits=bits, signs=signs), args.repeats)
        q_ref_ms = median_ms(lambda: torch_tq.reference.hadamard_quantize_kv(src, *cache, 0, bits=bits, signs=signs),
                             args.repeats)
        rows.append(dict(op="hadamard_quantize_kv", shape=shape, Hkv=Hkv, D=D, T=1024, bits=bits, native_ms=q_ms,
                         reference_ms=q_ref_ms))
        for i, N in enumerate(args.contexts):
            kc, vc, k, v = make_cache(Hkv, D, N, bits, signs)
            q = torch.randn(1, Hq, 1, D)
            call = (q, *kc, *vc, N, scale, bits)
            check = None
            if i == 0:
                out = torch_tq.flash_attn_vec_tq(*call, signs=signs)
                ref = torch_tq.reference.flash_attn_vec_tq(*call, signs=signs)
                check = bool(torch.allclose(out, ref, rtol=1e-4, atol=1e-5))
            native_ms = median_ms(lambda: torch_tq.flash_attn_vec_tq(*call, signs=signs), args.repeats)
            reference_ms = None
            if N <= args.reference_max:
                reference_ms = median_ms(lambda: torch_tq.reference.flash_attn_vec_tq(*call, signs=signs),
                                         max(1, min(args.repeats, 3)))
            sdpa = {}
            for name, dtype in (("sdpa_f32_ms", torch.float32), ("sdpa_bf16_ms", torch.bfloat16)):
                qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
                sdpa[name] = median_ms(lambda: F.scaled_dot_product_attention(qd, kd, vd, scale=scale, enable_gqa=True),
                                       args.repeats)
                del qd, kd, vd
            rows.append(dict(op="flash_attn_vec_tq", shape=shape, Hq=Hq, Hkv=Hkv, D=D, N=N, bits=bits,
                             native_ms=native_ms, reference_ms=reference_ms, **sdpa, check=check,
                             tq_kv_mib=2 * torch_tq.quantized_nbytes(1, Hkv, N, D, bits) / 2**20,
                             f32_kv_mib=2 * Hkv * N * D * 4 / 2**20))
            del kc, vc, k, v

    header = dict(date=str(datetime.date.today()), cpu=cpu_name(), threads=torch.get_num_threads(),
                  load_average=[round(x, 2) for x in os.getloadavg()], torch=torch.__version__,
                  cpu_implementation=impl)
    if args.json:
        print(json.dumps(dict(header=header, rows=rows), indent=1))
        return
    print(f"# {header['date']} | {header['cpu']} | {header['threads']} threads | load average "
          f"{' '.join(map(str, header['load_average']))} | torch {header['torch']}")
    print(f"# CPU implementation: {impl}")
    fmt = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
    print(f"{'op':<22}{'shape':<9}{'N':>7}{'native ms':>11}{'ref ms':>10}{'sdpa f32':>10}{'sdpa bf16':>11}"
          f"{'vs f32':>8}{'vs bf16':>9}{'tq MiB':>9}{'f32 MiB':>9}  check")
    for r in rows:
        if r["op"] == "hadamard_quantize_kv":
            print(f"{r['op']:<22}{r['shape']:<9}{'T1024':>7}{fmt(r['native_ms']):>11}{fmt(r['reference_ms']):>10}")
            continue
        ok = r["check"] is not False
        vs32 = f"{r['sdpa_f32_ms'] / r['native_ms']:.1f}x" if ok else "—"
        vs16 = f"{r['sdpa_bf16_ms'] / r['native_ms']:.1f}x" if ok else "—"
        check = {True: "ok", False: "FAILED", None: ""}[r["check"]]
        print(f"{r['op']:<22}{r['shape']:<9}{r['N']:>7}{fmt(r['native_ms']):>11}{fmt(r['reference_ms']):>10}"
              f"{fmt(r['sdpa_f32_ms']):>10}{fmt(r['sdpa_bf16_ms']):>11}{vs32:>8}{vs16:>9}{r['tq_kv_mib']:>9.2f}"
              f"{r['f32_kv_mib']:>9.1f}  {check}")
    print(f"(B=1, Lq=1, {bits}-bit K and V; 'vs' = SDPA time / native time; smollm2: Hq=9 Hkv=3 D=64, "
          f"llama: Hq=32 Hkv=8 D=128; SDPA with enable_gqa over [B, Hkv, N, D])")


if __name__ == "__main__":
    main()
