"""examples/ run as a user runs them and explain what they print."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quantized_decode_puts_its_errors_in_context():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quantized_decode.py"), "--context", "256"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = {line.split("  ")[0]: line.split() for line in out.stdout.splitlines()
            if line.startswith(("float16 cache", "TurboQuant"))}
    assert set(rows) == {"float16 cache (rounding only)", "TurboQuant 4-bit", "TurboQuant 8-bit"}
    kv_error = {name: float(cols[-3]) for name, cols in rows.items()}
    # The comparison rows order the errors as a reader expects: float16 rounding < 8 bits < 4 bits,
    # and 4 bits is near the Lloyd-Max distortion of a unit Gaussian vector (sqrt(0.009497) = 0.097).
    assert kv_error["float16 cache (rounding only)"] < kv_error["TurboQuant 8-bit"] < kv_error["TurboQuant 4-bit"]
    assert abs(kv_error["TurboQuant 4-bit"] - 0.097) < 0.01
    assert "synthetic K/V" in out.stdout and "perplexity" in out.stdout
