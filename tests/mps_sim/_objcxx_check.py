"""Compile the whole ``mps_ops/torch_tq_mps.mm``, Objective-C sections included, as Objective-C++ for
an Apple-silicon Mac (``-fsyntax-only``: parsing, name lookup, types, selectors; no code generated).

``_host_code.py`` compiles and runs the .mm without its two Metal sections; this checks the rest:
every message sent (selector and argument types), every Metal/Foundation type, the blocks and
``@autoreleasepool``s, the availability guards, the generated Metal-source header, against

* the installed torch's headers (its ``ATen/mps/*.h`` are in the Linux wheel too), with
  ``__OBJC__`` defined, so their Objective-C parts are checked as well;
* the Darwin libc, ``objc/`` and ``dispatch/`` headers and libc++ that the ``ziglang`` wheel ships;
* ``apple_sdk_stubs/``: the declarations of Foundation, Metal, MetalPerformanceShaders(Graph)
  that are used, written from Apple's documentation (README.md there).

The compiler is zig's raw clang (``python -m ziglang clang``, target ``arm64-apple-macos13``),
not ``zig c++``: that would first build libc++ for macOS (minutes) and does not support
``-fsyntax-only``. Warnings are errors (``-Wall -Werror``), so a misspelled selector (only a
warning in Objective-C) fails. Not checked: linking, code generation, anything at run time, and
that the stubs match the real SDK beyond what the documentation states.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MPS_OPS = ROOT / "mps_ops"
MM = MPS_OPS / "torch_tq_mps.mm"
STUBS = Path(__file__).resolve().parent / "apple_sdk_stubs"
TARGET = "arm64-apple-macos13"

sys.path.insert(0, str(MPS_OPS))
import build_config  # noqa: E402  (writes the generated Metal-source header the .mm includes)


def zig_dir() -> Path | None:
    spec = importlib.util.find_spec("ziglang")
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def unavailable() -> str | None:
    if zig_dir() is None:
        return "the ziglang wheel (pip install ziglang) provides the clang and the Darwin headers of this check"
    from torch.utils.cpp_extension import include_paths

    if not any((Path(p) / "ATen" / "mps" / "MPSStream.h").exists() for p in include_paths()):
        return "the installed torch has no ATen/mps headers"
    return None


@functools.lru_cache(maxsize=None)
def libcxx_configuration() -> tuple[str, ...]:
    """The libc++ configuration macros ``zig c++`` passes (zig's libc++ has no __config_site)."""
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.cpp"
        empty.write_text("")
        out = subprocess.run([sys.executable, "-m", "ziglang", "c++", "-###", "-c", str(empty)],
                             capture_output=True, text=True)
    macros = re.findall(r'"-D" "(_LIBCPP\w*(?:=[^"]*)?|_LIBCXXABI\w*(?:=[^"]*)?)"', out.stderr)
    if not macros:
        raise RuntimeError(f"no libc++ configuration in the output of `zig c++ -###`:\n{out.stderr[-3000:]}")
    return tuple(f"-D{m}" for m in macros)


def command(mm: Path, generated_dir: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    zig = zig_dir()
    cmd = [sys.executable, "-m", "ziglang", "clang", "-target", TARGET, "-x", "objective-c++", "-std=c++17",
           "-fsyntax-only", "-ferror-limit=0", "-fno-color-diagnostics", "-Wall", "-Werror", "-nostdinc"]
    for d in (zig / "lib" / "libcxx" / "include", zig / "lib" / "libcxxabi" / "include", zig / "lib" / "include",
              zig / "lib" / "libc" / "include" / "any-darwin-any", STUBS, *map(Path, include_paths()),
              Path(sysconfig.get_paths()["include"])):
        cmd += ["-isystem", str(d)]
    cmd += [*libcxx_configuration(), "-I", str(MPS_OPS), "-I", str(generated_dir),
            "-DTORCH_EXTENSION_NAME=torch_tq_objcxx_check", "-DTORCH_API_INCLUDE_EXTENSION_H", str(mm)]
    return cmd


def errors(mm: Path = MM) -> list[str]:
    """``file:line:col: error: ...`` lines of the check of ``mm`` (empty when it compiles)."""
    with tempfile.TemporaryDirectory() as tmp:
        generated = Path(tmp)
        build_config.write_source_header(generated)
        done = subprocess.run(command(mm, generated), capture_output=True, text=True)
    found = [line for line in done.stderr.splitlines() if re.search(r":\d+:\d+: (fatal )?error: ", line)]
    if done.returncode != 0 and not found:
        found = [done.stderr.strip()[-3000:] or f"exit status {done.returncode}"]
    return found
