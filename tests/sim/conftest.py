import sys
from pathlib import Path

# The simulator is a plain module in mps_ops/sim (no torch_tq import needed).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "mps_ops" / "sim"))
