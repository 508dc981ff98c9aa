"""Quantize a KV cache with TurboQuant and run decode attention on it, next to full precision.

    python examples/quantized_decode.py [--context 4096] [--bits 4] [--device cpu]

Prints the memory of both caches, the error of the TurboQuant output against SDPA over the
float K/V, and the time of each. Inputs are synthetic (random K/V with per-channel scales, as
real keys have outlier channels); `torch-tq demo` runs a real model.
"""

import argparse
import time

import torch

import torch_tq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 5, 6, 8))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    B, Hq, Hkv, D, N = 1, 32, 8, 128, args.context
    device = torch.device(args.device)
    channel_scale = torch.exp(torch.randn(D) * 0.8)  # outlier channels, like real keys
    k = (torch.randn(B, N, Hkv, D) * channel_scale).to(device, torch.float16)
    v = torch.randn(B, N, Hkv, D, device=device, dtype=torch.float16)
    q = torch.randn(B, Hq, 1, D, device=device, dtype=torch.float16)
    signs = torch_tq.hadamard_signs(D, device=device)
    scale = D**-0.5

    k_cache = torch_tq.allocate_quantized_kv(B, Hkv, N, D, args.bits, device)
    v_cache = torch_tq.allocate_quantized_kv(B, Hkv, N, D, args.bits, device)
    t0 = time.perf_counter()
    torch_tq.hadamard_quantize_kv(k, *k_cache, 0, bits=args.bits, signs=signs)
    torch_tq.hadamard_quantize_kv(v, *v_cache, 0, bits=args.bits, signs=signs)
    t_quant = time.perf_counter() - t0

    t0 = time.perf_counter()
    out = torch_tq.flash_attn_vec_tq(q, *k_cache, *v_cache, N, scale, args.bits, signs=signs)
    t_tq = time.perf_counter() - t0

    kf = k.transpose(1, 2).float().repeat_interleave(Hq // Hkv, 1)
    vf = v.transpose(1, 2).float().repeat_interleave(Hq // Hkv, 1)
    t0 = time.perf_counter()
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), kf, vf, scale=scale)
    t_ref = time.perf_counter() - t0

    fp16_bytes = 2 * k.numel() * k.element_size()
    tq_bytes = 2 * torch_tq.quantized_nbytes(B, Hkv, N, D, args.bits)
    rel_err = ((out.float() - ref).norm() / ref.norm()).item()
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0).item()

    print(f"torch_tq {torch_tq.__version__} | torch {torch.__version__} | device {device}")
    print(f"B={B} Hq={Hq} Hkv={Hkv} D={D} context={N} bits={args.bits} (synthetic K/V)")
    print(f"KV cache float16   : {fp16_bytes / 2**20:8.2f} MiB")
    print(f"KV cache TurboQuant: {tq_bytes / 2**20:8.2f} MiB  ({fp16_bytes / tq_bytes:.2f}x smaller)")
    print(f"decode attention output vs float SDPA: relative error {rel_err:.4f}, cosine {cos:.5f}")
    print(f"time: quantize K+V {t_quant * 1e3:.1f} ms | tq decode attention {t_tq * 1e3:.1f} ms | "
          f"SDPA (float32) {t_ref * 1e3:.1f} ms  [single run, not a benchmark: see benchmarks/cpu_ops.py]")


if __name__ == "__main__":
    main()
