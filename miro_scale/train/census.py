"""What a training step asks of the device, counted under a TorchDispatchMode on the CPU or the meta
device (no GPU needed, the whole model at full size on meta):

- kernel launches: aten ops that do work (views and allocations excluded); matmuls (mm, addmm,
  bmm, attention, convolution) are counted apart;
- non-matmul bytes: what the other ops read and write (inputs + outputs; an in-place op's tensor
  twice), the traffic that fused kernels and torch.compile exist to cut;
- host syncs: where the host waits for the device. Every .item(), float(), int() and bool() of a
  tensor is aten._local_scalar_dense; .tolist() is counted by patching it; nonzero,
  masked_select and boolean indexing wait for their data-dependent shapes. Each is recorded with
  the first frame outside torch that asked for it.

On meta, a sync returns 0 (False) instead of failing and only non-CPU tensors count (CPU scalars
such as LAMB's step counters stay on the host on a GPU too); on the CPU every tensor is on "the
device", so tensors that live on the host by design are named in `host_resident`. `meta_as_cuda`
makes torch choose on meta the kernels it chooses on CUDA where the choice is made by device type:
multi-tensor (foreach) clipping and optimizers, fused attention (on meta scaled_dot_product_attention
would run its unfused math, which materialises the attention matrix).
"""
from __future__ import annotations

import traceback
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, List
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
MATMUL_NAMES = ("mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "_scaled_mm", "convolution",
                "convolution_backward")
# no kernel: allocations and _unsafe_view (a view that does not say so)
NO_KERNEL = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
             aten.new_empty_strided.default, aten.lift_fresh.default, aten._unsafe_view.default}
DATA_DEPENDENT_SHAPES = {aten.nonzero.default, aten.masked_select.default}


def is_matmul(func) -> bool:
    name = func.overloadpacket.__name__
    return name in MATMUL_NAMES or "attention" in name


def _bytes(values: Iterable[Any]) -> int:
    """Bytes of the distinct elements: a broadcast (stride 0) dimension is read once."""
    total = 0
    for t in values:
        if isinstance(t, torch.Tensor):
            n = 1
            for size, stride in zip(t.shape, t.stride()):
                n *= size if stride else 1
            total += n * t.element_size()
    return total


def _zeros_list(shape) -> Any:
    return 0 if not shape else [_zeros_list(shape[1:]) for _ in range(shape[0])]


def _caller() -> str:
    """The innermost frame outside torch (and this file): who asked for the sync."""
    for frame in reversed(traceback.extract_stack()[:-1]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("census.py"):
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
    return "?"


class Census(TorchDispatchMode):
    """Counts launches, non-matmul bytes and host syncs of everything run inside it (see module doc).

    device: where "the device" is (a sync counts on its tensors only); host_resident: tensors that
    stay on the host in a GPU run too (compared by identity)."""

    def __init__(self, device: torch.device, host_resident: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.device_type = torch.device(device).type
        self.host_resident = list(host_resident)
        self.launches = self.matmul_launches = self.non_matmul_bytes = 0
        self.ops: Counter = Counter()
        self.bytes_by_op: Counter = Counter()
        self.syncs: List[str] = []  # one entry per sync: its caller

    @property
    def host_syncs(self) -> int:
        return len(self.syncs)

    def _counts(self, t: torch.Tensor) -> bool:
        return t.device.type == self.device_type and not any(t is h for h in self.host_resident)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            t = args[0]
            if self._counts(t):
                self.syncs.append(_caller())
            if t.is_meta:
                return False if t.dtype == torch.bool else 0
            return func(*args)
        if func in DATA_DEPENDENT_SHAPES or (func is aten.index.Tensor and any(
                i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])):
            self.syncs.append(_caller())
        out = func(*args, **kwargs)
        if func.is_view or func in NO_KERNEL:
            return out
        self.launches += 1
        self.ops[func.overloadpacket.__name__] += 1
        if is_matmul(func):
            self.matmul_launches += 1
        else:
            moved = _bytes(tree_leaves((args, kwargs))) + _bytes(tree_leaves(out))
            self.non_matmul_bytes += moved
            self.bytes_by_op[func.overloadpacket.__name__] += moved
        return out

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        census, tolist = self, self._tolist

        def counted_tolist(t: torch.Tensor):
            if census._counts(t):
                census.syncs.append(_caller())
            return _zeros_list(t.shape) if t.is_meta else tolist(t)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def summary(self) -> dict:
        return {"kernel_launches": self.launches, "matmul_launches": self.matmul_launches,
                "non_matmul_bytes": self.non_matmul_bytes, "host_syncs": self.host_syncs,
                "sync_sites": dict(Counter(self.syncs)), "top_ops": dict(self.ops.most_common(12)),
                "top_bytes": dict(self.bytes_by_op.most_common(12))}


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """scaled_dot_product_attention as CUDA runs it: one fused kernel (memory-efficient attention,
    which takes a mask as an additive bias), and one in backward."""
    bias = None
    if attn_mask is not None:
        bias = torch.where(attn_mask, 0.0, float("-inf")).to(q.dtype) if attn_mask.dtype == torch.bool else attn_mask
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return aten._scaled_dot_product_efficient_attention(q, k, v, bias, q.requires_grad, dropout_p, is_causal,
                                                        scale=scale)[0]


@contextmanager
def meta_as_cuda() -> Iterator[None]:
    """On meta, the kernels torch would choose on CUDA (see the module doc)."""
    import torch.nn.functional as F
    import torch.optim.optimizer as optimizer
    import torch.utils._foreach_utils as foreach_utils

    devices = foreach_utils._get_foreach_kernels_supported_devices() + ["meta"]
    with mock.patch.object(foreach_utils, "_get_foreach_kernels_supported_devices", lambda: devices), \
            mock.patch.object(optimizer, "_get_foreach_kernels_supported_devices", lambda: devices), \
            mock.patch.object(F, "scaled_dot_product_attention", _fused_attention):
        yield
