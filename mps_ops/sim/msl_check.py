"""Strict MSL check: what passes here should also compile with Apple's Metal compiler.

The simulator (msl_sim.py) compiles kernels as lenient C++: `device`, `thread` and `constant` are
plain pointers there, and C++ that MSL forbids compiles and runs. This check compiles the same
sources once more, to LLVM IR only, against the shim in strict mode (``-DTQSIM_STRICT``, see
``include/metal_stdlib``) and applies the rules in ``RULES``, each with the cheapest robust
mechanism:

* clang diagnostics: distinct address spaces for device / constant / threadgroup (conversions
  between them and writes through `constant` are errors), poisoned identifiers (``double``,
  ``goto``, ``virtual``, ``new``, ``std`` ...), ``-Werror=vla``, ``-Wdouble-promotion`` (to double),
  threadgroup variables without initialisers (``loader_uninitialized``), simdgroup_matrix
  functions declared for one element type;
* the IR and its debug info (``-O0 -g``): call graph (recursion, indirect calls, calls into the C/C++
  library), threadgroup variables (only in a kernel's own scope, summed per kernel), mutable
  program-scope variables;
* the preprocessed kernel signatures: address space of pointer/reference parameters, builtin
  parameter types, ``[[buffer(n)]]`` indices, standard headers included by kernel files.

Usage: ``python mps_ops/sim/msl_check.py [-I DIR]... [--threadgroup-memory PLAN.json] FILE.metal...``
prints ``file:line: [rule] message`` for every violation and exits 1, or exits 0.
``--threadgroup-memory`` names a JSON object {host name: bytes the launch plan declares}; every
kernel listed there must use exactly that much static threadgroup memory. ``--json`` prints the
report (violations and per-kernel threadgroup bytes) as JSON.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))
import msl_sim  # noqa: E402

MAX_THREADGROUP_MEMORY = 32 * 1024  # bytes of static threadgroup memory per kernel (Apple GPUs)
MAX_BUFFER_INDEX = 30

RULES = {
    "address-space": "pointers and references keep their address space (device, constant, threadgroup, "
                     "thread); constant memory is read-only",
    "double": "no double (MSL has no double type; float arithmetic promoted to double included)",
    "goto": "no goto",
    "virtual": "no virtual functions",
    "exceptions": "no exceptions (throw, try, catch)",
    "new-delete": "no new or delete",
    "rtti": "no typeid or dynamic_cast",
    "std-library": "no C++ standard library: no std::, no standard headers included by kernel code, no calls "
                   "into the C/C++ library",
    "vla": "no variable-length arrays",
    "recursion": "no recursion (direct or through other functions)",
    "indirect-call": "no calls through function pointers or virtual tables",
    "threadgroup-scope": "threadgroup variables only in a kernel function's own scope",
    "threadgroup-initializer": "threadgroup variables without initialisers",
    "threadgroup-memory": f"static threadgroup memory of a kernel <= {MAX_THREADGROUP_MEMORY} bytes and equal to "
                          "what its launch plan declares",
    "program-scope-variable": "variables at program scope (or static locals) only in the constant address space",
    "kernel-parameter-space": "every pointer or reference kernel parameter in device or constant",
    "kernel-parameter-attribute": "every kernel parameter carries [[buffer(n)]] or a supported builtin attribute",
    "builtin-type": "builtin kernel parameters have the types MSL allows (uint/ushort, their 2/3-vectors for "
                    "positions and sizes, consistent across parameters)",
    "buffer-index": f"[[buffer(n)]] indices unique per kernel and <= {MAX_BUFFER_INDEX}",
    "simdgroup-matrix-type": "simdgroup_load/store/multiply(_accumulate) on one element type (the matrix's)",
    "simulator-convention": "conventions the simulator relies on (mps_ops/sim/README.md)",
    "compile-error": "any other error of the strict compile",
}

_POISONED = {
    "double": "double", "goto": "goto", "virtual": "virtual", "throw": "exceptions", "try": "exceptions",
    "catch": "exceptions", "new": "new-delete", "delete": "new-delete", "typeid": "rtti",
    "dynamic_cast": "rtti", "std": "std-library",
}

# Builtin kernel-parameter attributes and the types MSL allows for them.
_POSITION_BUILTINS = {
    "thread_position_in_grid", "threadgroup_position_in_grid", "thread_position_in_threadgroup",
    "threads_per_threadgroup", "dispatch_threads_per_threadgroup", "threadgroups_per_grid", "threads_per_grid",
}
_SCALAR_BUILTINS = {
    "thread_index_in_threadgroup", "thread_index_in_simdgroup", "simdgroup_index_in_threadgroup",
    "threads_per_simdgroup", "thread_execution_width", "simdgroups_per_threadgroup",
}
_POSITION_TYPES = {"uint", "uint2", "uint3", "ushort", "ushort2", "ushort3"}
_SCALAR_TYPES = {"uint", "ushort"}
# Pairs MSL requires to be declared with the same type.
_SAME_TYPE_BUILTINS = (("thread_position_in_grid", "threads_per_grid"),
                       ("threadgroup_position_in_grid", "threadgroups_per_grid"))


class CheckError(RuntimeError):
    """The check itself could not run (no compiler, unreadable input)."""


@dataclass(frozen=True, order=True)
class Violation:
    file: str
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: [{self.rule}] {self.message}"


@dataclass
class Kernel:
    host_name: str
    function: str
    file: str
    line: int
    threadgroup_bytes: int = 0
    threadgroup_variables: Dict[str, int] = field(default_factory=dict)


@dataclass
class Report:
    violations: List[Violation]
    kernels: Dict[str, Kernel]

    @property
    def ok(self) -> bool:
        return not self.violations

    def rules(self) -> Set[str]:
        return {v.rule for v in self.violations}


# ---- the preprocessed kernel text, with locations -------------------------------------------------
class LocatedText:
    """The preprocessed text of the user's files (not the shim, not system headers), joined, with
    the source file and line of every offset."""

    _MARKER = re.compile(r'^#\s*(?:line\s+)?(\d+)\s+"([^"]*)"((?:\s+\d)*)')

    def __init__(self, preprocessed: str, is_user_file, is_shim_file):
        self.segments: List[Tuple[str, str]] = []
        self.included_headers: List[Tuple[str, int, str]] = []  # (including user file, line, header)
        self._starts: List[int] = []
        self._where: List[Tuple[str, int]] = []
        parts: List[str] = []
        offset = 0
        cur_file, cur_line, seg = "", 1, []
        for raw in preprocessed.splitlines():
            m = self._MARKER.match(raw)
            if m:
                if seg:
                    self.segments.append((cur_file, "\n".join(seg)))
                    seg = []
                line, name, flags = int(m.group(1)), m.group(2), m.group(3).split()
                if "1" in flags and is_user_file(cur_file) and not (is_user_file(name) or is_shim_file(name)):
                    self.included_headers.append((cur_file, cur_line, name))
                cur_file, cur_line = name, line
                continue
            if raw.startswith("#"):  # #pragma and the like
                cur_line += 1
                continue
            if is_user_file(cur_file):
                self._starts.append(offset)
                self._where.append((cur_file, cur_line))
                parts.append(raw)
                seg.append(raw)
                offset += len(raw) + 1
            cur_line += 1
        if seg:
            self.segments.append((cur_file, "\n".join(seg)))
        self.text = "\n".join(parts)

    def where(self, offset: int) -> Tuple[str, int]:
        i = bisect.bisect_right(self._starts, offset) - 1
        return self._where[max(i, 0)] if self._where else ("?", 0)


# ---- kernel signatures ----------------------------------------------------------------------------
def _builtin_type(param: str) -> str:
    """`const uint3 tid [[...]]` -> `uint3` (spellings normalised), or the written type."""
    decl = msl_sim._PARAM_ATTRIBUTE.sub("", param).strip()
    decl = re.sub(r"\b(const|thread)\b", " ", decl)
    decl = re.sub(r"\bunsigned\s+int\b", "uint", decl)
    decl = re.sub(r"\bunsigned\s+short\b", "ushort", decl)
    decl = re.sub(r"\b(?:metal::)?vec\s*<\s*(\w+)\s*,\s*([234])\s*>", r"\1\2", decl)
    words = decl.split()
    return " ".join(words[:-1]) if len(words) > 1 else decl


def _components(type_name: str) -> int:
    return int(type_name[-1]) if type_name[-1:].isdigit() else 1


def signature_violations(located: LocatedText) -> List[Violation]:
    out: List[Violation] = []
    for decl in msl_sim.kernel_declarations(located.text):
        kfile, kline = located.where(decl.start)
        buffers: Dict[int, int] = {}
        builtin_types: Dict[str, Tuple[str, str, int]] = {}
        for param, offset in decl.params:
            pfile, pline = located.where(offset)
            short = " ".join(param.split())
            attrs = msl_sim._PARAM_ATTRIBUTE.findall(param)
            if not attrs:
                out.append(Violation(pfile, pline, "kernel-parameter-attribute",
                                     f"kernel {decl.name}: parameter `{short}` has no [[buffer(n)]] or builtin attribute"))
                continue
            kind, arg = attrs[-1]
            if kind == "buffer":
                index = int(arg, 0)
                if index > MAX_BUFFER_INDEX:
                    out.append(Violation(pfile, pline, "buffer-index",
                                         f"kernel {decl.name}: [[buffer({index})]] is above the limit of {MAX_BUFFER_INDEX}"))
                if index in buffers:
                    out.append(Violation(pfile, pline, "buffer-index",
                                         f"kernel {decl.name}: [[buffer({index})]] is bound twice"))
                buffers[index] = pline
                head = msl_sim._PARAM_ATTRIBUTE.sub("", param)
                if not ("*" in head or "&" in head) or not re.match(r"\s*(?:const\s+)?(?:device|constant)\b", head):
                    out.append(Violation(pfile, pline, "kernel-parameter-space",
                                         f"kernel {decl.name}: `{short}` must be a pointer or reference declared "
                                         "`device` or `constant`"))
            elif kind in _POSITION_BUILTINS or kind in _SCALAR_BUILTINS:
                type_name = _builtin_type(param)
                allowed = _POSITION_TYPES if kind in _POSITION_BUILTINS else _SCALAR_TYPES
                if type_name not in allowed:
                    out.append(Violation(pfile, pline, "builtin-type",
                                         f"kernel {decl.name}: [[{kind}]] is declared `{type_name}`; MSL allows "
                                         + ", ".join(sorted(allowed))))
                builtin_types[kind] = (type_name, pfile, pline)
            else:
                out.append(Violation(pfile, pline, "kernel-parameter-attribute",
                                     f"kernel {decl.name}: [[{kind}]] is not a supported kernel parameter attribute"))
        out += _builtin_consistency(decl.name, builtin_types, kfile, kline)
    return out


def _builtin_consistency(kernel: str, types: Dict[str, Tuple[str, str, int]], kfile: str, kline: int) -> List[Violation]:
    out = []
    vectors = {k: t for k, (t, _f, _l) in types.items() if k in _POSITION_BUILTINS and _components(t) > 1}
    if len({_components(t) for t in vectors.values()}) > 1:
        listed = ", ".join(f"[[{k}]] {t}" for k, t in sorted(vectors.items()))
        out.append(Violation(kfile, kline, "builtin-type",
                             f"kernel {kernel}: vector builtins must have the same number of components ({listed})"))
    for a, b in _SAME_TYPE_BUILTINS:
        if a in types and b in types and types[a][0] != types[b][0]:
            out.append(Violation(kfile, kline, "builtin-type",
                                 f"kernel {kernel}: [[{a}]] ({types[a][0]}) and [[{b}]] ({types[b][0]}) must have "
                                 "the same type"))
    position = types.get("thread_position_in_threadgroup")
    index = types.get("thread_index_in_threadgroup")
    if position and index and position[0].startswith("uint") and index[0] != "uint":
        out.append(Violation(kfile, kline, "builtin-type",
                             f"kernel {kernel}: [[thread_position_in_threadgroup]] is {position[0]}, so "
                             f"[[thread_index_in_threadgroup]] must be uint, not {index[0]}"))
    return out


# ---- clang diagnostics of the strict compile ------------------------------------------------------
_DIAGNOSTIC = re.compile(r"^(.*?):(\d+):(\d+): (fatal error|error|warning|note): (.*)$")


def _token_at(path: str, line: int, col: int) -> str:
    try:
        text = Path(path).read_text().splitlines()[line - 1]
    except (OSError, IndexError):
        return ""
    m = re.match(r"\w+", text[col - 1:])
    return m.group(0) if m else ""


def _classify(message: str, notes: str, token: str) -> str:
    both = message + "\n" + notes
    if "poisoned identifier" in message:
        return _POISONED.get(token, "compile-error")
    if "variable length array" in message or "-Wvla" in message:
        return "vla"
    if "loader_uninitialized" in message:
        return "threadgroup-initializer"
    if "-Wdouble-promotion" in message:
        return "double"
    if "exceptions disabled" in message:
        return "exceptions"
    if "-frtti" in message or "typeid" in message:
        return "rtti"
    if re.search(r"\bsimdgroup_(?:load|store|multiply)", message):
        return "simdgroup-matrix-type"
    if ("address space" in both or "address_space" in both or "read-only variable" in message
            or re.search(r"'(?:const )?(?:device|constant|threadgroup)\b", both)):
        return "address-space"
    return "compile-error"


def diagnostic_violations(stderr: str, is_user_file, skip_outside_user_files: bool = False) -> List[Violation]:
    """One violation per clang error, placed at its first location in the user's files. Errors
    wholly inside other files are dropped with ``skip_outside_user_files`` (they come from a
    standard header the kernel included, which is reported on its own)."""
    errors: List[Tuple[List[Tuple[str, int, int, str]], str]] = []  # (locations, message)
    current = None
    for line in stderr.splitlines():
        m = _DIAGNOSTIC.match(line)
        if not m:
            continue
        path, ln, col, kind, msg = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4), m.group(5)
        # -Wdouble-promotion also warns of half -> float, which MSL allows: only `to 'double'` counts.
        if kind in ("error", "fatal error") or (kind == "warning" and "-Wdouble-promotion" in msg and "'double'" in msg):
            current = ([(path, ln, col, msg)], msg)
            errors.append(current)
        elif kind == "note" and current is not None:
            current[0].append((path, ln, col, msg))
        else:
            current = None  # notes of a diagnostic that does not count
    out = []
    poisoned_lines = set()
    for locations, message in errors:
        user = [loc for loc in locations if is_user_file(loc[0])]
        if not user and skip_outside_user_files:
            continue
        path, ln, col, _ = user[0] if user else locations[0]
        notes = [loc[3] for loc in locations[1:]]
        token = _token_at(path, ln, col)
        rule = _classify(message, "\n".join(notes), token)
        text = re.sub(r"\s*\[-W[\w,-]+\]$", "", message)
        if "poisoned" in message:
            poisoned_lines.add((path, ln))
            text = f"`{token}` is not available in MSL"
        elif rule in ("address-space", "simdgroup-matrix-type"):
            why = next((n for n in notes if n.startswith("candidate")), "")
            text += f" ({why})" if why else ""
        out.append(Violation(path, ln, rule, _readable_spaces(text)))
    # Clang's recovery after a poisoned identifier reports follow-on errors on the same line.
    return [v for v in out if "not available in MSL" in v.message or (v.file, v.line) not in poisoned_lines]


def _readable_spaces(text: str) -> str:
    names = {"1": "device", "2": "constant", "3": "threadgroup"}
    text = re.sub(r"__attribute__\(\(address_space\((\d)\)\)\)", lambda m: names.get(m.group(1), m.group(0)), text)
    return re.sub(r"address space '(\d)'", lambda m: f"address space '{names.get(m.group(1), m.group(1))}'", text)


# ---- the IR ---------------------------------------------------------------------------------------
_FIELD = re.compile(r'(\w+): ("(?:[^"\\]|\\.)*"|![0-9]+|[\w.+-]+)')
_DEFINE = re.compile(r'^define [^@]*@("[^"]+"|[\w.$]+)\(.*?(?:!dbg (![0-9]+))? \{$')
_CALL = re.compile(r'\bcall\b[^@%]*?(@"[^"]+"|@[\w.$]+|%[\w.]+)\(')
_DBG = re.compile(r"!dbg (![0-9]+)")
_GLOBAL = re.compile(r'^@("[^"]+"|[\w.$]+) = ([^@]*?)\b(global|constant)\b(.*)$')
_STRING = re.compile(r'^@(\.str[\w.]*) = .*?constant \[\d+ x i8\] c"((?:[^"\\]|\\[0-9A-Fa-f]{2})*)"')
_CHECKED_KERNEL = re.compile(r'%"struct.tqsim::checked_kernel" \{ ptr @(\.str[\w.]*), ptr @("[^"]+"|[\w.$]+) \}')


@dataclass
class _Function:
    name: str
    dbg: str
    calls: List[Tuple[Optional[str], str]]  # (callee or None for an indirect call, !dbg of the call)


class _Ir:
    def __init__(self, text: str):
        self.metadata: Dict[str, str] = {}
        self.functions: Dict[str, _Function] = {}
        self.globals: List[Tuple[str, str, str, str]] = []  # (name, linkage/attributes, global|constant, rest)
        self.strings: Dict[str, str] = {}
        current: Optional[_Function] = None
        for line in text.splitlines():
            if current is not None:
                if line == "}":
                    current = None
                    continue
                if " call " in line or line.lstrip().startswith("call "):
                    m = _CALL.search(line)
                    if m:
                        callee = m.group(1)
                        dbg = _DBG.search(line)
                        current.calls.append((callee[1:].strip('"') if callee[0] == "@" else None,
                                              dbg.group(1) if dbg else ""))
                continue
            if line.startswith("!"):
                key, _, rest = line.partition(" = ")
                self.metadata[key] = rest
            elif line.startswith("define "):
                m = _DEFINE.match(line)
                if m:
                    current = _Function(m.group(1).strip('"'), m.group(2) or "", [])
                    self.functions[current.name] = current
            elif line.startswith("@"):
                s = _STRING.match(line)
                if s:
                    self.strings[s.group(1)] = re.sub(r"\\([0-9A-Fa-f]{2})", lambda x: chr(int(x.group(1), 16)),
                                                      s.group(2)).rstrip("\0")
                g = _GLOBAL.match(line)
                if g:
                    self.globals.append((g.group(1).strip('"'), g.group(2), g.group(3), g.group(4)))

    def fields(self, ref: str) -> Dict[str, str]:
        return dict(_FIELD.findall(self.metadata.get(ref, "")))

    def kind(self, ref: str) -> str:
        m = re.match(r"(?:distinct )?!(\w+)\(", self.metadata.get(ref, ""))
        return m.group(1) if m else ""

    def file_of(self, ref: str) -> str:
        f = self.fields(ref)
        name, directory = f.get("filename", '""')[1:-1], f.get("directory", '""')[1:-1]
        return os.path.normpath(os.path.join(directory, name)) if name else "?"

    def where(self, ref: str) -> Tuple[str, int]:
        """File and line of a DILocation, DISubprogram or DIGlobalVariable."""
        f = self.fields(ref)
        line = int(f.get("line", "0"))
        scope = ref
        while scope:
            sf = self.fields(scope)
            if "file" in sf:
                return self.file_of(sf["file"]), line
            scope = sf.get("scope", "")
        return "?", line

    def subprogram_of(self, ref: str) -> str:
        """The DISubprogram enclosing a scope (DILexicalBlock ...), or ""."""
        while ref:
            if self.kind(ref) == "DISubprogram":
                return ref
            ref = self.fields(ref).get("scope", "")
        return ""

    def display_name(self, function: str) -> str:
        fn = self.functions.get(function)
        name = self.fields(fn.dbg).get("name", "") if fn and fn.dbg else ""
        return name[1:-1] if name else function

    def size_bytes(self, type_ref: str) -> int:
        while type_ref:
            f = self.fields(type_ref)
            if "size" in f:
                return int(f["size"]) // 8
            type_ref = f.get("baseType", "")
        return 0


def _reachable(ir: _Ir, roots: Iterable[str]) -> Set[str]:
    seen: Set[str] = set()
    stack = [r for r in roots if r in ir.functions]
    while stack:
        f = stack.pop()
        if f in seen:
            continue
        seen.add(f)
        stack += [c for c, _ in ir.functions[f].calls if c in ir.functions and c not in seen]
    return seen


def _cycles(ir: _Ir, nodes: Set[str]) -> List[List[str]]:
    """Strongly connected components with a cycle (Tarjan), among `nodes`."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    out: List[List[str]] = []
    counter = [0]

    def successors(f: str) -> List[str]:
        return [c for c, _ in ir.functions[f].calls if c in nodes]

    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(successors(root)))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            f, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(successors(nxt))))
                elif nxt in on_stack:
                    low[f] = min(low[f], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[f])
            if low[f] == index[f]:
                component = []
                while True:
                    g = stack.pop()
                    on_stack.discard(g)
                    component.append(g)
                    if g == f:
                        break
                if len(component) > 1 or f in successors(f):
                    out.append(component)
    return out


def msl_library_names() -> Set[str]:
    """Functions the shim defines in namespace metal (an unqualified call such as `exp(x)` may bind
    to the host C library's overload here; Apple's compiler binds it to metal::exp)."""
    shim = (msl_sim.SHIM_INCLUDE / "metal_stdlib").read_text()
    names = set(re.findall(r"TQSIM_(?:MATH[12]|PRED)\((\w+),", shim))
    names |= set(re.findall(r"^template <[^\n]*>\s*inline [^\n(=]*?\b(\w+)\(", shim, re.M))
    return names


def ir_violations(ir: _Ir, kernels: Dict[str, Kernel], kernel_functions: Dict[str, str], is_user_file,
                  is_shim_file) -> List[Violation]:
    out: List[Violation] = []
    msl_names = msl_library_names()
    reachable = _reachable(ir, kernel_functions.values())

    def function_file(f: str) -> str:
        fn = ir.functions.get(f)
        return ir.where(fn.dbg)[0] if fn and fn.dbg else "?"

    for component in _cycles(ir, reachable):
        names = sorted(ir.display_name(f) for f in component)
        first = min(component, key=lambda f: ir.where(ir.functions[f].dbg))
        file, line = ir.where(ir.functions[first].dbg)
        out.append(Violation(file, line, "recursion", "recursive call cycle: " + " -> ".join(names + names[:1])))

    for f in sorted(reachable):
        fn = ir.functions[f]
        caller_is_user = is_user_file(function_file(f))
        for callee, dbg in fn.calls:
            if callee is None:
                file, line = ir.where(dbg) if dbg else ir.where(fn.dbg)
                out.append(Violation(file, line, "indirect-call",
                                     f"{ir.display_name(f)} calls through a function pointer"))
            elif caller_is_user and not callee.startswith(("llvm.", "tqsim_")):
                callee_file = function_file(callee) if callee in ir.functions else None
                outside = callee_file is None or not (is_user_file(callee_file) or is_shim_file(callee_file))
                if outside and ir.display_name(callee) not in msl_names:
                    file, line = ir.where(dbg) if dbg else ir.where(fn.dbg)
                    out.append(Violation(file, line, "std-library",
                                         f"{ir.display_name(f)} calls {ir.display_name(callee)}, which is not MSL"))

    subprogram_to_kernel = {ir.functions[fn].dbg: host for host, fn in kernel_functions.items()
                            if fn in ir.functions and ir.functions[fn].dbg}
    for name, attributes, kind, rest in ir.globals:
        dbg = _DBG.search(rest)
        var = ir.fields(dbg.group(1)).get("var", "") if dbg else ""
        vf = ir.fields(var)
        file, line = ir.where(var) if var else ("?", 0)
        var_name = vf.get("name", '"?"')[1:-1]
        if "addrspace(3)" in attributes:
            subprogram = ir.subprogram_of(vf.get("scope", ""))
            host = subprogram_to_kernel.get(subprogram)
            if host is None:
                where = f"function {ir.fields(subprogram).get('name', '?')[1:-1]}" if subprogram else "program scope"
                out.append(Violation(file, line, "threadgroup-scope",
                                     f"threadgroup variable `{var_name}` is declared in {where}, not in a kernel"))
                continue
            for h, fn in kernel_functions.items():  # every host name of that function
                if ir.functions.get(fn) and ir.functions[fn].dbg == subprogram:
                    size = ir.size_bytes(vf.get("type", ""))
                    kernels[h].threadgroup_variables[var_name] = size
                    kernels[h].threadgroup_bytes += size
        elif kind == "global" and "addrspace(" not in attributes and var and is_user_file(file):
            out.append(Violation(file, line, "program-scope-variable",
                                 f"`{var_name}` is a mutable variable at program scope (or a static local); "
                                 "MSL allows only `constant` ones"))
    return out


def threadgroup_memory_violations(kernels: Dict[str, Kernel], declared: Optional[Mapping[str, int]]) -> List[Violation]:
    out = []
    for host, k in sorted(kernels.items()):
        if k.threadgroup_bytes > MAX_THREADGROUP_MEMORY:
            out.append(Violation(k.file, k.line, "threadgroup-memory",
                                 f"kernel {host} uses {k.threadgroup_bytes} bytes of threadgroup memory, more than "
                                 f"{MAX_THREADGROUP_MEMORY}"))
        if declared is not None and host in declared and declared[host] != k.threadgroup_bytes:
            detail = ", ".join(f"{n} {b}" for n, b in sorted(k.threadgroup_variables.items())) or "none"
            out.append(Violation(k.file, k.line, "threadgroup-memory",
                                 f"kernel {host} uses {k.threadgroup_bytes} bytes of threadgroup memory ({detail}); "
                                 f"its launch plan declares {declared[host]}"))
    return out


def _convention_violation(message: str) -> Violation:
    """msl_sim's convention messages name the file and quote the code; find its line."""
    file, _, text = message.partition(": ")
    line = 0
    quoted = re.search(r"`([^`]+)`", text)
    if quoted:
        needle = " ".join(quoted.group(1).split())[:24]
        try:
            lines = Path(file).read_text().splitlines()
            line = next((i + 1 for i, t in enumerate(lines) if needle in " ".join(t.split())), 0)
        except OSError:
            pass
    return Violation(file, line, "simulator-convention", text)


# ---- the check ------------------------------------------------------------------------------------
def strict_flags(comp: "msl_sim.Compiler") -> List[str]:
    flags = [
        "-std=c++17", "-O0", "-g", "-fno-sanitize=all", "-DTQSIM_STRICT", "-include", "metal_stdlib",
        "-fno-exceptions", "-fno-rtti", "-ferror-limit=0", "-fno-caret-diagnostics", "-fno-color-diagnostics",
        "-Werror=vla", "-Wdouble-promotion",
        "-Wno-unknown-attributes", "-Wno-user-defined-literals", "-Wno-unused-value", "-Wno-duplicate-decl-specifier",
    ]
    if comp.excess_precision_flag:
        flags += ["-Xclang", "-ffloat16-excess-precision=none"]
    return flags


def check(sources: Sequence[Union[str, Path]], include_dirs: Sequence[Union[str, Path]] = (),
          declared_threadgroup_memory: Optional[Mapping[str, int]] = None) -> Report:
    """Runs every rule over ``sources`` (one translation unit, as the simulator compiles them)."""
    srcs = [Path(s).resolve() for s in sources]
    for s in srcs:
        if not s.is_file():
            raise CheckError(f"no such file: {s}")
    roots = [str(d) + os.sep for d in [*(Path(i).resolve() for i in include_dirs), *{s.parent for s in srcs}]]
    shim = str(msl_sim.SHIM_INCLUDE) + os.sep

    def is_shim_file(path: str) -> bool:
        return os.path.realpath(path).startswith(shim) if path and not path.startswith("<") else False

    def is_user_file(path: str) -> bool:
        if not path or path.startswith("<"):
            return False
        real = os.path.realpath(path)
        return not real.startswith(shim) and any(real.startswith(r) for r in roots)

    comp = msl_sim.find_compiler()
    inc_flags = ["-I", str(msl_sim.SHIM_INCLUDE)]
    for r in roots:
        inc_flags += ["-I", r.rstrip(os.sep)]
    with tempfile.TemporaryDirectory(prefix="msl-check-") as tmp:
        work = Path(tmp)
        unit = work / "check.cpp"
        unit.write_text("".join(f'#include "{s}"\n' for s in srcs))
        pre = subprocess.run([*comp.argv, *strict_flags(comp), "-DTQSIM_PREPROCESS_ONLY", "-E", *inc_flags, str(unit)],
                             capture_output=True, text=True)
        if pre.returncode != 0:
            return Report(diagnostic_violations(pre.stderr, is_user_file)
                          or [Violation(str(srcs[0]), 0, "compile-error", pre.stderr.strip()[-2000:])], {})
        located = LocatedText(pre.stdout, is_user_file, is_shim_file)
        violations = [Violation(f, line, "std-library", f"includes {h}, which is not an MSL header")
                      for f, line, h in located.included_headers]
        violations += [_convention_violation(msg) for msg in msl_sim.convention_errors(located.segments)]
        violations += signature_violations(located)
        plain = sorted({d.name for d in msl_sim.kernel_declarations(located.text) if not d.is_template})
        unit.write_text(unit.read_text() + "".join(
            f"__attribute__((used)) static const ::tqsim::checked_kernel tqsim_checked_plain_{i} = "
            f'{{"{name}", (const void*)&{name}}};\n' for i, name in enumerate(plain)))
        ll = work / "check.ll"
        done = subprocess.run([*comp.argv, *strict_flags(comp), "-S", "-emit-llvm", *inc_flags, str(unit), "-o", str(ll)],
                              capture_output=True, text=True)
        violations += diagnostic_violations(done.stderr, is_user_file, bool(located.included_headers))
        if done.returncode != 0 or not ll.exists():
            if not any(v.rule != "simulator-convention" for v in violations):
                violations.append(Violation(str(srcs[0]), 0, "compile-error", done.stderr.strip()[-2000:]))
            return Report(_merge_instantiations(violations), {})
        ir = _Ir(ll.read_text())
    kernels: Dict[str, Kernel] = {}
    kernel_functions: Dict[str, str] = {}
    for _name, _attributes, _kind, rest in ir.globals:
        m = _CHECKED_KERNEL.search(rest)
        if m:
            host, function = ir.strings.get(m.group(1), "?"), m.group(2).strip('"')
            fn = ir.functions.get(function)
            file, line = ir.where(fn.dbg) if fn and fn.dbg else ("?", 0)
            kernels[host] = Kernel(host, ir.display_name(function), file, line)
            kernel_functions[host] = function
    violations += ir_violations(ir, kernels, kernel_functions, is_user_file, is_shim_file)
    violations += threadgroup_memory_violations(kernels, declared_threadgroup_memory)
    return Report(_merge_instantiations(violations), kernels)


def _merge_instantiations(violations: Iterable[Violation]) -> List[Violation]:
    """One violation per place and rule (template instantiations repeat the same finding)."""
    by_place: Dict[Tuple[str, int, str], List[Violation]] = {}
    for v in sorted(set(violations)):
        by_place.setdefault((v.file, v.line, v.rule), []).append(v)
    out = []
    for (file, line, rule), same in by_place.items():
        more = f" (and {len(same) - 1} more like it here)" if len(same) > 1 else ""
        out.append(Violation(file, line, rule, same[0].message + more))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="*", type=Path, help=".metal files (one translation unit)")
    parser.add_argument("-I", dest="include_dirs", action="append", default=[], type=Path)
    parser.add_argument("--threadgroup-memory", type=Path,
                        help="JSON {kernel host name: threadgroup bytes its launch plan declares}")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--list-rules", action="store_true")
    args = parser.parse_args(argv)
    if args.list_rules:
        for name, text in RULES.items():
            print(f"{name}: {text}")
        return 0
    if not args.sources:
        parser.error("no .metal files given")
    declared = json.loads(args.threadgroup_memory.read_text()) if args.threadgroup_memory else None
    try:
        report = check(args.sources, args.include_dirs, declared)
    except (CheckError, msl_sim.CompileError) as e:
        print(f"msl_check: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"violations": [asdict(v) for v in report.violations],
                          "kernels": {h: asdict(k) for h, k in sorted(report.kernels.items())}}, indent=1))
    else:
        for v in report.violations:
            print(v)
        status = "ok" if report.ok else f"{len(report.violations)} violation(s)"
        print(f"msl_check: {len(report.kernels)} kernel(s) in {len(args.sources)} file(s): {status}", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
