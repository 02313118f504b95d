"""Imported by test workers before DeepSpeed starts: its CPU accelerator JIT-compiles a
shared-memory communication op (~85 s) on first use; the tests communicate over gloo and do not
need it, so it is switched off, in tests only."""
try:
    import deepspeed.comm.torch as ds_comm_torch

    ds_comm_torch.build_shm_op = lambda: None
except ImportError:
    pass
