"""MSL-on-CPU simulator: compile shipped ``.metal`` files with clang against a shim
``metal_stdlib`` and run them with one fiber per GPU thread.

Public API::

    lib = compile_library(["/abs/kernels/foo.metal"], include_dirs=[...])   # cached
    stats = lib.launch("host_name", grid=(gx, gy, gz), threadgroup=(tx, ty, tz),
                       buffers={0: tensor, 1: ndarray, 2: b"setBytes payload"})
    stats.bytes_read[0], stats.bytes_written[1], stats.total_bytes
    mod = compile_cpp_module(["/abs/plans_shim.cpp"], include_dirs=[...])   # ctypes.CDLL, cached

Kernel bugs (out-of-bounds device accesses, threadgroup-memory races, reads of uninitialised
threadgroup memory, divergent collectives, barriers not reached by every thread, crashes) raise
:class:`SimError`. See README.md in this directory for the conventions kernels must follow.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = [
    "SimError",
    "CompileError",
    "LaunchStats",
    "Library",
    "compile_library",
    "compile_cpp_module",
    "find_compiler",
    "cache_dir",
]

_HERE = Path(__file__).resolve().parent
SHIM_INCLUDE = _HERE / "include"
RUNTIME_SOURCE = _HERE / "runtime" / "tqsim_runtime.cpp"
SIMD_WIDTH = 32


class SimError(RuntimeError):
    """A kernel bug found by the simulator (message names kernel, threadgroup and thread)."""


class CompileError(SimError):
    """The kernel sources could not be compiled, or they break a simulator convention."""


# ---- compiler discovery ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Compiler:
    argv: Tuple[str, ...]  # command prefix, e.g. ("clang++-19",) or (python, "-m", "ziglang", "c++")
    version: str
    excess_precision_flag: bool


_compiler_lock = threading.Lock()
_compiler: Optional[Compiler] = None


def _probe(argv: Sequence[str]) -> Optional[Compiler]:
    try:
        out = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or "clang" not in out.stdout:
        return None
    version = out.stdout.strip().splitlines()[0]
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "probe.cpp"
        src.write_text("_Float16 f(_Float16 a, _Float16 b) { return a * b; }\n")
        try:
            probe = subprocess.run(
                [*argv, "-c", "-Xclang", "-ffloat16-excess-precision=none", str(src), "-o", str(Path(d) / "p.o")],
                capture_output=True, text=True, timeout=900,
            )
        except subprocess.TimeoutExpired:
            return None
    return Compiler(tuple(argv), version, probe.returncode == 0)


def find_compiler() -> Compiler:
    """clang++ from $TQ_SIM_CXX, else clang++-19 / clang++ on PATH, else ``python -m ziglang c++``."""
    global _compiler
    with _compiler_lock:
        if _compiler is not None:
            return _compiler
        candidates: List[Sequence[str]] = []
        if os.environ.get("TQ_SIM_CXX"):
            candidates.append(os.environ["TQ_SIM_CXX"].split())
        for name in ("clang++-19", "clang++", "clang++-20", "clang++-18", "clang++-17", "clang++-16"):
            path = shutil.which(name)
            if path:
                candidates.append([path])
        candidates.append([sys.executable, "-m", "ziglang", "c++"])
        for argv in candidates:
            comp = _probe(argv)
            if comp is not None:
                _compiler = comp
                return comp
        raise CompileError(
            "no C++ compiler for the MSL simulator: install clang (apt-get install clang-19) "
            "or the ziglang wheel (pip install ziglang)"
        )


def cache_dir() -> Path:
    d = os.environ.get("TQ_SIM_CACHE")
    return Path(d) if d else Path.home() / ".cache" / "torch_tq" / "msl_sim"


def _opt_level() -> str:
    return os.environ.get("TQ_SIM_OPT", "-O2")


def fp_contract() -> str:
    """`TQ_SIM_FP_CONTRACT`: ``off`` (default: every a * b + c rounds twice, as written) or ``fast``
    (clang contracts a * b + c into one fused multiply-add wherever it can, as Apple's Metal
    compiler does). Tests must pass under both; see README.md, "Floating point"."""
    mode = os.environ.get("TQ_SIM_FP_CONTRACT", "off")
    if mode not in ("off", "fast"):
        raise CompileError(f"TQ_SIM_FP_CONTRACT must be 'off' or 'fast', got {mode!r}")
    return mode


def _fp_contract_flags() -> List[str]:
    mode = fp_contract()
    if mode == "off":
        return ["-ffp-contract=off"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        # Baseline x86-64 has no FMA instruction: clang would contract into llvm.fmuladd and then
        # compute it unfused. The kernels need the real fused operation, so the host must have it.
        if "fma" not in Path("/proc/cpuinfo").read_text().split():
            raise CompileError("TQ_SIM_FP_CONTRACT=fast needs a CPU with FMA instructions (x86-64: Haswell or later)")
        return ["-ffp-contract=fast", "-mfma"]
    return ["-ffp-contract=fast"]  # aarch64 always has fused multiply-add


def _kernel_flags(comp: Compiler) -> List[str]:
    flags = [
        "-std=c++17", _opt_level(), "-fPIC", "-fno-omit-frame-pointer", "-fconvergent-functions",
        "-fno-fast-math", *_fp_contract_flags(), "-fno-exceptions", "-fno-rtti",
        # No auto-vectorisation: the SLP vectoriser can split and duplicate loads, which would
        # distort the per-buffer byte counts (source-level vector loads stay vector loads).
        "-fno-vectorize", "-fno-slp-vectorize",
        "-Wno-unknown-attributes", "-Wno-user-defined-literals", "-Wno-unused-value",
        "-Wno-duplicate-decl-specifier",
        # Memory instrumentation: AddressSanitizer with outline callbacks only. Our runtime
        # defines the callbacks; no ASan runtime is linked, no shadow memory exists.
        "-fsanitize=address", "-fno-sanitize-address-use-after-scope",
        "-mllvm", "-asan-instrumentation-with-call-threshold=0",
        "-mllvm", "-asan-stack=0", "-mllvm", "-asan-globals=0", "-mllvm", "-asan-opt-globals=0",
    ]
    if comp.excess_precision_flag:
        flags += ["-Xclang", "-ffloat16-excess-precision=none"]
    return flags


def _runtime_flags() -> List[str]:
    extra = os.environ.get("TQ_SIM_RUNTIME_FLAGS", "").split()  # e.g. -DTQSIM_FORCE_UCONTEXT
    return ["-std=c++17", "-O2", "-fPIC", "-fno-omit-frame-pointer", "-Wno-unused-parameter", *extra]


# ---- hashing / caching ----------------------------------------------------------------------------
_DEP_EXT = (".h", ".hpp", ".hh", ".inc", ".metal", ".cpp", ".cc")


def _hash_files(h: "hashlib._Hash", paths: Iterable[Path]) -> None:
    for p in sorted(set(paths)):
        h.update(str(p).encode())
        h.update(b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")


def _dir_files(d: Path) -> List[Path]:
    out = []
    skip = str(cache_dir().resolve())
    if d.is_dir():
        for root, _dirs, files in os.walk(d):
            if "__pycache__" in root or root.startswith(skip):
                continue
            out += [Path(root) / f for f in files if f.endswith(_DEP_EXT) or "." not in f]
    return out


def _sim_files() -> List[Path]:
    return _dir_files(SHIM_INCLUDE) + [RUNTIME_SOURCE, Path(__file__).resolve()]


def _run(argv: Sequence[str], what: str, cwd: Optional[str] = None) -> str:
    out = subprocess.run(list(argv), capture_output=True, text=True, cwd=cwd)
    if out.returncode != 0:
        raise CompileError(f"{what} failed ({' '.join(argv[:6])} ...):\n{out.stderr[-6000:]}")
    return out.stdout


# ---- source scanning and glue generation ----------------------------------------------------------
_BUILTINS = {
    "thread_position_in_grid": 1,
    "threadgroup_position_in_grid": 2,
    "thread_position_in_threadgroup": 3,
    "thread_index_in_threadgroup": 4,
    "thread_index_in_simdgroup": 5,
    "simdgroup_index_in_threadgroup": 6,
    "threads_per_threadgroup": 7,
    "dispatch_threads_per_threadgroup": 7,
    "threadgroups_per_grid": 8,
    "threads_per_simdgroup": 9,
    "thread_execution_width": 9,
    "simdgroups_per_threadgroup": 10,
    "threads_per_grid": 11,
}


@dataclass
class KernelSig:
    name: str
    is_template: bool
    params: List[Tuple[int, int, int]] = field(default_factory=list)  # (kind, buffer index, flags)


def _split_top(s: str, sep: str = ",") -> List[str]:
    parts, depth, cur, i = [], 0, [], 0
    while i < len(s):
        c = s[i]
        if c in "([{<":
            depth += 1
        elif c in ")]}>":
            depth -= 1
        if c == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts


def _user_text(preprocessed: str, user_roots: Sequence[Path]) -> List[Tuple[str, str]]:
    """Splits `clang -E` output by line markers; keeps only text from files under the user's
    source and include directories (not the shim, not system headers)."""
    shim = str(SHIM_INCLUDE)
    roots = [str(r) + os.sep for r in user_roots]
    segments: List[Tuple[str, str]] = []
    cur_file, buf = "", []
    marker = re.compile(r'^#\s*(?:line\s+)?\d+\s+"([^"]*)"')
    keep_cache: Dict[str, bool] = {}

    def keep(f: str) -> bool:
        if f not in keep_cache:
            p = os.path.realpath(f) if f and not f.startswith("<") else ""
            keep_cache[f] = bool(p) and not p.startswith(shim) and any(p.startswith(r) for r in roots)
        return keep_cache[f]

    for line in preprocessed.splitlines():
        m = marker.match(line)
        if m:
            if buf and keep(cur_file):
                segments.append((cur_file, "\n".join(buf)))
            cur_file, buf = m.group(1), []
            continue
        if line.startswith("#"):
            continue
        buf.append(line)
    if buf and keep(cur_file):
        segments.append((cur_file, "\n".join(buf)))
    return segments


def convention_errors(segments: List[Tuple[str, str]]) -> List[str]:
    """Uses of `threadgroup` and vector casts the simulator cannot model (see README.md)."""
    errors = []
    for fname, text in segments:
        for m in re.finditer(r"\bthreadgroup\b(?!_)", text):
            before = text[: m.start()].rstrip()
            prev = before[-1:] if before else ";"
            rest = text[m.end():]
            head = re.split(r"[\[=;(),{]", rest, maxsplit=1)[0]
            stmt = (m.group(0) + rest.split(";", 1)[0])[:120].replace("\n", " ")
            if prev not in ";{}:":
                errors.append(
                    f"{fname}: `{stmt}`: the simulator only supports `threadgroup` on array or "
                    "scalar declarations at function scope (e.g. `threadgroup float partial[32];`); "
                    "threadgroup pointer/reference parameters, casts and template arguments are "
                    "not supported: pass the array with `auto`/template-deduced parameters"
                )
            elif "*" in head or "&" in head:
                errors.append(
                    f"{fname}: `{stmt}`: threadgroup pointers/references are not supported by the "
                    "simulator; declare `threadgroup T name[N];` and use `auto p = name;`"
                )
        for m in re.finditer(r"\(\s*(?:u?(?:char|short|int|long)|half|float|bool)[234]\s*\)\s*[\w(]", text):
            errors.append(
                f"{fname}: `{m.group(0)}`: C-style casts to vector types are bit-casts in the "
                "simulator; write the MSL constructor form, e.g. float4(x)"
            )
        for m in re.finditer(r"(?<![\w])vec\s*<[^;{}()<>]*>\s*\(", text):
            errors.append(
                f"{fname}: `{m.group(0)}`: functional casts through metal::vec<T, N> are bit-casts "
                "in the simulator; use the named constructor (float4(x)) instead"
            )
        if re.search(r"\[\[\s*threadgroup\s*\(", text):
            errors.append(f"{fname}: [[threadgroup(n)]] kernel parameters (dynamic threadgroup "
                          "memory) are not supported; declare fixed-size threadgroup arrays")
    return errors


def _check_conventions(segments: List[Tuple[str, str]]) -> None:
    errors = convention_errors(segments)
    if errors:
        raise CompileError("kernel sources break simulator conventions:\n" + "\n".join(errors))


@dataclass
class KernelDecl:
    """A `[[kernel]]` function as written: name, whether it is a template, where its declaration
    starts in the scanned text, and each parameter's text with its offset."""

    name: str
    is_template: bool
    start: int
    params: List[Tuple[str, int]]


def kernel_declarations(text: str) -> List[KernelDecl]:
    """Every `[[kernel]] void name(...)` in preprocessed kernel text."""
    decls = []
    kernel_re = (r"\[\[\s*kernel\b(?:[^\[\]]|\[[^\[\]]*\])*\]\]\s*(?:\[\[(?:[^\[\]]|\[[^\[\]]*\])*\]\]\s*)*"
                 r"(?:(?:inline|static)\s+)*void\s+(\w+)\s*\(")
    for m in re.finditer(kernel_re, text):
        # Matching parenthesis of the parameter list.
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        # Template? Look back over `template <...>` just before the attribute.
        before = text[: m.start()].rstrip()
        is_template = False
        if before.endswith(">"):
            depth, j = 0, len(before) - 1
            while j >= 0:
                depth += {">": 1, "<": -1}.get(before[j], 0)
                if depth == 0:
                    break
                j -= 1
            is_template = before[:j].rstrip().endswith("template")
        params, offset = [], m.end()
        for p in _split_top(text[m.end(): i - 1]):
            if p.strip():
                params.append((p.strip(), offset + len(p) - len(p.lstrip())))
            offset += len(p) + 1
        decls.append(KernelDecl(m.group(1), is_template, m.start(), params))
    return decls


_PARAM_ATTRIBUTE = re.compile(r"\[\[\s*(\w+)\s*(?:\(\s*(\w+)\s*\))?\s*\]\]")


def _parse_kernels(segments: List[Tuple[str, str]]) -> Dict[str, KernelSig]:
    kernels: Dict[str, KernelSig] = {}
    for decl in kernel_declarations("\n".join(t for _f, t in segments)):
        name = decl.name
        sig = KernelSig(name, decl.is_template)
        for p, _offset in decl.params:
            attrs = _PARAM_ATTRIBUTE.findall(p)
            if not attrs:
                raise CompileError(f"kernel {name}: parameter `{p}` has no [[buffer(n)]] or builtin attribute")
            kind_name, arg = attrs[-1]
            if kind_name == "buffer":
                is_const = re.match(r"\s*(?:const\s+)?constant\b", p) is not None
                sig.params.append((0, int(arg, 0), 1 if is_const else 0))
            elif kind_name in _BUILTINS:
                sig.params.append((_BUILTINS[kind_name], 0, 0))
            else:
                raise CompileError(f"kernel {name}: parameter attribute [[{kind_name}]] is not supported by the simulator")
        if name in kernels and kernels[name].params != sig.params:
            raise CompileError(f"kernel {name} is declared twice with different parameters")
        kernels[name] = sig
    return kernels


def _glue(sources: Sequence[Path], kernels: Dict[str, KernelSig]) -> str:
    lines = ["// generated by msl_sim.py — do not edit", '#include "tqsim_abi.h"']
    lines += [f'#include "{s}"' for s in sources]
    for i, k in enumerate(kernels.values()):
        flat = ", ".join(f"{kind}, {idx}, {fl}" for kind, idx, fl in k.params) or "0"
        lines.append(f"static const int32_t tqsim_params_{i}[] = {{{flat}}};")
        if not k.is_template:
            lines.append(f'static ::tqsim::Registrar tqsim_plain_{i}("{k.name}", "{k.name}", &{k.name});')
    lines.append("static const tqsim_kspec tqsim_specs[] = {")
    for i, k in enumerate(kernels.values()):
        lines.append(f'  {{"{k.name}", {len(k.params)}, tqsim_params_{i}}},')
    lines.append('  {"", 0, nullptr}};')
    lines.append('extern "C" const tqsim_kspec* tqsim_glue_specs(int* n) {')
    lines.append(f"  *n = {len(kernels)};")
    lines.append("  return tqsim_specs;")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---- the library object ---------------------------------------------------------------------------
class _Buf(ctypes.Structure):
    _fields_ = [("index", ctypes.c_int32), ("writable", ctypes.c_uint32),
                ("data", ctypes.c_void_p), ("size", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [("index", ctypes.c_int32), ("flags", ctypes.c_uint32),
                ("bytes_read", ctypes.c_uint64), ("bytes_written", ctypes.c_uint64)]


@dataclass
class LaunchStats:
    """Device-memory traffic of one launch, per ``[[buffer(n)]]`` index.

    Every load and store the kernel executes is counted (no cache model). Buffers the kernel
    declares in the ``constant`` address space are listed in ``constant_buffers``: the GPU
    serves those from its constant cache, so a bytes-moved metric should usually leave them out
    (see ``data_bytes``).
    """

    bytes_read: Dict[int, int]
    bytes_written: Dict[int, int]
    constant_buffers: frozenset = frozenset()

    @property
    def data_bytes(self) -> int:
        """Bytes read + written, excluding ``constant``-address-space buffers."""
        return sum(v for k, v in self.bytes_read.items() if k not in self.constant_buffers) + sum(
            v for k, v in self.bytes_written.items() if k not in self.constant_buffers)

    @property
    def total_read(self) -> int:
        return sum(self.bytes_read.values())

    @property
    def total_written(self) -> int:
        return sum(self.bytes_written.values())

    @property
    def total_bytes(self) -> int:
        return self.total_read + self.total_written


def _dims(v: Union[int, Sequence[int]], what: str) -> Tuple[int, int, int]:
    t = (v,) if isinstance(v, int) else tuple(int(x) for x in v)
    if not 1 <= len(t) <= 3 or any(x < 0 for x in t):
        raise ValueError(f"{what} must be 1 to 3 non-negative ints, got {v!r}")
    return tuple(t) + (1,) * (3 - len(t))  # type: ignore[return-value]


_launch_lock = threading.Lock()


class Library:
    """A compiled set of kernels; ``launch`` runs one of them by host name."""

    def __init__(self, path: Path, kernels: Sequence[str]):
        self.path = path
        self._dll = ctypes.CDLL(str(path), mode=getattr(os, "RTLD_LOCAL", 0))
        self._dll.tqsim_launch.restype = ctypes.c_int
        self._dll.tqsim_launch.argtypes = [
            ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
            ctypes.c_int, ctypes.POINTER(_Buf), ctypes.POINTER(_Stat), ctypes.c_char_p, ctypes.c_int,
        ]
        buf = ctypes.create_string_buffer(1 << 16)
        self._dll.tqsim_kernel_names(buf, len(buf))
        self.kernels = [k for k in buf.value.decode().split("\n") if k]

    def __repr__(self) -> str:
        return f"Library({self.path.name}, kernels={self.kernels})"

    def launch(
        self,
        name: str,
        grid: Union[int, Sequence[int]],
        threadgroup: Union[int, Sequence[int]],
        buffers: Mapping[int, object],
    ) -> LaunchStats:
        """Runs kernel ``name`` on ``grid`` threadgroups of ``threadgroup`` threads.

        ``buffers`` maps ``[[buffer(n)]]`` indices to CPU torch tensors or numpy arrays (read and
        written in place; non-contiguous ones through a contiguous copy) or to ``bytes`` (setBytes
        constants). Raises :class:`SimError` on kernel bugs; buffers are then left untouched.
        """
        g, tg = _dims(grid, "grid"), _dims(threadgroup, "threadgroup")
        keep: List[object] = []
        writebacks: List[Tuple[object, object]] = []
        descs = (_Buf * max(1, len(buffers)))()
        for i, (idx, obj) in enumerate(sorted(buffers.items())):
            ptr, size, writable = self._pointer(obj, keep, writebacks)
            descs[i].index, descs[i].writable, descs[i].data, descs[i].size = int(idx), writable, ptr, size
        stats = (_Stat * max(1, len(buffers)))()
        err = ctypes.create_string_buffer(4096)
        with _launch_lock:  # one launch at a time per process (signal handlers are process-wide)
            rc = self._dll.tqsim_launch(
                name.encode(), (ctypes.c_uint32 * 3)(*g), (ctypes.c_uint32 * 3)(*tg), len(buffers),
                descs, stats, err, len(err),
            )
        if rc != 0:
            raise SimError(err.value.decode(errors="replace"))
        for dst, src in writebacks:
            if hasattr(dst, "copy_"):
                dst.copy_(src)  # type: ignore[attr-defined]
            else:
                dst[...] = src  # type: ignore[index]
        n = len(buffers)
        return LaunchStats({stats[i].index: stats[i].bytes_read for i in range(n)},
                           {stats[i].index: stats[i].bytes_written for i in range(n)},
                           frozenset(stats[i].index for i in range(n) if stats[i].flags & 1))

    @staticmethod
    def _pointer(obj: object, keep: List[object], writebacks: List[Tuple[object, object]]):
        if isinstance(obj, (bytes, bytearray, memoryview)):
            data = bytes(obj)
            cbuf = ctypes.create_string_buffer(data, len(data))
            keep.append(cbuf)
            return ctypes.addressof(cbuf), len(data), 0
        if hasattr(obj, "data_ptr") and hasattr(obj, "is_contiguous"):  # torch.Tensor
            t = obj
            if t.device.type != "cpu":  # type: ignore[attr-defined]
                raise ValueError(f"simulator buffers must be CPU tensors, got device {t.device}")  # type: ignore[attr-defined]
            c = t if t.is_contiguous() else t.contiguous()  # type: ignore[attr-defined]
            if c is not t:
                writebacks.append((t, c))
            keep.append(c)
            return c.data_ptr() or None, c.numel() * c.element_size(), 1  # type: ignore[attr-defined]
        if hasattr(obj, "__array_interface__"):  # numpy
            import numpy as np

            a = obj
            c = np.ascontiguousarray(a)
            if c is not a:
                writebacks.append((a, c))
            keep.append(c)
            return c.ctypes.data or None, c.nbytes, int(c.flags.writeable)
        if isinstance(obj, ctypes.Structure):
            data = bytes(obj)
            cbuf = ctypes.create_string_buffer(data, len(data))
            keep.append(cbuf)
            return ctypes.addressof(cbuf), len(data), 0
        raise TypeError(f"unsupported buffer type {type(obj).__name__}: use a CPU tensor, a numpy array or bytes")


# ---- compilation -----------------------------------------------------------------------------------
_libs: Dict[str, Library] = {}
_build_lock = threading.Lock()
last_compile_was_cache_hit: Optional[bool] = None


def _publish(tmp: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)


def _runtime_object(comp: Compiler, work: Path) -> Path:
    h = hashlib.sha256()
    h.update(comp.version.encode())
    h.update(" ".join(comp.argv).encode())
    h.update(" ".join(_runtime_flags()).encode())
    _hash_files(h, [RUNTIME_SOURCE, SHIM_INCLUDE / "tqsim_abi.h"])
    obj = cache_dir() / f"runtime-{h.hexdigest()[:24]}.o"
    if not obj.exists():
        tmp = work / "runtime.o"
        _run([*comp.argv, *_runtime_flags(), "-I", str(SHIM_INCLUDE), "-c", str(RUNTIME_SOURCE), "-o", str(tmp)],
             "compiling the simulator runtime")
        _publish(tmp, obj)
    return obj


def compile_library(
    sources: Sequence[Union[str, Path]],
    include_dirs: Sequence[Union[str, Path]] = (),
    defines: Mapping[str, object] = {},
    extra_flags: Sequence[str] = (),
) -> Library:
    """Compiles ``.metal`` sources (one translation unit) into a simulator library, cached by
    the hash of every source and header, the flags and the compiler version."""
    global last_compile_was_cache_hit
    srcs = [Path(s).resolve() for s in sources]
    incs = [Path(d).resolve() for d in include_dirs]
    comp = find_compiler()
    dflags = [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in sorted(defines.items())]
    flags = _kernel_flags(comp) + dflags + list(extra_flags)
    h = hashlib.sha256()
    h.update(comp.version.encode())
    h.update(" ".join(comp.argv).encode())
    h.update("\0".join(flags).encode())
    h.update("\0".join(_runtime_flags()).encode())
    h.update("\0".join(map(str, srcs + incs)).encode())  # which files are the sources
    deps = list(srcs) + _sim_files()
    for d in incs + sorted({s.parent for s in srcs}):
        deps += _dir_files(d)
    _hash_files(h, deps)
    key = h.hexdigest()[:32]
    with _build_lock:
        if key in _libs:
            last_compile_was_cache_hit = True
            return _libs[key]
        final = cache_dir() / key / "kernels.so"
        if final.exists():
            last_compile_was_cache_hit = True
            lib = Library(final, [])
            _libs[key] = lib
            return lib
        last_compile_was_cache_hit = False
        cache_dir().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="build-") as tmpd:
            work = Path(tmpd)
            inc_flags = ["-I", str(SHIM_INCLUDE)]
            for d in incs + sorted({s.parent for s in srcs}):
                inc_flags += ["-I", str(d)]
            # 1. Preprocess (address-space macros off) to check conventions and find [[kernel]]s.
            probe = work / "probe.cpp"
            probe.write_text("".join(f'#include "{s}"\n' for s in srcs))
            pre = _run([*comp.argv, "-std=c++17", "-E", "-DTQSIM_PREPROCESS_ONLY", *dflags, *inc_flags,
                        str(probe)], "preprocessing the kernel sources")
            segments = _user_text(pre, [*incs, *{s.parent for s in srcs}])
            _check_conventions(segments)
            kernels = _parse_kernels(segments)
            if not kernels:
                raise CompileError(f"no [[kernel]] functions found in {[str(s) for s in srcs]}")
            # 2. Glue + instrumented compile, runtime, link.
            glue = work / "glue.cpp"
            glue.write_text(_glue(srcs, kernels))
            _run([*comp.argv, *flags, *inc_flags, "-c", str(glue), "-o", str(work / "glue.o")],
                 "compiling the kernels for the simulator")
            rt = _runtime_object(comp, work)
            so = work / "kernels.so"
            _run([*comp.argv, "-shared", "-o", str(so), str(work / "glue.o"), str(rt)], "linking the simulator library")
            _publish(so, final)
            shutil.copy(glue, final.parent / "glue.cpp")
        lib = Library(final, list(kernels))
        _libs[key] = lib
        return lib


_modules: Dict[str, ctypes.CDLL] = {}


def compile_cpp_module(
    sources: Sequence[Union[str, Path]],
    include_dirs: Sequence[Union[str, Path]] = (),
    extra_flags: Sequence[str] = (),
) -> ctypes.CDLL:
    """Builds plain C++17 sources (e.g. a C-ABI shim over mps_ops/plans/*.h) into a shared
    object, cached by content hash, and returns it as a ``ctypes.CDLL``."""
    global last_compile_was_cache_hit
    srcs = [Path(s).resolve() for s in sources]
    incs = [Path(d).resolve() for d in include_dirs]
    comp = find_compiler()
    flags = ["-std=c++17", "-O2", "-fPIC", "-shared", *extra_flags]
    h = hashlib.sha256()
    h.update(comp.version.encode())
    h.update(" ".join(comp.argv).encode())
    h.update("\0".join(flags).encode())
    h.update("\0".join(map(str, srcs + incs)).encode())
    deps = list(srcs)
    for d in incs + sorted({s.parent for s in srcs}):
        deps += _dir_files(d)
    _hash_files(h, deps)
    key = "cpp-" + h.hexdigest()[:32]
    with _build_lock:
        if key in _modules:
            last_compile_was_cache_hit = True
            return _modules[key]
        final = cache_dir() / key / "module.so"
        last_compile_was_cache_hit = final.exists()
        if not final.exists():
            cache_dir().mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="build-") as tmpd:
                so = Path(tmpd) / "module.so"
                inc_flags = [f"-I{d}" for d in incs]
                _run([*comp.argv, *flags, *inc_flags, *map(str, srcs), "-o", str(so)], "compiling C++ module")
                _publish(so, final)
        mod = ctypes.CDLL(str(final))
        _modules[key] = mod
        return mod
