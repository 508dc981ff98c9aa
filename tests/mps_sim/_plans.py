"""Run torch.ops.tq ops end to end through the MPS launch plans and the MSL simulator, on CPU tensors.

``plan(op, **kwargs)`` calls the C++ launch plan of ``op`` (``mps_ops/plans/<op>.h``, through the C
ABI of ``mps_ops/sim_bindings.cpp`` built here with the system C++ compiler) and returns its launches
or its error text. ``run(op, **kwargs)`` then executes the launches in the simulator, binding
buffers exactly as ``mps_ops/torch_tq_mps.mm`` does (inputs in schema order, src/q made contiguous,
outputs and scratch allocated by the host, the codebooks from ``torch_tq.codebooks`` (binding index 0:
``codebook_bits``, 1: ``second_codebook_bits``), ``torch_tq.layout.hadamard_signs(D)`` for an absent
``signs``, a 16-byte zero buffer for absent optionals), and
returns what the op returns. Outputs and scratch start as NaN so
unwritten elements show.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from torch_tq.codebooks import decision_boundaries, lloyd_max_codebook
from torch_tq.layout import hadamard_signs

ROOT = Path(__file__).resolve().parents[2]
MPS_OPS = ROOT / "mps_ops"
KERNELS = MPS_OPS / "kernels"

# tq_plan::Arg
ARG_INPUT, ARG_OUTPUT, ARG_SCRATCH, ARG_PARAMS, ARG_CODEBOOK, ARG_DUMMY, ARG_CANONICAL_SIGNS = range(7)

# Kernel host-name prefix -> the .metal file that instantiates it.
KERNEL_SOURCES = {
    "kv_cache_copy_": "kv_cache.metal",
    "hadamard_quantize_kv_": "turboquant.metal",
    "dequantize_kv_": "turboquant.metal",
    "flash_attn_vec_tq_": "attention.metal",
    "recompute_w_u_": "gated_delta_chunk.metal",
    "chunk_fwd_h_": "gated_delta_chunk.metal",
    "chunk_fwd_o_": "gated_delta_chunk.metal",
    "chunk_gated_delta_rule_": "gated_delta_fused.metal",
    "fused_recurrent_gated_delta_rule_": "gated_delta_recurrent.metal",
    "chunk_local_cumsum_": "gated_delta_chunk_prep.metal",
    "chunk_scaled_dot_kkt_": "gated_delta_chunk_prep.metal",
    "solve_tril": "gated_delta_chunk_prep.metal",
}

# Schema order of each op's arguments and which of them are tensors (Arg::Input indices).
OP_ARGS = {
    "kv_cache_copy": ("src", "cache", "write_pos", "is_sliding"),
    "hadamard_quantize_kv": ("src", "codes", "norms", "write_pos", "is_sliding", "bits", "signs", "offset",
                             "norm_correction", "sink", "recent", "cache_seqlens"),
    "dequantize_kv": ("codes", "norms", "start", "length", "bits", "rotated", "signs"),
    "recompute_w_u": ("k", "v", "beta", "A", "g", "cu_seqlens"),
    "chunk_fwd_h": ("k", "w", "u", "g", "initial_state", "cu_seqlens"),
    "chunk_fwd_o": ("q", "k", "v", "h", "g", "scale", "cu_seqlens"),
    "flash_attn_vec_tq": ("q", "k_codes", "k_norms", "v_codes", "v_norms", "kv_len", "scale", "bits",
                          "sliding_window", "softcap", "kv_start", "signs", "lse", "v_bits", "k_sink", "v_sink",
                          "k_recent", "v_recent", "cache_seqlens"),
    "fused_recurrent_gated_delta_rule": ("q", "k", "v", "g", "beta", "scale", "initial_state", "output_final_state",
                                         "use_qk_l2norm_in_kernel", "cu_seqlens"),
    "chunk_gated_delta_rule": ("q", "k", "v", "g", "beta", "scale", "initial_state", "output_final_state",
                               "use_qk_l2norm_in_kernel", "cu_seqlens"),
    "chunk_local_cumsum": ("g", "chunk_size", "reverse", "scale", "cu_seqlens"),
    "chunk_scaled_dot_kkt": ("k", "g", "beta", "cu_seqlens"),
    "solve_tril": ("A", "cu_seqlens"),
}
OP_DEFAULTS = {
    "kv_cache_copy": dict(is_sliding=False),
    "hadamard_quantize_kv": dict(is_sliding=False, bits=4, signs=None, offset=None, norm_correction=False, sink=None,
                                 recent=None, cache_seqlens=None),
    "dequantize_kv": dict(bits=4, rotated=False, signs=None),
    "recompute_w_u": dict(cu_seqlens=None),
    "chunk_fwd_h": dict(initial_state=None, cu_seqlens=None),
    "chunk_fwd_o": dict(scale=None, cu_seqlens=None),
    "flash_attn_vec_tq": dict(bits=4, sliding_window=0, softcap=0.0, kv_start=None, signs=None, lse=None, v_bits=None,
                              k_sink=None, v_sink=None, k_recent=None, v_recent=None, cache_seqlens=None),
    "fused_recurrent_gated_delta_rule": dict(scale=None, initial_state=None, output_final_state=False,
                                             use_qk_l2norm_in_kernel=False, cu_seqlens=None),
    "chunk_gated_delta_rule": dict(scale=None, initial_state=None, output_final_state=False,
                                   use_qk_l2norm_in_kernel=False, cu_seqlens=None),
    "chunk_local_cumsum": dict(chunk_size=64, reverse=False, scale=None, cu_seqlens=None),
    "chunk_scaled_dot_kkt": dict(cu_seqlens=None),
    "solve_tril": dict(cu_seqlens=None),
}
OP_TENSORS = {
    "kv_cache_copy": ("src", "cache"),
    "hadamard_quantize_kv": ("src", "codes", "norms", "signs", "offset", "sink", "recent"),
    "dequantize_kv": ("codes", "norms", "signs"),
    "recompute_w_u": ("k", "v", "beta", "A", "g", "cu_seqlens"),
    "chunk_fwd_h": ("k", "w", "u", "g", "initial_state", "cu_seqlens"),
    "chunk_fwd_o": ("q", "k", "v", "h", "g", "cu_seqlens"),
    "flash_attn_vec_tq": ("q", "k_codes", "k_norms", "v_codes", "v_norms", "kv_start", "signs", "lse", "k_sink",
                          "v_sink", "k_recent", "v_recent"),
    "fused_recurrent_gated_delta_rule": ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens"),
    "chunk_gated_delta_rule": ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens"),
    "chunk_local_cumsum": ("g", "cu_seqlens"),
    "chunk_scaled_dot_kkt": ("k", "g", "beta", "cu_seqlens"),
    "solve_tril": ("A", "cu_seqlens"),
}
# Inputs the .mm passes through .contiguous() (read-only inputs the validation accepts strided).
CONTIGUOUS_COPY = {"src", "q", "kv_start"}


class TensorDesc(ctypes.Structure):
    _fields_ = [
        ("defined", ctypes.c_int32),
        ("dim", ctypes.c_int32),
        ("sizes", ctypes.c_int64 * 8),
        ("strides", ctypes.c_int64 * 8),
        ("dtype", ctypes.c_char * 16),
        ("device", ctypes.c_char * 32),
        ("contiguous", ctypes.c_int32),
    ]


class Binding(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("index", ctypes.c_int32)]


class LaunchC(ctypes.Structure):
    _fields_ = [
        ("kernel", ctypes.c_char * 128),
        ("grid", ctypes.c_uint32 * 3),
        ("threads", ctypes.c_uint32 * 3),
        ("threadgroup_memory", ctypes.c_uint32),
        ("num_bindings", ctypes.c_int32),
        ("bindings", Binding * 16),
        ("params_size", ctypes.c_uint32),
        ("params", ctypes.c_uint8 * 512),
    ]


class PlanC(ctypes.Structure):
    _fields_ = [
        ("error", ctypes.c_char * 1024),
        ("num_launches", ctypes.c_int32),
        ("launches", LaunchC * 16),
        ("num_scratch", ctypes.c_int32),
        ("scratch_bytes", ctypes.c_uint64 * 8),
        ("codebook_bits", ctypes.c_int32),
        ("second_codebook_bits", ctypes.c_int32),
        ("canonical_signs_dim", ctypes.c_int32),
        ("num_outputs", ctypes.c_int32),
        ("output_dims", ctypes.c_int32 * 4),
        ("output_sizes", (ctypes.c_int64 * 8) * 4),
        ("output_dtypes", (ctypes.c_char * 16) * 4),
        ("num_input_dtypes", ctypes.c_int32),
        ("input_dtypes", (ctypes.c_char * 16) * 16),
    ]


def _compiler() -> list[str]:
    for cxx in (os.environ.get("CXX"), "clang++", "g++", "c++", "clang++-19"):
        if cxx and shutil.which(cxx):
            return [cxx]
    return ["python", "-m", "ziglang", "c++"]


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    sources = [MPS_OPS / "sim_bindings.cpp", *sorted(KERNELS.glob("*.h")), *sorted((MPS_OPS / "plans").glob("*.h"))]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    cache = Path(os.environ.get("TQ_SIM_CACHE", Path(tempfile.gettempdir()) / "torch_tq_sim_cache"))
    cache.mkdir(parents=True, exist_ok=True)
    lib = cache / f"tq_plans_{digest}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [*_compiler(), "-std=c++17", "-O1", "-Wall", "-Wextra", "-shared", "-fPIC",
               "-o", str(tmp), str(MPS_OPS / "sim_bindings.cpp")]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, lib)
    dll = ctypes.CDLL(str(lib))
    desc = ctypes.POINTER(TensorDesc)
    out = ctypes.POINTER(PlanC)
    i64, i32, f64 = ctypes.c_int64, ctypes.c_int32, ctypes.c_double
    dll.tq_plan_kv_cache_copy.argtypes = [desc, desc, i64, i32, out]
    dll.tq_plan_hadamard_quantize_kv.argtypes = [desc, desc, desc, i64, i32, i64, desc, desc, i32, desc, desc, desc,
                                                 out]
    dll.tq_plan_dequantize_kv.argtypes = [desc, desc, i64, i64, i64, i32, desc, out]
    dll.tq_plan_flash_attn_vec_tq.argtypes = [desc, desc, desc, desc, desc, i64, f64, i64, i64, f64, desc, desc, desc,
                                              i32, i64, desc, desc, desc, desc, desc, out]
    i64p = ctypes.POINTER(ctypes.c_int64)
    dll.tq_plan_fused_recurrent_gated_delta_rule.argtypes = [desc, desc, desc, desc, desc, i32, f64, desc, i32, i32,
                                                             desc, i64p, i32, out]
    dll.tq_plan_chunk_gated_delta_rule.argtypes = [desc, desc, desc, desc, desc, i32, f64, desc, i32, i32, desc, i64p,
                                                   i32, out]
    dll.tq_plan_chunk_local_cumsum.argtypes = [desc, i64, i32, i32, f64, desc, i64p, i32, out]
    dll.tq_plan_chunk_scaled_dot_kkt.argtypes = [desc, desc, desc, desc, i64p, i32, out]
    dll.tq_plan_solve_tril.argtypes = [desc, desc, i64p, i32, out]
    dll.tq_plan_recompute_w_u.argtypes = [desc, desc, desc, desc, desc, desc, i64p, i32, out]
    dll.tq_plan_chunk_fwd_h.argtypes = [desc, desc, desc, desc, desc, desc, i64p, i32, out]
    dll.tq_plan_chunk_fwd_o.argtypes = [desc, desc, desc, desc, desc, i32, f64, desc, i64p, i32, out]
    return dll


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe(t) -> TensorDesc:
    d = TensorDesc()
    if t is None:
        return d
    d.defined = 1
    d.dim = t.dim()
    for i, (s, st) in enumerate(zip(t.shape, t.stride())):
        d.sizes[i] = s
        d.strides[i] = st
    d.dtype = _dtype_name(t.dtype).encode()
    d.device = str(t.device).encode()
    d.contiguous = int(t.is_contiguous())
    return d


def _bind_args(op: str, kwargs: dict) -> dict:
    args = dict(OP_DEFAULTS[op])
    args.update(kwargs)
    missing = [a for a in OP_ARGS[op] if a not in args]
    if missing:
        raise TypeError(f"{op}: missing arguments {missing}")
    return args


def plan(op: str, **kwargs) -> dict:
    """The launch plan of ``op`` for these arguments: ``error`` (str, empty when valid) and ``launches``."""
    a = _bind_args(op, kwargs)
    out = PlanC()
    dll = _library()
    D = lambda name: ctypes.byref(describe(a[name]))  # noqa: E731
    if op == "kv_cache_copy":
        dll.tq_plan_kv_cache_copy(D("src"), D("cache"), a["write_pos"], int(a["is_sliding"]), ctypes.byref(out))
    elif op == "hadamard_quantize_kv":
        dll.tq_plan_hadamard_quantize_kv(D("src"), D("codes"), D("norms"), int(a["write_pos"]), int(a["is_sliding"]),
                                         a["bits"], D("signs"), D("offset"), int(a["norm_correction"]), D("sink"),
                                         D("recent"), D("cache_seqlens"), ctypes.byref(out))
    elif op == "dequantize_kv":
        dll.tq_plan_dequantize_kv(D("codes"), D("norms"), a["start"], a["length"], a["bits"], int(a["rotated"]),
                                  D("signs"), ctypes.byref(out))
    elif op == "flash_attn_vec_tq":
        dll.tq_plan_flash_attn_vec_tq(D("q"), D("k_codes"), D("k_norms"), D("v_codes"), D("v_norms"), int(a["kv_len"]),
                                      float(a["scale"]), a["bits"], a["sliding_window"], float(a["softcap"]),
                                      D("kv_start"), D("signs"), D("lse"), int(a["v_bits"] is not None),
                                      a["v_bits"] if a["v_bits"] is not None else 0, D("k_sink"), D("v_sink"),
                                      D("k_recent"), D("v_recent"), D("cache_seqlens"), ctypes.byref(out))
    elif op == "fused_recurrent_gated_delta_rule":
        cu_values, num_cu_values = values(a["cu_seqlens"])
        dll.tq_plan_fused_recurrent_gated_delta_rule(
            D("q"), D("k"), D("v"), D("g"), D("beta"), int(a["scale"] is not None),
            float(a["scale"] if a["scale"] is not None else 0.0), D("initial_state"), int(a["output_final_state"]),
            int(a["use_qk_l2norm_in_kernel"]), D("cu_seqlens"), cu_values, num_cu_values, ctypes.byref(out))
    elif op == "chunk_gated_delta_rule":
        cu_values, num_cu_values = values(a["cu_seqlens"])
        dll.tq_plan_chunk_gated_delta_rule(
            D("q"), D("k"), D("v"), D("g"), D("beta"), int(a["scale"] is not None),
            float(a["scale"] if a["scale"] is not None else 0.0), D("initial_state"), int(a["output_final_state"]),
            int(a["use_qk_l2norm_in_kernel"]), D("cu_seqlens"), cu_values, num_cu_values, ctypes.byref(out))
    elif op == "chunk_local_cumsum":
        cu_values, num_cu_values = values(a["cu_seqlens"])
        dll.tq_plan_chunk_local_cumsum(D("g"), a["chunk_size"], int(a["reverse"]), int(a["scale"] is not None),
                                       float(a["scale"] if a["scale"] is not None else 0.0), D("cu_seqlens"),
                                       cu_values, num_cu_values, ctypes.byref(out))
    elif op == "chunk_scaled_dot_kkt":
        cu_values, num_cu_values = values(a["cu_seqlens"])
        dll.tq_plan_chunk_scaled_dot_kkt(D("k"), D("g"), D("beta"), D("cu_seqlens"), cu_values, num_cu_values,
                                         ctypes.byref(out))
    elif op == "solve_tril":
        cu_values, num_cu_values = values(a["cu_seqlens"])
        dll.tq_plan_solve_tril(D("A"), D("cu_seqlens"), cu_values, num_cu_values, ctypes.byref(out))
    elif op == "recompute_w_u":
        cu_values, num_cu_values = values(a["cu_seqlens"])
        dll.tq_plan_recompute_w_u(D("k"), D("v"), D("beta"), D("A"), D("g"), D("cu_seqlens"), cu_values, num_cu_values,
                                  ctypes.byref(out))
    elif op == "chunk_fwd_h":
        cu_values, num_cu_values = values(a["cu_seqlens"])
        dll.tq_plan_chunk_fwd_h(D("k"), D("w"), D("u"), D("g"), D("initial_state"), D("cu_seqlens"), cu_values,
                                num_cu_values, ctypes.byref(out))
    elif op == "chunk_fwd_o":
        cu_values, num_cu_values = values(a["cu_seqlens"])
        dll.tq_plan_chunk_fwd_o(D("q"), D("k"), D("v"), D("h"), D("g"), int(a["scale"] is not None),
                                float(a["scale"] if a["scale"] is not None else 0.0), D("cu_seqlens"), cu_values,
                                num_cu_values, ctypes.byref(out))
    else:
        raise KeyError(op)
    launches = []
    for i in range(out.num_launches):
        l = out.launches[i]
        launches.append(dict(
            kernel=l.kernel.decode(),
            grid=tuple(l.grid),
            threads=tuple(l.threads),
            threadgroup_memory=l.threadgroup_memory,
            bindings=[(l.bindings[b].kind, l.bindings[b].index) for b in range(l.num_bindings)],
            params=bytes(l.params[: l.params_size]),
        ))
    return dict(
        error=out.error.decode(),
        launches=launches,
        scratch_bytes=[out.scratch_bytes[i] for i in range(out.num_scratch)],
        codebook_bits=out.codebook_bits,
        second_codebook_bits=out.second_codebook_bits,
        canonical_signs_dim=out.canonical_signs_dim,
        outputs=[(list(out.output_sizes[i][: out.output_dims[i]]), getattr(torch, out.output_dtypes[i].value.decode()))
                 for i in range(out.num_outputs)],
        input_dtypes=[out.input_dtypes[i].value.decode() for i in range(out.num_input_dtypes)],
    )


def values(t) -> tuple:
    """(int64 array, length) of a host copy of ``t``'s values (cu_seqlens), as the .mm reads them; (None, 0) for None."""
    if t is None:
        return None, 0
    v = [int(x) for x in t.tolist()]
    return (ctypes.c_int64 * len(v))(*v), len(v)


def kernel_source(kernel: str) -> Path:
    for prefix, source in KERNEL_SOURCES.items():
        if kernel.startswith(prefix):
            return KERNELS / source
    raise KeyError(kernel)


def codebook_tensor(bits: int) -> torch.Tensor:
    """What the .mm sends with setBytes: float32 [2^b centroids, 2^b - 1 boundaries]."""
    return torch.cat([lloyd_max_codebook(bits), decision_boundaries(bits)]).contiguous()


def device_bytes(stats: list) -> int:
    """Device-memory bytes read + written by the launches in ``stats``, without the setBytes payloads
    (params, codebook, dummies: constant data in the command buffer on a Mac, not device memory)."""
    total = 0
    for s in stats:
        for n, (kind, _index) in enumerate(s["bindings"]):
            if kind in (ARG_INPUT, ARG_OUTPUT, ARG_SCRATCH):
                total += s["report"].bytes_read.get(n, 0) + s["report"].bytes_written.get(n, 0)
    return total


def run(op: str, *, stats: list | None = None, **kwargs):
    """Execute ``op`` through its plan in the simulator; raises ValueError with the plan's text on bad input.

    ``stats``, when given, receives one simulator report per launch (bytes read/written, ...).
    """
    from _sim_adapter import launch_kernel  # the simulator's launcher, behind one small adapter

    a = _bind_args(op, kwargs)
    p = plan(op, **kwargs)
    if p["error"]:
        raise ValueError(p["error"])
    inputs = []
    for i, name in enumerate(OP_TENSORS[op]):
        t = a[name]
        if t is not None and name in CONTIGUOUS_COPY:
            t = t.contiguous()
        if t is not None and i < len(p["input_dtypes"]) and p["input_dtypes"][i]:
            t = t.to(getattr(torch, p["input_dtypes"][i])).contiguous()
        inputs.append(t)
    # NaN (or 0xFF bytes for integer outputs) marks unwritten elements.
    outputs = [torch.full(sizes, float("nan"), dtype=dtype) if dtype.is_floating_point
               else torch.full(sizes, -1, dtype=dtype) for sizes, dtype in p["outputs"]]
    scratch = [torch.full((n // 4,), float("nan"), dtype=torch.float32) for n in p["scratch_bytes"]]
    codebooks = [codebook_tensor(b) if b else None for b in (p["codebook_bits"], p["second_codebook_bits"])]
    canonical_signs = hadamard_signs(p["canonical_signs_dim"]) if p["canonical_signs_dim"] else None
    dummy = torch.zeros(4, dtype=torch.float32)
    for launch in p["launches"]:
        buffers = []
        for kind, index in launch["bindings"]:
            if kind == ARG_INPUT:
                buffers.append(inputs[index])
            elif kind == ARG_OUTPUT:
                buffers.append(outputs[index])
            elif kind == ARG_SCRATCH:
                buffers.append(scratch[index])
            elif kind == ARG_PARAMS:
                buffers.append(launch["params"])
            elif kind == ARG_CODEBOOK:
                buffers.append(codebooks[index])
            elif kind == ARG_CANONICAL_SIGNS:
                buffers.append(canonical_signs)
            elif kind == ARG_DUMMY:
                buffers.append(dummy)
            else:
                raise ValueError(f"unknown binding kind {kind}")
        report = launch_kernel(kernel_source(launch["kernel"]), launch["kernel"], launch["grid"], launch["threads"],
                               buffers)
        if stats is not None:
            stats.append(dict(kernel=launch["kernel"], grid=launch["grid"], bindings=launch["bindings"], report=report))
    # Outputs that .contiguous() copied are inputs only; cache tensors were validated contiguous
    # and are written in place.
    if not outputs:
        return None
    return outputs[0] if len(outputs) == 1 else tuple(outputs)
