"""The CPU implementations of the TurboQuant ops: native C++ kernels, or the pure-PyTorch reference.

The C++ source (``torch_tq/csrc/cpu/turboquant_cpu.cpp``) is compiled just in time, on the first
CPU call of a TurboQuant op (or :func:`load`), with ``torch.utils.cpp_extension.load`` and ninja,
into a cache directory whose name is a hash of everything the binary depends on: the source, the
compiler flags, the torch version and git revision, the C++11 ABI flag, the Python tag, the OS, the
architecture and the CPU's feature flags (the kernels are built with ``-march=native``). A cached
build is therefore never loaded by another torch, another ABI or a CPU it was not built for: that
combination gets its own directory and is built again.

* ``TQ_CPU_KERNELS`` — ``auto`` (default): native when it builds or loads, otherwise one line on
  stderr says that the reference is in use; ``native``: a failed build raises the compiler's error;
  ``reference``: the pure-PyTorch reference, nothing is compiled.
* ``TQ_CPU_CACHE`` — the cache root. Default: ``$XDG_CACHE_HOME/torch_tq/cpu_kernels`` (or
  ``~/.cache/torch_tq/cpu_kernels``).

The reference stays callable in every mode as ``torch_tq.reference.<op>`` (the executable spec).

Each op below is the Python function registered for the CPU dispatch key of ``torch.ops.tq.<op>``:
it runs the shared ``_validation.check_<op>`` (so messages are identical on every backend), resolves
the signs and the codebook, and calls the native kernel in ``torch.ops.tq_cpu``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

import torch

from .. import _validation
from ..codebooks import decision_boundaries, lloyd_max_codebook
from ..layout import resolve_signs
from . import cpu as _reference
from .cpu import turboquant as _reference_turboquant

ENV_IMPLEMENTATION = "TQ_CPU_KERNELS"
ENV_CACHE = "TQ_CPU_CACHE"
SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "cpu" / "turboquant_cpu.cpp"
_MODES = ("auto", "native", "reference")


def _mode() -> str:
    mode = os.environ.get(ENV_IMPLEMENTATION, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"torch_tq: {ENV_IMPLEMENTATION} must be one of {', '.join(_MODES)}, got {mode!r}")
    return mode


def _cpu_fingerprint() -> str:
    """What ``-march=native`` compiles for: the CPU model and feature flags (Linux), the brand string (macOS)."""
    parts = [platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU implementer", "CPU part") and line not in parts:
                    parts.append(line.strip())
                if not line.strip() and len(parts) > 1:
                    break  # the first processor describes them all
    except OSError:
        if sys.platform == "darwin":
            try:
                parts.append(subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                            text=True, timeout=10).stdout.strip())
            except (OSError, subprocess.SubprocessError):
                pass
        parts.append(platform.processor())
    return "\n".join(parts)


def _flags() -> tuple[list[str], list[str]]:
    """(cflags, ldflags). -ffp-contract=off keeps the rotation and the decode bit-identical to the reference."""
    cflags = ["-O3", "-ffp-contract=off"]
    machine = platform.machine().lower()
    cflags.append("-mcpu=native" if machine in ("arm64", "aarch64") else "-march=native")
    ldflags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is OpenMP in torch's Linux builds; without it the kernels run on one thread.
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


def _compiler() -> str:
    from torch.utils.cpp_extension import get_cxx_compiler

    return get_cxx_compiler()


def build_key() -> str:
    """The hash naming the cache directory of this source, build flags, torch (version, revision, ABI), Python
    and machine (OS, architecture, CPU features). Not the compiler: a build is as good as any other for the same
    torch, so a machine keeps using its cached build after its compiler is gone."""
    cflags, ldflags = _flags()
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(cflags + ldflags).encode(), torch.__version__.encode(),
                 str(getattr(torch.version, "git_version", "")).encode(),
                 str(torch._C._GLIBCXX_USE_CXX11_ABI).encode(), sys.implementation.cache_tag.encode(),
                 platform.system().encode(), _cpu_fingerprint().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()


def cache_dir() -> Path:
    """The directory of this build: ``<TQ_CPU_CACHE or ~/.cache/torch_tq/cpu_kernels>/torch-<version>-<python>-<hash>``."""
    root = os.environ.get(ENV_CACHE)
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "torch_tq", "cpu_kernels")
    version = torch.__version__.replace("+", "_")
    return Path(root) / f"torch-{version}-{sys.implementation.cache_tag}-{build_key()[:16]}"


_lock = threading.Lock()
_state: Optional[tuple[Optional[object], str]] = None  # (torch.ops.tq_cpu or None, description)


def _build_and_load() -> str:
    """Loads the cached build, or builds it; returns the description. Raises with the reason on failure."""
    directory = cache_dir()
    name = f"torch_tq_cpu_{directory.name.rsplit('-', 1)[-1]}"
    library = directory / f"{name}.so"
    ready = directory / "READY"
    if ready.is_file() and library.is_file():
        torch.ops.load_library(str(library))
        return f"cached build in {directory}"
    compiler = _compiler()
    if shutil.which(compiler.split()[0]) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} not found (set CXX to one)")
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    from torch.utils.cpp_extension import is_ninja_available, load as jit_load

    if not is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    directory.mkdir(parents=True, exist_ok=True)
    print(f"torch_tq: compiling the native CPU kernels (once for this machine and torch, about a minute) in {directory}",
          file=sys.stderr, flush=True)
    cflags, ldflags = _flags()
    jit_load(name=name, sources=[str(SOURCE)], extra_cflags=cflags, extra_ldflags=ldflags,
             build_directory=str(directory), is_python_module=False, verbose=False)
    ready.write_text(str(library) + "\n", encoding="utf-8")
    return f"built in {directory}"


def load() -> tuple[Optional[object], str]:
    """``(torch.ops.tq_cpu or None, description)``: loads (building once if needed) the native kernels per
    ``TQ_CPU_KERNELS``. Called by the first CPU op; call it yourself to pay the one-time build up front."""
    global _state
    if _state is not None:
        return _state
    with _lock:
        if _state is not None:
            return _state
        mode = _mode()
        if mode == "reference":
            _state = (None, f"pure-PyTorch reference ({ENV_IMPLEMENTATION}=reference)")
            return _state
        try:
            where = _build_and_load()
        except Exception as exc:  # noqa: BLE001 - any failure falls back to the reference (or raises in native mode)
            if mode == "native":
                raise RuntimeError(f"torch_tq: {ENV_IMPLEMENTATION}=native but the native CPU kernels could not be "
                                   f"built or loaded: {exc}") from exc
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            _state = (None, f"pure-PyTorch reference (native kernels unavailable: {reason})")
            print(f"torch_tq: native CPU kernels unavailable ({reason}); using the pure-PyTorch reference "
                  f"(slower; {ENV_IMPLEMENTATION}=native shows the build error)", file=sys.stderr, flush=True)
            return _state
        ops = torch.ops.tq_cpu
        _state = (ops, f"native C++ kernels ({ops.build_info()}, {torch.get_num_threads()} threads; {where})")
        return _state


def status() -> tuple[bool, str]:
    """``(native, description)`` of the CPU implementation in use (builds the kernels if needed)."""
    ops, description = load()
    return ops is not None, description


def implementation() -> str:
    """``"native"`` or ``"reference"``: which CPU implementation the ops use."""
    return "native" if load()[0] is not None else "reference"


_CODEBOOKS: dict = {}


def _codebook(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids, float32 midpoints) of ``bits``, from torch_tq.codebooks (the only source of centroids)."""
    if bits not in _CODEBOOKS:
        _CODEBOOKS[bits] = (lloyd_max_codebook(bits).contiguous(), decision_boundaries(bits).contiguous())
    return _CODEBOOKS[bits]


def hadamard_quantize_kv(src, codes, norms, write_pos: int, is_sliding: bool = False, bits: int = 4, signs=None,
                         offset=None, norm_correction: bool = False, sink=None, recent=None,
                         cache_seqlens=None) -> None:
    ops = load()[0]
    if ops is None:
        return _reference.hadamard_quantize_kv(src, codes, norms, write_pos, is_sliding, bits, signs, offset,
                                               norm_correction, sink, recent, cache_seqlens)
    _validation.check_hadamard_quantize_kv(src, codes, norms, write_pos, is_sliding, bits, signs, offset, sink, recent,
                                           cache_seqlens)
    if cache_seqlens is not None:
        return _reference_turboquant.quantize_per_sequence(hadamard_quantize_kv, src, codes, norms, is_sliding, bits,
                                                           signs, offset, norm_correction, sink, recent, cache_seqlens)
    centroids, boundaries = _codebook(bits)
    ops.hadamard_quantize_kv(src, codes, norms, write_pos, is_sliding, bits,
                             resolve_signs(signs, src.shape[-1], src.device), offset, norm_correction, sink, recent,
                             centroids, boundaries)


def dequantize_kv(codes, norms, start: int, length: int, bits: int = 4, rotated: bool = False, signs=None):
    ops = load()[0]
    if ops is None:
        return _reference.dequantize_kv(codes, norms, start, length, bits, rotated, signs)
    geo = _validation.check_dequantize_kv(codes, norms, start, length, bits, signs)
    return ops.dequantize_kv(codes, norms, start, length, bits, rotated,
                             resolve_signs(signs, geo.head_dim, codes.device), _codebook(bits)[0])


def flash_attn_vec_tq(q, k_codes, k_norms, v_codes, v_norms, kv_len: int, scale: float, bits: int = 4,
                      sliding_window: int = 0, softcap: float = 0.0, kv_start=None, signs=None, lse=None, v_bits=None,
                      k_sink=None, v_sink=None, k_recent=None, v_recent=None, cache_seqlens=None):
    ops = load()[0]
    if ops is None:
        return _reference.flash_attn_vec_tq(q, k_codes, k_norms, v_codes, v_norms, kv_len, scale, bits,
                                            sliding_window, softcap, kv_start, signs, lse, v_bits, k_sink, v_sink,
                                            k_recent, v_recent, cache_seqlens)
    _validation.check_flash_attn_vec_tq(q, k_codes, k_norms, v_codes, v_norms, kv_len, scale, bits,
                                              sliding_window, softcap, kv_start, signs, lse, v_bits, k_sink, v_sink,
                                              k_recent, v_recent, cache_seqlens)
    if cache_seqlens is not None:
        return _reference_turboquant.attend_per_sequence(flash_attn_vec_tq, q, k_codes, k_norms, v_codes, v_norms,
                                                         kv_len, scale, bits, sliding_window, softcap, kv_start, signs,
                                                         lse, v_bits, k_sink, v_sink, k_recent, v_recent, cache_seqlens)
    v_bits = bits if v_bits is None else v_bits
    return ops.flash_attn_vec_tq(q, k_codes, k_norms, v_codes, v_norms, kv_len, scale, bits, v_bits, sliding_window,
                                 softcap, kv_start, resolve_signs(signs, q.shape[-1], q.device), lse, k_sink, v_sink,
                                 k_recent, v_recent, _codebook(bits)[0], _codebook(v_bits)[0])


def kv_cache_copy(src, cache, write_pos: int, is_sliding: bool = False) -> None:
    ops = load()[0]
    if ops is None:
        return _reference.kv_cache_copy(src, cache, write_pos, is_sliding)
    _validation.check_kv_cache_copy(src, cache, write_pos, is_sliding)
    ops.kv_cache_copy(src, cache, write_pos, is_sliding)
