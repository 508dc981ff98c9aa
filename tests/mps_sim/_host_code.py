"""Build the platform-neutral host code of ``mps_ops/torch_tq_mps.mm`` on this machine, for tests.

The .mm keeps its Objective-C/Metal parts in two marked sections (``// ---- Metal headers`` ...
``// ---- end of Metal headers ----`` and ``// ---- Metal encoding`` ... ``// ---- end of Metal
encoding ----``). ``source()`` drops both and puts in their place a C++ ``encode`` that launches
nothing: it checks every binding of every launch against the op's inputs, outputs and scratch
buffers (raising through TORCH_CHECK on a bad one) and records the launched kernel names. The
rest of the file, the op registrations ``TORCH_LIBRARY_IMPL(tq, MPS, m)`` and the host code of
every op (describe, plan, check_plan, input conversions, output allocation), compiles unchanged.

``library()`` compiles that source with the system C++ compiler against the installed torch's
headers into a shared library cached by content hash (``$TQ_SIM_CACHE``, default as
``_plans.py``) and loads it with ``torch.ops.load_library``: the MPS kernels of the ``tq`` ops
are then registered in this process (CPU tensors reach them through ``redispatch``), and
``torch.ops.tq_host_check.launched()`` returns (and clears) the kernel names encoded since the
last call, ``bound_inputs()`` the input tensors of the last encode.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
MPS_OPS = ROOT / "mps_ops"
MM = MPS_OPS / "torch_tq_mps.mm"
MODULE = "torch_tq_host_check"

SECTIONS = (("// ---- Metal headers", "// ---- end of Metal headers ----"),
            ("// ---- Metal encoding", "// ---- end of Metal encoding ----"))

STUB = r"""
// ---- host-code check (tests/mps_sim/_host_code.py): replaces the Metal encoding ----
std::mutex g_launched_mutex;
std::vector<std::string> g_launched;  // kernel names encoded since the last launched()
std::vector<std::string> g_bound;     // the inputs of the last encode(): "dtype [sizes] data_ptr" or "undefined"

// Encodes nothing; checks what the Metal encoder would bind at every [[buffer(n)]].
void encode(const tq_plan::Plan& plan, const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& outputs) {
  TORCH_CHECK(plan.ok(), "tq_host_check: encode() got a failed plan: ", plan.error);
  for (const tq_plan::Launch& launch : plan.launches) {
    for (size_t n = 0; n < launch.bindings.size(); ++n) {
      const tq_plan::Binding& b = launch.bindings[n];
      const auto where = [&] { return launch.kernel + " [[buffer(" + std::to_string(n) + ")]]"; };
      switch (b.kind) {
        case Arg::Input: {
          TORCH_CHECK(b.index >= 0 && static_cast<size_t>(b.index) < inputs.size(), "tq_host_check: ", where(),
                      " binds input ", b.index, " of ", inputs.size());
          const at::Tensor& t = inputs[b.index];
          TORCH_CHECK(t.defined(), "tq_host_check: ", where(), " binds input ", b.index, ", which is undefined");
          // The kernels index flat buffers from the view's byte offset.
          TORCH_CHECK(t.is_contiguous(), "tq_host_check: ", where(), " binds input ", b.index,
                      ", which is not contiguous (strides ", t.strides(), ")");
          if (static_cast<size_t>(b.index) < plan.input_dtypes.size() && !plan.input_dtypes[b.index].empty())
            TORCH_CHECK(dtype_name(t.scalar_type()) == plan.input_dtypes[b.index], "tq_host_check: ", where(),
                        " binds input ", b.index, " as ", dtype_name(t.scalar_type()), ", the plan reads ",
                        plan.input_dtypes[b.index]);
          break;
        }
        case Arg::Output: {
          TORCH_CHECK(b.index >= 0 && static_cast<size_t>(b.index) < outputs.size(), "tq_host_check: ", where(),
                      " binds output ", b.index, " of ", outputs.size());
          const at::Tensor& t = outputs[b.index];
          TORCH_CHECK(t.defined() && t.is_contiguous(), "tq_host_check: ", where(), " binds output ", b.index,
                      ", which is undefined or not contiguous");
          break;
        }
        case Arg::Scratch:
          TORCH_CHECK(b.index >= 0 && static_cast<size_t>(b.index) < plan.scratch_bytes.size(), "tq_host_check: ",
                      where(), " binds scratch ", b.index, " of ", plan.scratch_bytes.size());
          TORCH_CHECK(plan.scratch_bytes[b.index] % 4 == 0, "tq_host_check: scratch ", b.index, " of ",
                      plan.scratch_bytes[b.index], " bytes is not a whole number of float32");
          break;
        case Arg::Params:
          TORCH_CHECK(!launch.params.empty(), "tq_host_check: ", where(), " binds empty params");
          break;
        case Arg::Codebook:
          TORCH_CHECK(b.index == 0 || b.index == 1, "tq_host_check: ", where(), " binds codebook ", b.index, " of 2");
          TORCH_CHECK((b.index == 0 ? plan.codebook_bits : plan.second_codebook_bits) > 0, "tq_host_check: ", where(),
                      " binds the codebook of a plan without one");
          break;
        case Arg::CanonicalSigns:
          TORCH_CHECK(plan.canonical_signs_dim > 0, "tq_host_check: ", where(),
                      " binds the canonical signs of a plan without them");
          break;
        case Arg::Dummy:
          break;
        default:
          TORCH_CHECK(false, "tq_host_check: ", where(), " has the unknown binding kind ", static_cast<int>(b.kind));
      }
    }
  }
  std::lock_guard<std::mutex> lock(g_launched_mutex);
  for (const tq_plan::Launch& launch : plan.launches) g_launched.push_back(launch.kernel);
  g_bound.clear();
  for (const at::Tensor& t : inputs) {
    g_bound.push_back(t.defined() ? dtype_name(t.scalar_type()) + " " + tq_plan::shape_str(t.sizes().vec()) + " " +
                                        std::to_string(reinterpret_cast<uintptr_t>(t.data_ptr()))
                                  : "undefined");
  }
}

// Metal kernel families are compiled on a Mac only (torch_tq.backends.mps.warmup()).
std::map<std::string, std::string> compile_metal_families() { return {}; }

std::vector<std::string> launched() {
  std::lock_guard<std::mutex> lock(g_launched_mutex);
  std::vector<std::string> out;
  out.swap(g_launched);
  return out;
}

std::vector<std::string> bound_inputs() {
  std::lock_guard<std::mutex> lock(g_launched_mutex);
  std::vector<std::string> out;
  out.swap(g_bound);
  return out;
}

// Self-test of the checks above: encodes one launch "probe" binding (kind, index) against two
// inputs (0 defined, 1 undefined), one output and one 16-byte scratch buffer, no codebook.
void encode_probe(int64_t kind, int64_t index) {
  tq_plan::Plan plan;
  tq_plan::Launch launch;
  launch.kernel = "probe";
  launch.params = {0, 0, 0, 0};
  launch.bindings.push_back({static_cast<Arg>(kind), static_cast<int32_t>(index)});
  plan.launches.push_back(launch);
  plan.scratch_bytes = {16};
  encode(plan, {at::zeros({4}), at::Tensor()}, {at::zeros({4})});
}

}  // namespace

TORCH_LIBRARY(tq_host_check, m) {
  m.def("launched() -> str[]", &launched);
  m.def("bound_inputs() -> str[]", &bound_inputs);
  m.def("encode_probe(int kind, int index) -> ()", &encode_probe);
}

namespace {
// ---- end of host-code check ----
"""


def _cut(text: str, begin: str, end: str, replacement: str) -> str:
    start = text.index(begin)
    stop = text.index(end, start) + len(end)
    return text[:start] + replacement + text[stop:]


def source() -> str:
    """The .mm without its Metal sections, with the checking ``encode`` in place of the encoder."""
    text = MM.read_text()
    for begin, end in SECTIONS:
        if text.count(begin) != 1 or text.count(end) != 1:
            raise AssertionError(f"{MM.name}: expected exactly one line starting {begin!r} and one {end!r}")
    text = _cut(text, *SECTIONS[0], "// (Metal headers dropped by tests/mps_sim/_host_code.py)")
    text = _cut(text, *SECTIONS[1], STUB)
    for objc in ("#import", "@autoreleasepool", "id<MTL", "NSString", "dispatch_sync"):
        if objc in text:
            raise AssertionError(f"{MM.name}: {objc!r} outside the Metal sections")
    return text


def compiler() -> str | None:
    for cxx in (os.environ.get("CXX"), "c++", "g++", "clang++", "clang++-19"):
        if cxx and shutil.which(cxx):
            return shutil.which(cxx)
    return None


def unavailable() -> str | None:
    """Why the host code cannot be built here (no C++ compiler or no torch headers), else None."""
    if compiler() is None:
        return "no C++ compiler (c++, g++, clang++, clang++-19 or $CXX) to build the host code of mps_ops/torch_tq_mps.mm"
    from torch.utils.cpp_extension import include_paths

    if not any((Path(p) / "torch" / "extension.h").exists() for p in include_paths()):
        return "the installed torch has no C++ headers (torch/extension.h) to build mps_ops/torch_tq_mps.mm against"
    return None


def _command(cpp: Path, out: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    cmd = [compiler(), "-std=c++17", "-fPIC", "-shared", "-O0", "-w",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           f"-DTORCH_EXTENSION_NAME={MODULE}", "-DTORCH_API_INCLUDE_EXTENSION_H",
           f"-I{MPS_OPS}", f"-I{sysconfig.get_paths()['include']}"]
    cmd += [f"-I{p}" for p in include_paths()]
    cmd += [str(cpp), "-o", str(out)]
    for p in library_paths():
        cmd += [f"-L{p}", f"-Wl,-rpath,{p}"]
    cmd += ["-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
    return cmd


def build() -> Path:
    """Compile (once per content hash) and return the shared library's path."""
    text = source()
    headers = sorted((MPS_OPS / "plans").glob("*.h")) + sorted((MPS_OPS / "kernels").glob("*.h"))
    key = hashlib.sha256()
    key.update(text.encode())
    for h in headers:
        key.update(h.name.encode() + h.read_bytes())
    key.update(" ".join(_command(Path("x.cpp"), Path("x.so"))).encode())
    key.update(torch.__version__.encode())
    digest = key.hexdigest()[:16]
    cache = Path(os.environ.get("TQ_SIM_CACHE", Path(tempfile.gettempdir()) / "torch_tq_sim_cache"))
    cache.mkdir(parents=True, exist_ok=True)
    lib = cache / f"{MODULE}_{digest}.so"
    if not lib.exists():
        cpp = cache / f"{MODULE}_{digest}.cpp"
        cpp.write_text(text)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run(_command(cpp, tmp), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {cpp} (from {MM}) failed:\n{done.stderr[:20000]}")
        os.replace(tmp, lib)
    return lib


_PROBE = """
import sys, torch, torch_tq
torch.ops.load_library(sys.argv[1])
"""


def _schemas_digest() -> str:
    from torch_tq import _gated_delta_ops, _ops

    return hashlib.sha256(repr((_ops.SCHEMAS, _gated_delta_ops.SCHEMAS)).encode()).hexdigest()[:16]


def probe_load(lib: Path) -> None:
    """Load ``lib`` in a child process first: a registration whose C++ signature does not match the
    Python schema throws from a static initializer, which aborts the process (it cannot be caught),
    so this process only loads a library known to load. A marker file caches the success for this
    library and these schemas."""
    marker = lib.with_name(f"{lib.stem}.loads-with-{_schemas_digest()}")
    if marker.exists():
        return
    done = subprocess.run([sys.executable, "-c", _PROBE, str(lib)], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        err = done.stderr
        start = err.find("what():")  # an uncaught c10::Error: keep its message, not its C++ frames
        if start >= 0:
            err = err[start:].split("Exception raised from", 1)[0]
        raise RuntimeError(f"torch.ops.load_library({lib.name}) fails (the MPS registrations of {MM.name} against "
                           f"the schemas of torch_tq):\n{err[-6000:]}")
    marker.touch()


@functools.lru_cache(maxsize=None)
def library() -> Path:
    """Build and load once per process: registers the MPS kernels of torch.ops.tq and tq_host_check."""
    import torch_tq  # noqa: F401  (defines the tq schemas the MPS registrations are checked against)

    lib = build()
    probe_load(lib)
    torch.ops.load_library(str(lib))
    return lib


def launched() -> list[str]:
    """Kernel names encoded since the last call (and clears them)."""
    return list(torch.ops.tq_host_check.launched())


def bound_inputs() -> list[tuple[str, list[int], int] | None]:
    """The input tensors of the last encode() (Arg::Input order) as (dtype, sizes, data_ptr), None for an
    undefined one; [] when nothing was encoded since the last call (and clears them)."""
    out = []
    for s in torch.ops.tq_host_check.bound_inputs():
        if s == "undefined":
            out.append(None)
        else:
            dtype, rest = s.split(" ", 1)
            sizes, ptr = rest.rsplit(" ", 1)
            out.append((dtype, [int(x) for x in sizes.strip("[]").split(",") if x.strip()], int(ptr)))
    return out


MPS = torch._C.DispatchKeySet(torch._C.DispatchKey.MPS)


def call_mps(op: str, **kwargs):
    """``torch.ops.tq.<op>``'s MPS kernel on (CPU) tensors, bypassing the dispatch on their device."""
    return getattr(torch.ops.tq, op).default.redispatch(MPS, **kwargs)
