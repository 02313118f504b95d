"""Imported by test workers before DeepSpeed starts: its CPU accelerator JIT-compiles a
shared-memory communication op (~85 s) on first use and maps shared memory for it; the tests
communicate over gloo and do not need it, so it is switched off, in tests only.

The module is taken from sys.modules: ``import deepspeed.comm.torch as m`` binds ``torch`` itself,
because ``deepspeed.comm`` imports torch under that name (an earlier version of this stub patched
torch and left the op on)."""
import importlib

try:
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
except ImportError:
    ds_comm_torch = None
if ds_comm_torch is not None:
    assert ds_comm_torch.__name__ == "deepspeed.comm.torch", ds_comm_torch
    ds_comm_torch.build_shm_op = lambda: None
