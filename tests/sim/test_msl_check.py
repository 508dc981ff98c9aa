"""The strict MSL check (mps_ops/sim/msl_check.py): every rule fires on a tiny bad kernel, at the
line the kernel marks, and nowhere else; the two mutations of shipped kernels named in issue 11
fail it. The shipped kernels passing it (with the launch plans' threadgroup memory) is
tests/mps_sim/test_mps_msl_check.py."""

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import msl_check

ROOT = Path(__file__).resolve().parents[2]
KERNEL_DIR = ROOT / "mps_ops" / "kernels"
STRICT = Path(__file__).resolve().parent / "kernels" / "strict"
BAD_KERNELS = sorted(STRICT.glob("*.metal"))
EXPECT = re.compile(r"//.*\bexpect: ([\w-]+)")


def marked(path: Path) -> set:
    """(line, rule) of every `// expect: rule` comment in `path`."""
    return {(n, m.group(1)) for n, text in enumerate(path.read_text().splitlines(), 1)
            for m in [EXPECT.search(text)] if m}


def found(report, path: Path) -> set:
    return {(v.line, v.rule) for v in report.violations if Path(v.file) == path}


@pytest.fixture(scope="module")
def reports():
    """The check of every bad kernel, run concurrently (each is two compiler runs)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(zip(BAD_KERNELS, pool.map(lambda p: msl_check.check([p], [KERNEL_DIR]), BAD_KERNELS)))


@pytest.mark.parametrize("path", BAD_KERNELS, ids=[p.stem for p in BAD_KERNELS])
def test_rule_fires_at_the_marked_lines(reports, path):
    report = reports[path]
    listing = "\n".join(map(str, report.violations))
    assert found(report, path) == marked(path), listing
    assert all(Path(v.file) == path for v in report.violations), listing


def test_every_rule_has_a_bad_kernel():
    covered = {rule for path in BAD_KERNELS for _line, rule in marked(path)}
    assert set(msl_check.RULES) - covered == {"compile-error"}


def test_threadgroup_memory_must_equal_what_the_plan_declares(tmp_path):
    good = (STRICT / "threadgroup-initializer.metal").read_text().replace(" = {};", ";")
    kernel = tmp_path / "plan_memory.metal"
    kernel.write_text(good.replace("// expect: threadgroup-initializer", ""))
    assert msl_check.check([kernel], [KERNEL_DIR], {"k": 128}).ok
    report = msl_check.check([kernel], [KERNEL_DIR], {"k": 64})
    assert report.kernels["k"].threadgroup_bytes == 128
    [violation] = report.violations
    assert violation.rule == "threadgroup-memory"
    assert "uses 128 bytes of threadgroup memory (buf 128); its launch plan declares 64" in violation.message


def test_command_line_prints_rule_and_location_and_fails():
    path = STRICT / "recursion.metal"
    done = subprocess.run([sys.executable, str(ROOT / "mps_ops" / "sim" / "msl_check.py"), "-I", str(KERNEL_DIR),
                           str(path)], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stdout.startswith(f"{path}:2: [recursion] recursive call cycle: sum_to -> sum_to")


# ---- the two examples of issue 11: mutations of shipped kernels that the lenient simulator accepted -----
@pytest.fixture
def kernels_copy(tmp_path):
    copy = tmp_path / "kernels"
    shutil.copytree(KERNEL_DIR, copy)
    return copy


def _mutate(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


def test_written_helper_parameter_made_constant_fails(kernels_copy):
    helper = kernels_copy / "tq_utils.h"
    _mutate(helper, "inline void store_codes(device uchar* row,", "inline void store_codes(constant uchar* row,")
    report = msl_check.check([kernels_copy / "turboquant.metal"])
    assert report.rules() == {"address-space"}, "\n".join(map(str, report.violations))
    lines = helper.read_text().splitlines()
    flagged = {lines[v.line - 1].strip() for v in report.violations if Path(v.file) == helper}
    assert "bytes[j] = uchar(acc >> (8 * j));" in flagged or any("device uchar* bytes" in t for t in flagged)


def test_double_in_the_quantize_kernel_fails(kernels_copy):
    kernel = kernels_copy / "turboquant.h"
    _mutate(kernel, "float sum_sq = 0.0f;", "double sum_sq = 0.0;")
    report = msl_check.check([kernels_copy / "turboquant.metal"])
    assert report.rules() == {"double"}, "\n".join(map(str, report.violations))
    lines = kernel.read_text().splitlines()
    flagged = [lines[v.line - 1].strip() for v in report.violations]
    # The declaration (poisoned `double`) and the float product promoted to double.
    assert flagged == ["double sum_sq = 0.0;", "sum_sq += y[i] * y[i];"]
