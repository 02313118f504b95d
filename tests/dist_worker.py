"""launchers/train.py for CPU test runs under torchrun (without DeepSpeed's shared-memory op)."""
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tests.deepspeed_cpu  # noqa: E402,F401

sys.argv[0] = str(ROOT / "launchers/train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
