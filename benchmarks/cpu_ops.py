"""CPU timings of the torch_tq reference ops next to PyTorch SDPA on a float32 cache of the same size.

    python benchmarks/cpu_ops.py [--contexts 1024 4096 16384] [--repeats 5] [--json]

Decode attention: B=1, Hq=32, Hkv=8, D=128, Lq=1, 4 bits. Quantize: vectors/s of
hadamard_quantize_kv writing 8 heads x 1024 tokens. Median of --repeats runs after one warm-up.
The first shape is checked against SDPA over the dequantized cache before anything is timed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch

from _timing import median_ms

import torch_tq


def check_attention(q, kc, vc, N, scale, bits, signs) -> bool:
    out = torch_tq.flash_attn_vec_tq(q, *kc, *vc, N, scale, bits, signs=signs)
    k = torch_tq.dequantize_kv(*kc, 0, N, bits, signs=signs)
    v = torch_tq.dequantize_kv(*vc, 0, N, bits, signs=signs)
    group = q.shape[1] // k.shape[1]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), scale=scale)
    return torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    B, Hq, Hkv, D, bits = 1, 32, 8, 128, args.bits
    signs = torch_tq.hadamard_signs(D)
    scale = D**-0.5
    rows = []

    T = 1024
    src = torch.randn(B, T, Hkv, D)
    cache = torch_tq.allocate_quantized_kv(B, Hkv, T, D, bits)
    ms = median_ms(lambda: torch_tq.hadamard_quantize_kv(src, *cache, 0, bits=bits, signs=signs), args.repeats)
    rows.append(dict(op="hadamard_quantize_kv", B=B, T=T, Hkv=Hkv, D=D, bits=bits, ms=ms,
                     vectors_per_s=B * T * Hkv / (ms / 1e3)))

    for i, N in enumerate(args.contexts):
        kc = torch_tq.allocate_quantized_kv(B, Hkv, N, D, bits)
        vc = torch_tq.allocate_quantized_kv(B, Hkv, N, D, bits)
        k, v = torch.randn(B, N, Hkv, D), torch.randn(B, N, Hkv, D)
        torch_tq.hadamard_quantize_kv(k, *kc, 0, bits=bits, signs=signs)
        torch_tq.hadamard_quantize_kv(v, *vc, 0, bits=bits, signs=signs)
        q = torch.randn(B, Hq, 1, D)
        verified = check_attention(q, kc, vc, N, scale, bits, signs) if i == 0 else None
        tq_ms = median_ms(lambda: torch_tq.flash_attn_vec_tq(q, *kc, *vc, N, scale, bits, signs=signs), args.repeats)
        # SDPA reads a float32 [B, Hq, N, D] cache (GQA expanded, as a dense decode would hold it).
        kf = k.transpose(1, 2).repeat_interleave(Hq // Hkv, 1).contiguous()
        vf = v.transpose(1, 2).repeat_interleave(Hq // Hkv, 1).contiguous()
        sdpa_ms = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, kf, vf, scale=scale), args.repeats)
        rows.append(dict(op="flash_attn_vec_tq", B=B, Hq=Hq, Hkv=Hkv, D=D, N=N, bits=bits, tq_ms=tq_ms, sdpa_ms=sdpa_ms,
                         tq_cache_mib=2 * torch_tq.quantized_nbytes(B, Hkv, N, D, bits) / 2**20,
                         f32_cache_mib=2 * B * Hkv * N * D * 4 / 2**20, verified=verified))

    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"# {datetime.date.today()} | {platform.processor() or platform.machine()} | {torch.get_num_threads()} threads | "
          f"torch {torch.__version__} | torch_tq {torch_tq.__version__} | device cpu")
    q_row = rows[0]
    print(f"{'op':<22}{'shape':<28}{'bits':>5}{'ms':>10}{'vectors/s':>14}")
    print(f"{q_row['op']:<22}{'B1 T1024 Hkv8 D128':<28}{bits:>5}{q_row['ms']:>10.2f}{q_row['vectors_per_s']:>14,.0f}")
    print()
    print(f"{'op':<22}{'N':>7}{'tq ms':>10}{'sdpa f32 ms':>13}{'ratio':>8}{'tq KV MiB':>11}{'f32 KV MiB':>12}  check")
    for r in rows[1:]:
        check = {True: "ok", False: "FAILED", None: ""}[r["verified"]]
        ratio = f"{r['tq_ms'] / r['sdpa_ms']:.1f}x" if r["verified"] is not False else "—"
        print(f"{r['op']:<22}{r['N']:>7}{r['tq_ms']:>10.2f}{r['sdpa_ms']:>13.2f}{ratio:>8}"
              f"{r['tq_cache_mib']:>11.2f}{r['f32_cache_mib']:>12.2f}  {check}")
    print("(Hq=32 Hkv=8 D=128 Lq=1; SDPA over a float32 cache expanded to Hq heads; ratio = tq / sdpa time)")


if __name__ == "__main__":
    main()
