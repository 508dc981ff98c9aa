"""The Metal source embedded into the extension (mps_ops/build_config.py) is self-contained and compiles."""

import subprocess
import sys

import _plans
import _sim_adapter

sys.path.insert(0, str(_plans.MPS_OPS))
import build_config  # noqa: E402


def test_embedded_metal_source_is_one_self_contained_unit(tmp_path):
    source = build_config.metal_source()
    assert '#include "' not in source  # every local header inlined
    for metal in sorted(_plans.KERNELS.glob("*.metal")):
        assert f"// ---- kernels/{metal.name}" in source
    unit = tmp_path / "torch_tq_embedded.metal"
    unit.write_text(source)
    compiler = _sim_adapter.msl_sim.find_compiler()
    # Syntax and template instantiation against the simulator's metal_stdlib, bfloat included.
    # A real object file, not -fsyntax-only: zig's clang wrapper fails on -fsyntax-only (it adds -c and
    # then tries to move an output that was never written).
    cmd = [*compiler.argv, "-x", "c++", "-std=c++17", "-O0", "-c", "-o", str(tmp_path / "unit.o"),
           "-Wno-unknown-attributes", "-Wno-user-defined-literals", "-D__HAVE_BFLOAT__=1",
           "-I", str(_sim_adapter.msl_sim.SHIM_INCLUDE), str(unit)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]


def test_generated_header_holds_the_source(tmp_path):
    header = build_config.write_source_header(tmp_path)
    text = header.read_text()
    assert text.count('R"TQMSL(') >= 1 and "kTorchTqMetalSource" in text
    # The header round-trips: concatenated raw literals give back the source.
    import re

    chunks = re.findall(r'R"TQMSL\((.*?)\)TQMSL"', text, flags=re.S)
    assert "".join(chunks) == build_config.metal_source()
