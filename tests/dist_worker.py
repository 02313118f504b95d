"""launchers/train.py for CPU test runs under torchrun.

DeepSpeed's CPU accelerator JIT-compiles a shared-memory communication op (~85 s) on first use;
the tests communicate over gloo and do not need it, so it is switched off here, in tests only.
"""
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:
    import deepspeed.comm.torch as ds_comm_torch

    ds_comm_torch.build_shm_op = lambda: None
except ImportError:
    pass

sys.argv[0] = str(ROOT / "launchers/train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
