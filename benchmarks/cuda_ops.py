"""The CUDA (Triton) TurboQuant ops on a GPU: correctness against the CPU reference, then timings.

    PYTHONPATH=. python benchmarks/cuda_ops.py [--quick] [--out FILE] [--skip-big]
    PYTHONPATH=. python benchmarks/cuda_ops.py --sweep [all|attn|quant] [--only REGEX] [--out FILE]

1. Correctness (fails loudly, exit status 1, on any mismatch): every op on CUDA tensors through
   ``torch.ops.tq`` (the Triton kernels) against the CPU reference on the same inputs: quantize for
   every (head_dim, bits) pair with offsets, norm correction and sink/recent windows; dequantize;
   kv_cache_copy; decode attention over GQA, Lq > 1, sliding rings, kv_start, softcap, lse, v_bits,
   windows and several split counts.
2. Decode attention ``flash_attn_vec_tq`` (4 and 3 bits, Hq32/Hkv8/D128, Lq=1, bf16 q) next to bf16
   SDPA over the full cache and fused-turboquant 0.1.0's 4-bit decode attention (when
   ``import fused_turboquant`` works), at B1 ctx 4k/32k/128k and B8 ctx 32k: medians of
   ``triton.testing.do_bench`` and of ``do_bench_cudagraph`` (one CUDA graph per call).
3. Quantize throughput: ``hadamard_quantize_kv`` rows/s and bytes moved, as a fraction of the measured
   device-to-device copy bandwidth.
4. A cache above 4 GiB (B8, Hkv32, C = 256k + 1024, 4-bit: K codes alone are 4.3 GB): the last slot is
   written and read back through dequantize and through attention (64-bit offsets).

Prints aligned tables and writes them to --out. --quick: small sizes for a first smoke test (no big cache).
--sweep (instead of 1.-4.): every kernel configuration of ``attn_variants()`` / ``quant_variants()`` checked
against the CPU reference on small cases and against the default variant on the timed inputs, and timed at
B1 ctx 4k/32k/128k and B8 32k (4 and 3 bits) and quantize B8/B1 T32768, B1 T1: one table to pick from.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import sys
import traceback

import torch
import torch.nn.functional as F

import torch_tq
from torch_tq.codebooks import decision_boundaries
from torch_tq.layout import rotation_block, unpack_codes

LINES: list[str] = []


OUT_FILE: list = []  # the --out path: every line is appended as it is printed (a run cut short keeps its lines)


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)
    if OUT_FILE:
        with open(OUT_FILE[0], "a") as f:
            f.write(line + "\n")


class Mismatch(AssertionError):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Mismatch(what)


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double().cpu(), out.double().cpu()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


# ---- 1. correctness ---------------------------------------------------------------------------------------------------


def codes_match(out_codes, ref_codes, u, bits) -> tuple[bool, str]:
    """Exact, or adjacent at a near tie (|u - boundary| <= 1e-5): the rotation sums in another order."""
    out, ref = unpack_codes(out_codes.cpu(), bits), unpack_codes(ref_codes, bits)
    diff = out != ref
    if not diff.any():
        return True, "exact"
    if not ((out - ref).abs()[diff] == 1).all():
        return False, "non-adjacent code mismatch"
    gap = (u[diff] - decision_boundaries(bits)[torch.minimum(out, ref)[diff]]).abs()
    return bool((gap <= 1e-5).all()), f"{int(diff.sum())} near-tie flips (max gap {gap.max():.1e})"


def reference_u(x, signs):
    from torch_tq.backends.cpu.turboquant import rotate

    D = x.shape[-1]
    R = rotation_block(D)
    y = rotate(x, signs).reshape(*x.shape[:-1], D // R, R)
    n = torch.linalg.vector_norm(y, dim=-1)
    return (y * torch.where(n > 0, math.sqrt(R) / n, torch.zeros_like(n)).unsqueeze(-1)).reshape(x.shape)


def check_quantize(dev) -> list[str]:
    rows = []
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    # Every (D, bits) with an offset (the dot kernel's split path: x - offset in float32 as three bf16 parts), then
    # bf16/fp16 sources without an offset (its direct path: one 16-bit dot per phase) over several bits and head
    # dims, with and without windows, the even cases over enough rows for several tiles and a ragged last one.
    cases = [(D, b, True, None) for D in (64, 128, 256, 512) for b in (2, 3, 4, 5, 6, 8)]
    cases += [(64, 4, False, torch.bfloat16), (128, 4, False, torch.bfloat16), (128, 4, False, torch.float16),
              (128, 3, False, torch.bfloat16), (256, 2, False, torch.bfloat16), (256, 8, False, torch.float16),
              (512, 4, False, torch.bfloat16), (64, 5, False, torch.float16)]
    for i, (D, bits, use_offset, src_dtype) in enumerate(cases):
        B, T, Hkv, C, S, W = 2, 9, 2, 8, 3, 4
        sliding = i % 2 == 1
        write_pos = 5 if sliding else 0
        if not sliding:
            T = 7
        if not use_offset and i % 2 == 0:
            B, T, Hkv, C, write_pos = 3, 100, 4, 128, 20  # 1200 rows: 19 tiles of 64
        dtype = dtypes[i % 3] if src_dtype is None else src_dtype
        signs = torch_tq.hadamard_signs(D)
        src = (torch.randn(B, T, Hkv, D) * 2 + 0.5).to(dtype)
        offset = torch.randn(B, Hkv, D) if use_offset else torch.zeros(B, Hkv, D)
        bufs = [*torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits), torch.full((B, Hkv, S, D), float("nan"),
                dtype=dtypes[(i + 1) % 3]), torch.full((B, Hkv, W, D), float("nan"), dtype=dtypes[(i + 2) % 3])]
        bufs[0].fill_(0xA5)
        bufs[1].fill_(float("nan"))
        gpu = [t.to(dev) for t in bufs]
        torch.ops.tq.hadamard_quantize_kv(src, bufs[0], bufs[1], write_pos, sliding, bits, signs, offset, True,
                                          bufs[2], bufs[3])
        # Odd cases through the op (its default: v1 below QuantConfig.v1_below blocks), even ones through the dot
        # kernel at any size.
        from torch_tq.backends.cuda import turboquant as tk

        quantize = torch.ops.tq.hadamard_quantize_kv if i % 2 else functools.partial(
            tk.hadamard_quantize_kv, config=tk.QuantConfig(v1_below=0))
        quantize(src.to(dev), gpu[0], gpu[1], write_pos, sliding, bits, signs.to(dev),
                 offset.to(dev) if use_offset else None, True, gpu[2], gpu[3])
        first = max(0, T - C) if sliding else 0
        slots = torch.arange(write_pos + first, write_pos + T) % C
        x = (src.float() - offset.unsqueeze(1))[:, first:].transpose(1, 2)
        ok, note = codes_match(gpu[0][:, :, slots], bufs[0][:, :, slots], reference_u(x, signs), bits)
        check(ok, f"hadamard_quantize_kv D{D} b{bits}: {note}")
        untouched = torch.ones(C, dtype=torch.bool)
        untouched[slots] = False
        check(bool((gpu[0].cpu()[:, :, untouched] == 0xA5).all()), f"quantize D{D} b{bits}: wrote outside the new slots")
        if note == "exact":
            torch.testing.assert_close(gpu[1].cpu(), bufs[1], rtol=4e-6, atol=0, equal_nan=True)
        for name, g, r in (("sink", gpu[2], bufs[2]), ("recent", gpu[3], bufs[3])):
            tol = {torch.float32: (1e-5, 2e-6), torch.float16: (2**-10, 1e-5), torch.bfloat16: (2**-7, 1e-4)}[r.dtype]
            torch.testing.assert_close(g.cpu(), r, rtol=tol[0], atol=tol[1], equal_nan=True,
                                       msg=lambda m: f"quantize D{D} b{bits} {name}: {m}")
        rows.append(f"hadamard_quantize_kv D{D:<3} b{bits} {str(dtype)[6:]:<8} {'ring' if sliding else 'global':<6} "
                    f"{'offset' if use_offset else 'no offset'} {'op default' if i % 2 else 'dot kernel'} {note}")
    return rows


def check_dequantize(dev) -> list[str]:
    rows = []
    for D, bits, rotated in ((64, 3, True), (128, 4, False), (256, 6, False), (512, 2, False), (512, 8, True),
                             (128, 5, False)):
        codes = torch.randint(0, 256, (2, 3, 7, D * bits // 8), dtype=torch.uint8)
        norms = torch.rand(2, 3, 7, D // rotation_block(D)) * 20
        ref = torch.ops.tq.dequantize_kv(codes, norms, 5, 6, bits, rotated, None)
        out = torch.ops.tq.dequantize_kv(codes.to(dev), norms.to(dev), 5, 6, bits, rotated, None).cpu()
        err = (out - ref).abs().max().item() / ref.abs().max().item()
        check(err <= 4e-6, f"dequantize_kv D{D} b{bits}: max error {err:.2e} of the largest value")
        rows.append(f"dequantize_kv D{D:<3} b{bits} rotated={rotated}: max err {err:.1e}")
    return rows


def check_copy(dev) -> list[str]:
    rows = []
    for sd, cd, sliding, T in ((torch.float32, torch.bfloat16, True, 11), (torch.bfloat16, torch.float16, False, 3),
                               (torch.float16, torch.float32, True, 2)):
        src = torch.randn(2, T, 3, 128).to(sd)
        ref = torch.full((2, 3, 8, 128), float("nan"), dtype=cd)
        out = ref.to(dev)
        torch.ops.tq.kv_cache_copy(src, ref, 5, sliding)
        torch.ops.tq.kv_cache_copy(src.to(dev), out, 5, sliding)
        torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0, equal_nan=True)
        rows.append(f"kv_cache_copy {str(sd)[6:]}->{str(cd)[6:]} T{T} sliding={sliding}: exact")
    return rows


def write_cache(B, Hkv, D, C, bits, v_bits, kv_len, sliding, S, W, wdtype):
    signs = torch_tq.hadamard_signs(D)
    k = torch_tq.allocate_quantized_kv(B, Hkv, C, D, bits)
    v = torch_tq.allocate_quantized_kv(B, Hkv, C, D, v_bits)
    win = [torch.zeros(B, Hkv, n, D, dtype=wdtype) if n else None for n in (S, S, W, W)]
    pos = 0
    while pos < kv_len:
        T = min(13, kv_len - pos)
        torch_tq.hadamard_quantize_kv(torch.randn(B, T, Hkv, D) * 2, *k, pos, sliding, bits, signs, None, True,
                                      win[0], win[2])
        torch_tq.hadamard_quantize_kv(torch.randn(B, T, Hkv, D), *v, pos, sliding, v_bits, signs, None, True,
                                      win[1], win[3])
        pos += T
    return [*k, *v, *win]


ATTN_CASES = [
    # name, B, Hq, Hkv, Lq, D, C, kv_len, bits, v_bits, window, softcap, kv_start, S, W, q dtype, window dtype
    ("decode-gqa4-b4", 1, 32, 8, 1, 128, 2048, 2000, 4, 4, 0, 0.0, None, 0, 0, torch.bfloat16, torch.bfloat16),
    ("decode-b3-windows", 2, 8, 2, 1, 128, 1024, 1000, 3, 3, 0, 0.0, None, 4, 64, torch.float16, torch.bfloat16),
    ("k8v4-lq4-kvstart", 2, 12, 4, 4, 64, 300, 260, 8, 4, 0, 0.0, [0, 37], 4, 16, torch.float32, torch.float32),
    ("k4v2-sliding-wrap", 1, 8, 2, 2, 256, 128, 500, 4, 2, 100, 0.0, None, 0, 8, torch.bfloat16, torch.float16),
    ("d512-b5-softcap", 1, 4, 2, 3, 512, 96, 90, 5, 6, 0, 30.0, None, 2, 4, torch.float32, torch.float32),
    ("row-without-keys", 2, 4, 1, 1, 64, 64, 40, 2, 2, 0, 0.0, [0, 40], 0, 0, torch.float32, torch.float32),
]
OUT_RATIO_GPU = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1.2e-2}


def check_attention(dev) -> list[str]:
    from torch_tq.backends.cuda import turboquant as tk

    rows = []
    for case in ATTN_CASES:
        (name, B, Hq, Hkv, Lq, D, C, kv_len, bits, v_bits, window, softcap, kv_start, S, W, dtype, wdtype) = case
        cache = write_cache(B, Hkv, D, C, bits, v_bits, kv_len, kv_len > C, S, W, wdtype)
        q = torch.randn(B, Hq, Lq, D).to(dtype)
        start = None if kv_start is None else torch.tensor(kv_start, dtype=torch.int64)
        lse_ref = torch.full((B, Hq, Lq), float("nan"))
        ref = torch.ops.tq.flash_attn_vec_tq(q, *cache[:4], kv_len, D**-0.5, bits, window, softcap, start, None,
                                             lse_ref, v_bits, *cache[4:])
        gcache = [None if t is None else t.to(dev) for t in cache]
        real_choose = tk.choose_num_splits
        # The registered op (the default config), then v3 through the launcher.
        for label, cfg in (("", None), (" v3", tk.AttnConfig(variant="v3"))):
            op = torch.ops.tq.flash_attn_vec_tq if cfg is None else (
                lambda *a, cfg=cfg: tk.flash_attn_vec_tq(*a, config=cfg))
            for splits in (None, 1, 7):
                if splits is not None:
                    tk.choose_num_splits = lambda *a, s=splits: s
                try:
                    lse = torch.full((B, Hq, Lq), float("nan"), device=dev)
                    out = op(q.to(dev), *gcache[:4], kv_len, D**-0.5, bits, window, softcap,
                             None if start is None else start.to(dev), None, lse, v_bits, *gcache[4:])
                finally:
                    tk.choose_num_splits = real_choose
                what = f"flash_attn_vec_tq{label} {name} splits={splits}"
                err = rel_rms(ref.float(), out.float())
                check(bool(torch.isfinite(out.float()).all()), f"{what}: non-finite output")
                check(err <= OUT_RATIO_GPU[dtype], f"{what}: rel rms {err:.2e}")
                lse_atol = 1e-5 if dtype == torch.float32 else 3e-3
                torch.testing.assert_close(lse.cpu(), lse_ref, rtol=1e-5, atol=lse_atol, msg=lambda m: f"{what} lse: {m}")
                rows.append(f"flash_attn_vec_tq{label:<3} {name:<20} splits={str(splits):<4}: rel rms {err:.1e}")
    return rows


def check_attention_replays(dev) -> list[str]:
    """The fused split merge under CUDA-graph replay, where the race between the split programs is real (the tests'
    interpreter runs programs one after another): one graph per launch path with 7 splits, replayed with new
    queries; every replay must match the CPU reference (the ticket counters are reset by the merging programs)."""
    from torch_tq.backends.cuda import turboquant as tk

    rows = []
    (name, B, Hq, Hkv, Lq, D, C, kv_len, bits, v_bits, window, softcap, kv_start, S, W, dtype, wdtype) = ATTN_CASES[0]
    cache = write_cache(B, Hkv, D, C, bits, v_bits, kv_len, False, S, W, wdtype)
    gcache = [None if t is None else t.to(dev) for t in cache]
    signs = torch_tq.hadamard_signs(D, device=dev)
    for label, cfg in (("v2", tk.AttnConfig()), ("v3", tk.AttnConfig(variant="v3"))):
        q = torch.randn(B, Hq, Lq, D, device=dev).to(dtype)
        lse = torch.empty(B, Hq, Lq, device=dev)
        run = lambda: tk.flash_attn_vec_tq_fwd(  # noqa: E731  (7 splits; no validation inside the graph)
            q, *gcache[:4], kv_len, D**-0.5, bits, 0, 0.0, None, signs, lse, v_bits,
            None, None, None, None, (B, Hq, Hkv, Lq, D, C), None, num_splits=7, config=cfg)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()  # allocates the stream's ticket counters outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                out = run()
        torch.cuda.current_stream().wait_stream(side)
        worst = 0.0
        for _ in range(5):
            q.copy_(torch.randn(B, Hq, Lq, D, device=dev).to(dtype))
            graph.replay()
            torch.cuda.synchronize()
            ref_lse = torch.empty(B, Hq, Lq)
            ref = torch.ops.tq.flash_attn_vec_tq(q.cpu(), *cache[:4], kv_len, D**-0.5, bits, 0, 0.0, None, None,
                                                 ref_lse, v_bits)
            err = rel_rms(ref.float(), out.float())
            check(err <= OUT_RATIO_GPU[dtype], f"flash_attn_vec_tq {label} graph replay: rel rms {err:.2e}")
            torch.testing.assert_close(lse.cpu(), ref_lse, rtol=1e-5, atol=3e-3)
            worst = max(worst, err)
        rows.append(f"flash_attn_vec_tq {label} CUDA-graph replays x5, 7 splits merged in-kernel: worst rel rms "
                    f"{worst:.1e}")
    return rows


# ---- 2.-3. timing -----------------------------------------------------------------------------------------------------


def count_launches(fn) -> int:
    """GPU kernels one call of ``fn`` launches (torch.profiler's CUDA activity; -1 when the profiler fails).
    Call ``fn`` once before: first calls allocate (and zero) cached buffers."""
    from torch.profiler import ProfilerActivity, profile

    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # noqa: BLE001  (the count is informational)
        return -1



def bench(fn) -> tuple[float, float]:
    """(median ms with do_bench, median ms replaying a CUDA graph of one call)."""
    import triton.testing

    eager = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    try:
        graph = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
    except Exception as exc:  # noqa: BLE001  (report and go on: the eager number stands)
        say(f"  (CUDA graph timing failed: {type(exc).__name__}: {exc})")
        graph = float("nan")
    return eager, graph


def random_cache(B, Hkv, C, D, bits, dev):
    codes = torch.randint(0, 256, (B, Hkv, C, D * bits // 8), dtype=torch.uint8, device=dev)
    norms = torch.rand(B, Hkv, C, D // rotation_block(D), device=dev) * 5 + 8
    return codes, norms


def fused_turboquant_decode(q, k, v, bits):
    """fused-turboquant 0.1.0's decode attention as its HF integration runs it (hf/fused_cache.py, q_len == 1):
    RHT of q, fused_qk_scores_rht over the packed keys, softmax, decoded values, repeat_kv, matmul."""
    from fused_turboquant import TurboQuantMSE
    from fused_turboquant.core.hadamard import randomized_hadamard
    from fused_turboquant.kernels.triton_attention import fused_qk_scores_rht

    B, Hq, Lq, D = q.shape
    Hkv, ctx = k.shape[1], k.shape[2]
    tqm = TurboQuantMSE(head_dim=D, bits=bits, device=q.device)
    kc, vc = tqm.encode(k), tqm.encode(v)
    signs, centroids = tqm.rotation.signs, tqm.quantizer.levels
    key_norms = kc.norms.reshape(B, Hkv, ctx)

    def run():
        q_rot = randomized_hadamard(q.float().reshape(-1, D), signs).view(B, Hq, Lq, D)
        s = fused_qk_scores_rht(q_rot, kc.indices, key_norms, centroids, D**-0.5, bits=bits)
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        vd = tqm.decode(vc).to(q.dtype)
        vd = vd[:, :, None].expand(B, Hkv, Hq // Hkv, ctx, D).reshape(B, Hq, ctx, D)
        return p @ vd

    return run


def time_attention(dev, shapes) -> None:
    Hq, Hkv, D = 32, 8, 128
    try:
        import fused_turboquant  # noqa: F401

        peer = f"fused-turboquant {getattr(fused_turboquant, '__version__', '?')}"
    except ImportError as exc:
        peer = None
        say(f"fused-turboquant is absent ({exc}): its column shows '-'")
    say()
    say("decode attention, Hq32/Hkv8/D128, Lq=1, bf16 q; ms medians (eager do_bench | CUDA graph); "
        "speedup = SDPA / tq (eager)")
    head = (f"{'op':<18} {'B':>2} {'ctx':>7} {'bits':>4} {'sdpa ms':>9} {'sdpa g':>8} {'tq ms':>8} {'tq g':>8} "
            f"{'speedup':>8} {'tq GB/s':>8} {'launch':>6} {'peer ms':>8}")
    say(head)
    say("-" * len(head))
    for B, ctx in shapes:
        q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, ctx, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(B, Hkv, ctx, D, device=dev, dtype=torch.bfloat16)
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
        sdpa_ms, sdpa_g = bench(sdpa)
        for bits in (4, 3):
            cache = [*random_cache(B, Hkv, ctx, D, bits, dev), *random_cache(B, Hkv, ctx, D, bits, dev)]
            tq = lambda: torch.ops.tq.flash_attn_vec_tq(q, *cache, ctx, D**-0.5, bits)  # noqa: E731
            tq()
            launches = count_launches(tq)
            tq_ms, tq_g = bench(tq)
            nbytes = sum(t.numel() * t.element_size() for t in cache) + 2 * q.numel() * 2
            peer_ms = "-"
            if peer is not None and bits == 4:
                try:
                    run = fused_turboquant_decode(q, k, v, bits)
                    run()
                    peer_ms = f"{bench(run)[0]:.3f}"
                except Exception as exc:  # noqa: BLE001  (the peer row is informational)
                    peer_ms = "error"
                    say(f"  {peer} failed: {type(exc).__name__}: {exc}")
            say(f"{'flash_attn_vec_tq':<18} {B:>2} {ctx:>7} {bits:>4} {sdpa_ms:>9.4f} {sdpa_g:>8.4f} {tq_ms:>8.4f} "
                f"{tq_g:>8.4f} {sdpa_ms / tq_ms:>7.2f}x {nbytes / tq_ms / 1e6:>8.0f} {launches:>6} {peer_ms:>8}")
            del cache
        del q, k, v
        torch.cuda.empty_cache()


def copy_bandwidth(dev) -> float:
    """Device-to-device copy, bytes read + written per second."""
    import triton.testing

    a = torch.empty(2 * 1024**3 // 4, dtype=torch.float32, device=dev)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=10, rep=100, return_mode="median")
    bw = 2 * a.numel() * 4 / (ms * 1e-3)
    del a, b
    return bw


def time_quantize(dev, sizes) -> None:
    bw = copy_bandwidth(dev)
    say()
    say(f"device-to-device copy: {bw / 1e12:.2f} TB/s (bytes read + written)")
    say("hadamard_quantize_kv, bf16 src [B, T, Hkv=8, D=128]; bytes = src read + codes + norms written")
    head = f"{'op':<21} {'B':>2} {'T':>6} {'bits':>4} {'ms':>8} {'Mrows/s':>9} {'GB/s':>7} {'of copy':>8}"
    say(head)
    say("-" * len(head))
    D, Hkv = 128, 8
    for B, T in sizes:
        for bits in (4, 3):
            src = torch.randn(B, T, Hkv, D, device=dev, dtype=torch.bfloat16)
            codes, norms = torch_tq.allocate_quantized_kv(B, Hkv, max(T, 1), D, bits, device=dev)
            signs = torch_tq.hadamard_signs(D, device=dev)
            fn = lambda: torch.ops.tq.hadamard_quantize_kv(src, codes, norms, 0, False, bits, signs)  # noqa: E731
            fn()
            ms, _ = bench(fn)
            rows = B * T * Hkv
            nbytes = src.numel() * 2 + rows * (D * bits // 8 + 4)
            gbs = nbytes / (ms * 1e-3)
            say(f"{'hadamard_quantize_kv':<21} {B:>2} {T:>6} {bits:>4} {ms:>8.4f} {rows / ms / 1e3:>9.1f} "
                f"{gbs / 1e9:>7.0f} {gbs / bw:>7.0%}")


# ---- --sweep: kernel configurations side by side ----------------------------------------------------------------------


def attn_variants():
    from torch_tq.backends.cuda.turboquant import AttnConfig as A

    return [
        ("v1 (previous kernel)", A(variant="v1")),
        ("v2 default", A()),
        ("v2 bn32 w4", A(block_n=32, num_warps=4)),
        ("v2 bn32 w8", A(block_n=32, num_warps=8)),
        ("v2 bn64 w4", A(block_n=64, num_warps=4)),
        ("v2 bn128 w8", A(block_n=128, num_warps=8)),
        ("v2 bn128 w4", A(block_n=128, num_warps=4)),
        ("v2 no prefetch", A(prefetch=False)),
        ("v2 no prefetch st2", A(prefetch=False, num_stages=2)),
        ("v2 no prefetch st3", A(prefetch=False, num_stages=3)),
        ("v2 st2", A(num_stages=2)),
        ("v2 pair-lut", A(lut_pair=True)),
        ("v2 pair-lut bn128 w8", A(lut_pair=True, block_n=128, num_warps=8)),
        ("v2 pair-lut nopf st2", A(lut_pair=True, prefetch=False, num_stages=2)),
        ("v2 q-rotate launch", A(fold_q=False)),
        ("v2 2 prog/SM", A(programs_per_sm=2)),
        ("v2 8 prog/SM", A(programs_per_sm=8)),
        ("v2 16 prog/SM", A(programs_per_sm=16)),
        ("v2 min split 1024", A(min_split_positions=1024)),
        ("v2 bn128 w8 8 prog/SM", A(block_n=128, num_warps=8, programs_per_sm=8)),
        ("v2 merge launch", A(fused_merge=False)),
        ("v2 q-rot+merge launches", A(fold_q=False, fused_merge=False)),
        ("v3 default", A(variant="v3")),
        ("v3 no pair-lut", A(variant="v3", lut_pair=False)),
        ("v3 w8", A(variant="v3", num_warps=8)),
        ("v3 bn64", A(variant="v3", block_n=64)),
        ("v3 bn128 w8", A(variant="v3", block_n=128, num_warps=8)),
        ("v3 no prefetch", A(variant="v3", prefetch=False)),
        ("v3 2 prog/SM", A(variant="v3", programs_per_sm=2)),
        ("v3 8 prog/SM", A(variant="v3", programs_per_sm=8)),
        ("v3 merge launch", A(variant="v3", fused_merge=False)),
        ("v3 fold-q (1 launch)", A(variant="v3", fold_q=True)),
        # Session 4's sweep: the q-rotation launch and 2 programs/SM each beat the default at 32k/128k (the
        # folded rotation and the split count are per-program costs); with the fused merge that is 2 launches.
        ("v2 q-rot 2 prog/SM", A(fold_q=False, programs_per_sm=2)),
        ("v2 pair q-rot 2 prog/SM", A(lut_pair=True, fold_q=False, programs_per_sm=2)),
        ("v2 pair 2 prog/SM", A(lut_pair=True, programs_per_sm=2)),
    ]


def sweep_attention(dev, shapes, only: str | None = None) -> None:
    import re

    import triton.testing

    from torch_tq.backends.cuda import turboquant as tk

    variants = [(n, c) for n, c in attn_variants() if only is None or re.search(only, n)]
    say()
    say("sweep: the fused split merge under CUDA-graph replay (the split programs race for real on the GPU)")
    try:
        for row in check_attention_replays(dev):
            say("  " + row)
    except Exception as exc:  # noqa: BLE001  (reported loudly; the timings below still run)
        say(f"  REPLAY CHECK FAILED: {type(exc).__name__}: {str(exc)[:500]}")
    # Each variant against the CPU reference on two small cases (4-bit GQA bf16; 3-bit with windows fp16).
    say()
    say("sweep: every variant against the CPU reference (rel rms of the output)")
    for case in ATTN_CASES[:2]:
        (name, B, Hq, Hkv, Lq, D, C, kv_len, bits, v_bits, window, softcap, kv_start, S, W, dtype, wdtype) = case
        cache = write_cache(B, Hkv, D, C, bits, v_bits, kv_len, kv_len > C, S, W, wdtype)
        q = torch.randn(B, Hq, Lq, D).to(dtype)
        ref = torch.ops.tq.flash_attn_vec_tq(q, *cache[:4], kv_len, D**-0.5, bits, window, softcap, None, None, None,
                                             v_bits, *cache[4:])
        g = [None if t is None else t.to(dev) for t in cache]
        errs = []
        for vname, cfg in variants:
            try:
                out = tk.flash_attn_vec_tq(q.to(dev), *g[:4], kv_len, D**-0.5, bits, window, softcap, None, None,
                                           None, v_bits, *g[4:], config=cfg)
                err = rel_rms(ref.float(), out.float())
                errs.append(f"{vname}: {err:.1e}" + ("" if err <= OUT_RATIO_GPU[dtype] else " MISMATCH"))
            except Exception as exc:  # noqa: BLE001  (a variant that fails is reported, the others still run)
                errs.append(f"{vname}: {type(exc).__name__}: {str(exc)[:200]}")
        say(f"  {name}: " + "; ".join(errs))

    Hq, Hkv, D = 32, 8, 128
    say()
    say("sweep: decode attention, Hq32/Hkv8/D128, Lq=1, bf16 q; ms medians (do_bench | CUDA graph); x sdpa = "
        "SDPA eager / tq eager; err = rel rms against 'v2 default' on the same random cache")
    head = (f"{'variant':<24} {'B':>2} {'ctx':>7} {'bits':>4} {'tq ms':>8} {'tq g':>8} {'x sdpa':>7} {'x sdpa g':>8} "
            f"{'GB/s':>6} {'err':>8} {'launch':>6}")
    say(head)
    say("-" * len(head))
    for B, ctx in shapes:
        q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, ctx, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(B, Hkv, ctx, D, device=dev, dtype=torch.bfloat16)
        sdpa_ms, sdpa_g = bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        say(f"{'bf16 SDPA':<24} {B:>2} {ctx:>7} {'-':>4} {sdpa_ms:>8.4f} {sdpa_g:>8.4f}")
        del k, v
        for bits in (4, 3):
            cache = [*random_cache(B, Hkv, ctx, D, bits, dev), *random_cache(B, Hkv, ctx, D, bits, dev)]
            nbytes = sum(t.numel() * t.element_size() for t in cache) + 2 * q.numel() * 2
            ref = tk.flash_attn_vec_tq(q, *cache, ctx, D**-0.5, bits).float()
            for vname, cfg in variants:
                fn = lambda cfg=cfg: tk.flash_attn_vec_tq(q, *cache, ctx, D**-0.5, bits, config=cfg)  # noqa: E731
                try:
                    err = rel_rms(ref, fn().float())
                    launches = count_launches(fn)
                    ms = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
                    try:
                        g = triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median")
                    except Exception:  # noqa: BLE001
                        g = float("nan")
                    say(f"{vname:<24} {B:>2} {ctx:>7} {bits:>4} {ms:>8.4f} {g:>8.4f} {sdpa_ms / ms:>6.2f}x "
                        f"{sdpa_g / g:>7.2f}x {nbytes / ms / 1e6:>6.0f} {err:>8.1e} {launches:>6}")
                except Exception as exc:  # noqa: BLE001
                    say(f"{vname:<24} {B:>2} {ctx:>7} {bits:>4} failed: {type(exc).__name__}: {str(exc)[:300]}")
            del cache
        del q
        torch.cuda.empty_cache()


def quant_variants():
    from torch_tq.backends.cuda.turboquant import QuantConfig as Q

    return [
        ("v1 (previous kernel)", Q(variant="v1")),
        ("dot default", Q()),
        ("dot st1 2/SM", Q(num_stages=1, programs_per_sm=2)),
        ("dot st1 3/SM", Q(num_stages=1, programs_per_sm=3)),
        ("dot st2 2/SM", Q(num_stages=2, programs_per_sm=2)),
        ("dot st3 2/SM", Q(num_stages=3, programs_per_sm=2)),
        ("dot st3 3/SM", Q(num_stages=3, programs_per_sm=3)),
        ("dot rows128 w8", Q(rows=128, num_warps=8)),
        ("dot rows32", Q(rows=32)),
        ("dot w8", Q(num_warps=8)),
        ("dot always (v1_below 0)", Q(v1_below=0)),
        ("dot 2/SM", Q(programs_per_sm=2)),
    ]


def _time_quantize_case(tk, bw, label, variants, B, T, D, bits, dtype, dev, offset=False) -> None:
    """One row per variant: time (do_bench median), bytes moved (src read + codes + norms written) over that time
    as a fraction of the copy bandwidth ``bw`` measured in the same run, and agreement with v1's codes/norms."""
    import triton.testing

    Hkv = 8
    signs = torch_tq.hadamard_signs(D, device=dev)
    src = torch.randn(B, T, Hkv, D, device=dev, dtype=dtype)
    off = torch.randn(B, Hkv, D, device=dev) if offset else None
    ref_codes, ref_norms = torch_tq.allocate_quantized_kv(B, Hkv, max(T, 1), D, bits, device=dev)
    tk.hadamard_quantize_kv(src, ref_codes, ref_norms, 0, False, bits, signs, off, config=tk.QuantConfig(variant="v1"))
    codes, norms = torch.empty_like(ref_codes), torch.empty_like(ref_norms)
    nbytes = src.numel() * src.element_size() + codes.numel() + norms.numel() * 4
    for vname, cfg in variants:
        fn = lambda cfg=cfg: tk.hadamard_quantize_kv(src, codes, norms, 0, False, bits, signs, off,  # noqa: E731
                                                     config=cfg)
        row = f"{vname:<22} {label:<14} {B:>2} {T:>6} {bits:>4}"
        try:
            fn()
            diff = (unpack_codes(codes, bits) != unpack_codes(ref_codes, bits)).float().mean().item()
            ndiff = ((norms - ref_norms).abs() / ref_norms.abs().clamp_min(1e-30)).max().item()
            ms = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
            gbs = nbytes / (ms * 1e-3)
            say(f"{row} {ms:>8.4f} {gbs / 1e9:>7.0f} {gbs / bw:>7.0%} {diff:>8.1e} {ndiff:>8.1e}")
        except Exception as exc:  # noqa: BLE001
            say(f"{row} failed: {type(exc).__name__}: {str(exc)[:300]}")
    del src, codes, norms, ref_codes, ref_norms


def sweep_quantize(dev, sizes) -> None:
    from torch_tq.backends.cuda import turboquant as tk

    bw = copy_bandwidth(dev)
    say()
    say(f"sweep: hadamard_quantize_kv, src [B, T, Hkv=8, D]; copy {bw / 1e12:.2f} TB/s (read + written, this run); "
        "GB/s = (src read + codes + norms written) / time; codes = share of codes that differ from v1's (near ties "
        "only), norms = max rel diff from v1's")
    head = (f"{'variant':<22} {'D src':<14} {'B':>2} {'T':>6} {'bits':>4} {'ms':>8} {'GB/s':>7} {'of copy':>8} "
            f"{'codes':>8} {'norms':>8}")
    say(head)
    say("-" * len(head))
    for B, T in sizes:
        for bits in (4, 3):
            _time_quantize_case(tk, bw, "D128 bf16", quant_variants(), B, T, 128, bits, torch.bfloat16, dev)
        torch.cuda.empty_cache()
    # The default against v1 over the other head dims, bits and source kinds (B8 T8192: 0.5M rows); 8 warps would
    # clear the spills of D512 2-bit and cut D256/512 to 128-218 registers (compile_sm90.py).
    pair = [quant_variants()[0], ("dot default", tk.QuantConfig()), ("dot 3/SM", tk.QuantConfig(programs_per_sm=3)),
            ("dot w8", tk.QuantConfig(num_warps=8))]
    for D, bits, dtype, offset in [(64, 4, torch.bfloat16, False), (256, 4, torch.bfloat16, False),
                                   (512, 4, torch.bfloat16, False), (128, 2, torch.bfloat16, False),
                                   (128, 8, torch.bfloat16, False), (128, 5, torch.bfloat16, False),
                                   (128, 4, torch.float16, False), (128, 4, torch.float32, False),
                                   (128, 4, torch.bfloat16, True)]:
        label = f"D{D} {str(dtype)[6:]}{' +off' if offset else ''}"
        _time_quantize_case(tk, bw, label, pair, 8, 8192, D, bits, dtype, dev, offset)
    torch.cuda.empty_cache()


# ---- 4. a cache above 4 GiB -------------------------------------------------------------------------------------------


def check_big_cache(dev, B=8, Hkv=32, C=262144 + 1024) -> None:
    Hq, D, bits = Hkv, 128, 4
    say()
    codes, norms = random_cache(B, Hkv, C, D, bits, dev)
    v_codes, v_norms = random_cache(B, Hkv, C, D, bits, dev)
    say(f"big cache: K codes {tuple(codes.shape)} = {codes.numel() / 2**30:.2f} GiB "
        f"({codes.numel()} elements > 2^32 = {2**32}); K+V {2 * (codes.numel() + 4 * norms.numel()) / 2**30:.2f} GiB")
    signs = torch_tq.hadamard_signs(D)
    src = torch.randn(B, 1, Hkv, D) * 3
    vsrc = torch.randn(B, 1, Hkv, D)
    torch.ops.tq.hadamard_quantize_kv(src.to(dev), codes, norms, C - 1, False, bits, signs.to(dev))
    torch.ops.tq.hadamard_quantize_kv(vsrc.to(dev), v_codes, v_norms, C - 1, False, bits, signs.to(dev))
    # The last slot against the CPU encoder of the same rows.
    ref_codes, ref_norms = torch_tq.allocate_quantized_kv(B, Hkv, 1, D, bits)
    torch.ops.tq.hadamard_quantize_kv(src, ref_codes, ref_norms, 0, False, bits, signs)
    ok, note = codes_match(codes[:, :, C - 1 :], ref_codes, reference_u(src.transpose(1, 2), signs), bits)
    check(ok, f"big cache: last-slot codes: {note}")
    torch.testing.assert_close(norms[:, :, C - 1 :].cpu(), ref_norms, rtol=4e-6, atol=0)
    back = torch.ops.tq.dequantize_kv(codes, norms, C - 1, 1, bits, False, signs.to(dev)).cpu()
    want = torch.ops.tq.dequantize_kv(codes[:, :, C - 1 :].contiguous().cpu(), norms[:, :, C - 1 :].contiguous().cpu(), 0, 1,
                                     bits, False, signs)
    check((back - want).abs().max().item() <= 4e-6 * want.abs().max().item(), "big cache: dequantize of the last slot")
    # Attention that sees only the last 4 positions (sliding window) against the CPU op on a 4-slot ring
    # holding the same positions: every read is at the far end of the 4 GiB tensors.
    q = torch.randn(B, Hq, 1, D, dtype=torch.bfloat16)
    lse = torch.empty(B, Hq, 1, device=dev)
    out = torch.ops.tq.flash_attn_vec_tq(q.to(dev), codes, norms, v_codes, v_norms, C, D**-0.5, bits, 4, 0.0, None,
                                         signs.to(dev), lse)
    slots = torch.arange(C - 4, C)
    small = [torch.empty(B, Hkv, 4, *t.shape[3:], dtype=t.dtype) for t in (codes, norms, v_codes, v_norms)]
    for s, t in zip(small, (codes, norms, v_codes, v_norms)):
        s[:, :, slots % 4] = t[:, :, C - 4 :].cpu()
    ref_lse = torch.empty(B, Hq, 1)
    ref = torch.ops.tq.flash_attn_vec_tq(q, *small, C, D**-0.5, bits, 4, 0.0, None, signs, ref_lse)
    err = rel_rms(ref.float(), out.float())
    check(err <= OUT_RATIO_GPU[torch.bfloat16], f"big cache: windowed attention rel rms {err:.2e}")
    torch.testing.assert_close(lse.cpu(), ref_lse, rtol=1e-5, atol=3e-3)
    # Full attention over all C positions of every head: runs, finite, and timed.
    full = lambda: torch.ops.tq.flash_attn_vec_tq(q.to(dev), codes, norms, v_codes, v_norms, C, D**-0.5, bits)  # noqa: E731
    o = full()
    check(bool(torch.isfinite(o.float()).all()), "big cache: full attention has non-finite values")
    if dev.type != "cuda":
        return
    import triton.testing

    ms = triton.testing.do_bench(full, warmup=3, rep=50, return_mode="median")
    nbytes = 2 * (codes.numel() + 4 * norms.numel())
    say(f"big cache OK: last slot written and read back (codes {note}, windowed attention rel rms {err:.1e}); "
        f"full attention over {C} positions x {B * Hkv} KV heads: {ms:.3f} ms, {nbytes / ms / 1e9:.2f} TB/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, no big-cache test")
    parser.add_argument("--skip-big", action="store_true", help="leave out the > 4 GiB cache test")
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--sweep", nargs="?", const="all", choices=("all", "attn", "quant"),
                        help="only time kernel configurations side by side (attention and/or quantize variants)")
    parser.add_argument("--only", help="--sweep attn: only the variants whose name matches this regular expression")
    args = parser.parse_args()
    if args.out:
        open(args.out, "w").close()
        OUT_FILE.append(args.out)
    if not torch.cuda.is_available():
        print("benchmarks/cuda_ops.py needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    say(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    say(f"backend_status cuda: {torch_tq.backend_status()['cuda']}")
    status = 0
    try:
        say()
        if args.sweep:
            if args.sweep in ("all", "attn"):
                sweep_attention(dev, [(1, 4096), (1, 32768), (1, 131072), (8, 32768)], args.only)
            if args.sweep in ("all", "quant"):
                sweep_quantize(dev, [(8, 32768), (1, 32768), (1, 1)])
        else:
            say("correctness against the CPU reference (CUDA tensors through torch.ops.tq):")
            for part in (check_quantize, check_dequantize, check_copy, check_attention, check_attention_replays):
                for row in part(dev):
                    say("  " + row)
            say("correctness: all ops match")
            if args.quick:
                time_attention(dev, [(1, 4096), (1, 16384)])
                time_quantize(dev, [(1, 1), (1, 4096)])
            else:
                time_attention(dev, [(1, 4096), (1, 32768), (1, 131072), (8, 32768)])
                time_quantize(dev, [(1, 1), (8, 1), (1, 32768), (8, 32768)])
                if not args.skip_big:
                    check_big_cache(dev)
    except Mismatch as exc:
        say(f"MISMATCH: {exc}")
        status = 1
    except Exception:  # noqa: BLE001  (report everything, fail loudly)
        say("ERROR:\n" + traceback.format_exc())
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
