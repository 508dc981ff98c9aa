"""The whole mps_ops/torch_tq_mps.mm, Objective-C included, compiles as Objective-C++ for an
Apple-silicon Mac (_objcxx_check.py: -fsyntax-only against torch's headers and stub Apple SDK
headers), and the check catches errors planted in its Objective-C sections."""

import pytest

import _objcxx_check

_REASON = _objcxx_check.unavailable()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def test_the_mm_compiles_as_objective_cxx_for_a_mac():
    assert _objcxx_check.errors() == []


def _line_of(text: str, needle: str) -> int:
    [line] = [n for n, t in enumerate(text.splitlines(), 1) if needle in t]
    return line


def test_planted_errors_in_the_objective_c_sections_are_caught(tmp_path):
    """A misspelled selector (only a warning in Objective-C) and an argument of the wrong type."""
    text = _objcxx_check.MM.read_text()
    plants = {"[enc setComputePipelineState:pipelines[i]];": "[enc setComputePipelineStat:pipelines[i]];",
              "[device supportsFamily:MTLGPUFamilyApple7]": "[device supportsFamily:@\"Apple7\"]"}
    for old, new in plants.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    mutated = tmp_path / "torch_tq_mps.mm"
    mutated.write_text(text)
    errors = _objcxx_check.errors(mutated)
    for new in plants.values():
        line = _line_of(text, new)
        assert any(f"{mutated}:{line}:" in e for e in errors), (new, errors)
    assert len(errors) == len(plants), errors
