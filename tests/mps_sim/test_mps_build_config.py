"""The Metal sources embedded into the extension (mps_ops/build_config.py): one self-contained source
per kernel family (.metal file) that compiles on its own, and the table torch_tq_mps.mm finds a
kernel's family with (every planned kernel's family: tests/mps_sim/test_mps_msl_check.py)."""

import re
import subprocess
import sys

import _plans
import _sim_adapter

sys.path.insert(0, str(_plans.MPS_OPS))
import build_config  # noqa: E402


def test_each_family_is_one_self_contained_unit(tmp_path):
    families = build_config.metal_families()
    assert sorted(families) == sorted(p.stem for p in _plans.KERNELS.glob("*.metal"))
    units = []
    for name, source in families.items():
        assert '#include "' not in source  # every local header inlined
        assert source.startswith(f"// ---- kernels/{name}.metal")
        unit = tmp_path / f"{name}.cpp"
        unit.write_text(source)
        units.append(str(unit))
    compiler = _sim_adapter.msl_sim.find_compiler()
    # Syntax and template instantiation of each family on its own against the simulator's
    # metal_stdlib, bfloat included. Object files, not -fsyntax-only: zig's clang wrapper fails on
    # -fsyntax-only (it adds -c and then tries to move an output that was never written).
    cmd = [*compiler.argv, "-x", "c++", "-std=c++17", "-O0", "-c", "-Wno-unknown-attributes",
           "-Wno-user-defined-literals", "-D__HAVE_BFLOAT__=1", "-I", str(_sim_adapter.msl_sim.SHIM_INCLUDE), *units]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]


def test_generated_header_holds_every_family(tmp_path):
    header = build_config.write_source_header(tmp_path)
    text = header.read_text()
    families = build_config.metal_families()
    for name, source in families.items():
        literal = re.search(rf"kTqMetalSource_{name}\[\] =\n(.*?\)TQMSL\");\n", text, flags=re.S).group(1)
        # The header round-trips: concatenated raw literals give back the source.
        assert "".join(re.findall(r'R"TQMSL\((.*?)\)TQMSL"', literal, flags=re.S)) == source
        prefixes = ", ".join(f'"{p}"' for p in build_config.host_name_prefixes(source))
        assert f"kTqHostNamePrefixes_{name}[] = {{{prefixes}, nullptr}};" in text
        assert f'{{"{name}", kTqMetalSource_{name}, kTqHostNamePrefixes_{name}}},' in text


def test_oldest_supported_torch_is_enforced_and_matches_pyproject():
    import pytest

    build_config.check_torch_version("2.13.0+cpu")
    build_config.check_torch_version(".".join(map(str, build_config.MIN_TORCH)) + ".0")
    with pytest.raises(RuntimeError, match=r"needs torch >= 2\.4 on macOS; this build environment has torch 2\.3\.1"):
        build_config.check_torch_version("2.3.1")
    pyproject = (_plans.ROOT / "pyproject.toml").read_text()
    minimum = ".".join(map(str, build_config.MIN_TORCH))
    assert f"\"torch>={minimum}; sys_platform == 'darwin'\"" in pyproject  # the build requirement on macOS
