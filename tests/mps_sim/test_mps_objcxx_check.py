"""The whole mps_ops/torch_tq_mps.mm, Objective-C included, compiles as Objective-C++ for an
Apple-silicon Mac (_objcxx_check.py: -fsyntax-only against torch's headers and stub Apple SDK
headers), and the check catches errors planted in its Objective-C sections."""

from concurrent.futures import ThreadPoolExecutor

import pytest

import _objcxx_check

_REASON = _objcxx_check.unavailable()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

# A misspelled selector (only a warning in Objective-C) and an argument of the wrong type.
PLANTS = {"[enc setComputePipelineState:pipelines[i]];": "[enc setComputePipelineStat:pipelines[i]];",
          "[device supportsFamily:MTLGPUFamilyApple7]": "[device supportsFamily:@\"Apple7\"]"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    text = _objcxx_check.MM.read_text()
    for old, new in PLANTS.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    mutated = tmp_path_factory.mktemp("objcxx") / "torch_tq_mps.mm"
    mutated.write_text(text)
    return mutated


@pytest.fixture(scope="module")
def errors(planted):
    """Errors of the shipped .mm and of the planted copy (two ~30 s compiles, run side by side)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        shipped, mutated = pool.map(_objcxx_check.errors, [_objcxx_check.MM, planted])
    return {"shipped": shipped, "planted": mutated}


def test_the_mm_compiles_as_objective_cxx_for_a_mac(errors):
    assert errors["shipped"] == []


def test_planted_errors_in_the_objective_c_sections_are_caught(errors, planted):
    lines = planted.read_text().splitlines()
    for new in PLANTS.values():
        [line] = [n for n, t in enumerate(lines, 1) if new in t]
        assert any(f"{planted}:{line}:" in e for e in errors["planted"]), (new, errors["planted"])
    assert len(errors["planted"]) == len(PLANTS), errors["planted"]
