"""Compile the CUDA Triton kernels for sm_90 offline (no GPU: Triton's bundled ptxas and cuobjdump) and print
registers / stack (spills) / shared memory and a SASS instruction mix (LDG, LDS, STS, BAR, total).

    PYTHONPATH=. python benchmarks/compile_sm90.py v2|v3 "[(D, k_bits, v_bits, block_n, warps, prefetch, pair, stages[, {CONST: value}]), ...]" [fold_q 0/1]
    PYTHONPATH=. python benchmarks/compile_sm90.py quant "[(D, bits, rows, warps, src_dtype, {flag: value}), ...]" [kernel name]

v3 = the v2 kernel with SWAP (BLOCK_M 16 unless the dict sets it). Prints registers, stack, dynamic shared memory
(kernel.metadata.shared: cuobjdump's SHARED misses it; it must stay <= 232,448 bytes on an H200, and <= ~100 KB for
two programs per SM), the SASS mix and the mix inside the main loop.

Pointer arguments and C/chunk/strides are marked divisible by 16, as Triton specializes them at a real launch
(without it the byte loads do not vectorize and the register counts are far too high). STACK > 0 means spills.
"""
import os, re, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torch_tq.backends.cuda import turboquant as tq

DIV16 = {"C", "chunk", "n_rows", "stride_sb", "stride_st", "stride_sh", "stride_qb", "stride_qh", "stride_ql"}
BIN = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")


def compile_one(fn, sig, consts, num_warps, num_stages=1, maxnreg=None):
    import inspect
    names = list(inspect.signature(fn.fn).parameters)
    full = {}
    for n in names:
        if n in consts:
            full[n] = "constexpr"
        else:
            full[n] = sig(n)
    div16 = [n for n in names if n not in consts and (full[n].startswith("*") or n in DIV16)]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = ASTSource(fn, full, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 64), options=dict(num_warps=num_warps, num_stages=num_stages,
                                                                       **({"maxnreg": maxnreg} if maxnreg else {})))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    out = subprocess.run([f"{BIN}/cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    sass = subprocess.run([f"{BIN}/cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
    n_ldg = len(re.findall(r"\bLDG\.", sass)); n_lds = len(re.findall(r"\bLDS", sass)); n_sts = len(re.findall(r"\bSTS", sass))
    n_bar = len(re.findall(r"\bBAR\.", sass)); n_ins = len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, re.M))
    return m.groups() if m else out, (n_ldg, n_lds, n_sts, n_bar, n_ins), k


def loop_mix(k):
    """(LDG, LDS, STS, BAR, instructions) of the backward-branch range of the SASS with the most LDG (the main loop)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    sass = subprocess.run([f"{BIN}/cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
    ins = [(int(a, 16), txt) for a, txt in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for addr, txt in ins:
        b = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", txt)
        if b and int(b.group(1), 16) < addr:
            loops.append((int(b.group(1), 16), addr))
    mixes = []
    for lo, hi in loops:
        body = [t for a, t in ins if lo <= a <= hi]
        count = lambda pat: sum(1 for t in body if re.search(pat, t))  # noqa: E731
        mixes.append((count(r"\bLDG\."), count(r"\bLDS"), count(r"\bSTS"), count(r"\bBAR\."), len(body)))
    # The main loop streams the codes: the loop with the most global loads (ties: the longest).
    return max(mixes, default=(0, 0, 0, 0, 0))


def attn_sig(qdt, pair=False):
    def sig(n):
        if n == "q_ptr":
            return f"*{qdt}"
        if n == "hmat_ptr":
            return "*fp16" if qdt != "fp32" else "*fp32"
        if n in ("k_codes_ptr", "v_codes_ptr"):
            return "*u8"
        if n in ("k_codebook_ptr", "v_codebook_ptr"):
            if pair:
                return "*i32"
            return "*fp16" if qdt != "fp32" else "*fp32"
        if n in ("kv_start_ptr", "seqlens_ptr"):
            return "*i64"
        if n == "tickets_ptr":
            return "*i32"
        if n == "out_ptr":
            return f"*{qdt}"
        if n.endswith("_ptr"):
            return "*fp32"
        if n in ("softcap", "q_scale", "inv_sqrt_r"):
            return "fp32"
        return "i32"
    return sig


if __name__ == "__main__":
    import triton.language as tl
    which = sys.argv[1] if len(sys.argv) > 1 else "v2"
    if which in ("v2", "v3"):
        import ast
        fn = tq.flash_attn_vec_tq_fwd2_kernel
        for entry in ast.literal_eval(sys.argv[2]):
            D, kb, vb, bn, nw, pf, pair, ns = entry[:8]
            extra = entry[8] if len(entry) > 8 else {}
            bm = extra.pop("BLOCK_M", 16)
            maxnreg = extra.pop("maxnreg", None)
            consts = dict(D=D, K_BITS=kb, V_BITS=vb, BLOCK_M=bm, BLOCK_N=bn, HAS_SINK=False, HAS_RECENT=False,
                          HAS_KV_START=False, HAS_SEQLENS=False, USE_WINDOW=False, USE_SOFTCAP=False,
                          PRECISION="tf32", DOT_DTYPE=tl.float16, FOLD_Q=(D <= 128) if len(sys.argv) < 4 else bool(int(sys.argv[3])),
                          PREFETCH=pf, LUT_PAIR=pair, FUSED_MERGE=True, MERGE_ROWS=min(256 // D, bm), STORE_LSE=False,
                          SWAP=which == "v3")
            consts.update(extra)
            import inspect
            names = set(inspect.signature(fn.fn).parameters)
            consts = {k: v for k, v in consts.items() if k in names}
            r, cnt, k = compile_one(fn, attn_sig("bf16", pair), consts, nw, ns, maxnreg)
            print(f"{which} D{D} k{kb}v{vb} BM{bm} BN{bn} w{nw} pf={pf} pair={pair} st={ns} {extra} maxnreg={maxnreg}: REG/STACK/SHARED/LOCAL {r} "
                  f"dyn smem {k.metadata.shared}  LDG/LDS/STS/BAR/instr {cnt}  in loop {loop_mix(k)}", flush=True)


def quant_sig(src_dtype):
    def sig(n):
        if n == "src_ptr":
            return f"*{src_dtype}"
        if n == "codes_ptr":
            return "*u8"
        if n == "seqlens_ptr":
            return "*i64"
        if n in ("sink_ptr", "recent_ptr"):
            return "*bf16"
        if n.endswith("_ptr"):
            return "*fp32"
        if n in ("sqrt_r", "inv_sqrt_r"):
            return "fp32"
        return "i32"
    return sig


if __name__ == "__main__" and sys.argv[1] == "quant":
    import ast
    import inspect
    fn = getattr(tq, sys.argv[3] if len(sys.argv) > 3 else "hadamard_quantize_kv_dot_kernel")
    names = set(inspect.signature(fn.fn).parameters)
    for D, bits, rows, nw, src_dtype, extra in ast.literal_eval(sys.argv[2]):
        # src_dtype "bf16"/"fp16": the direct dot path; "fp32" (or an offset): the split path (3 bf16 parts).
        consts = dict(D=D, R=min(D, 256), HKV=8, BITS=bits, ROWS=rows, IS_SLIDING=False, USE_OFFSET=False,
                      NORM_CORRECTION=False, HAS_SINK=False, HAS_RECENT=False, HAS_SEQLENS=False,
                      stride_sd=1,  # a contiguous src: Triton specializes a stride of 1 at launch
                      SPLIT=src_dtype == "fp32", SIGNS_PM1=True, F32_OPERANDS=False, DOT_DTYPE=tl.float16 if src_dtype == "fp16" else tl.bfloat16)
        consts.update(extra)
        stages = consts.pop("num_stages", 1)
        consts = {k: v for k, v in consts.items() if k in names}
        r, cnt, k = compile_one(fn, quant_sig(src_dtype), consts, nw, stages)
        print(f"quant D{D} b{bits} {src_dtype} rows{rows} w{nw} st{stages} {extra}: REG/STACK/SHARED/LOCAL {r} "
              f"metadata.shared {k.metadata.shared}  LDG/LDS/STS/BAR/instr {cnt}", flush=True)
