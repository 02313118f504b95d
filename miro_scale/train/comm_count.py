"""Count the collectives a piece of training code issues, and their payload bytes.

Every engine reaches the process group through torch.distributed's module-level functions (FSDP2's
all-gathers and reduce-scatters, DeepSpeed's torch backend, the optimizers' all-reduces), so
wrapping those functions sees all of its traffic. The payload of a call is the size of the tensor
that carries the whole collective's data: the reduced tensor of an all-reduce, the input of a
reduce-scatter, the output of an all-gather. What a rank sends on a ring is (w-1)/w of the payload
for every kind but the all-reduce, which sends twice that (a reduce-scatter, then an all-gather):
`wire_bytes`. Counts also record the bytes issued from inside the
autograd engine (gradient hooks during the backward), the traffic that can overlap the backward's
computation; what is issued after it cannot. Enter it before the engine is built: DeepSpeed looks
its collectives up once, at initialisation.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, Iterator, Sequence

import torch
import torch.distributed as dist

# name -> the parameter that carries the payload (see the module docstring)
COLLECTIVES = {
    "all_reduce": "tensor",
    "all_reduce_coalesced": "tensors",
    "reduce": "tensor",
    "broadcast": "tensor",
    "reduce_scatter_tensor": "input",
    "reduce_scatter_single": "input",
    "_reduce_scatter_base": "input",
    "reduce_scatter": "input_list",
    "all_gather_into_tensor": "output_tensor",
    "all_gather_single": "output_tensor",
    "_all_gather_base": "output_tensor",
    "all_gather": "tensor_list",
}


def _bytes(payload) -> int:
    tensors: Sequence = payload if isinstance(payload, (list, tuple)) else [payload]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@dataclass
class CollectiveCounts:
    calls: Dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes: Dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_in_backward: int = 0
    wire_bytes: float = 0.0

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def as_dict(self) -> Dict:
        return {"calls": dict(self.calls), "bytes": dict(self.bytes), "total_bytes": self.total_bytes,
                "bytes_in_backward": self.bytes_in_backward, "wire_bytes": self.wire_bytes}

    def reset(self) -> None:
        """Forget what was counted so far (set-up traffic), keeping the wrappers in place."""
        self.calls.clear()
        self.bytes.clear()
        self.bytes_in_backward = 0
        self.wire_bytes = 0.0


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveCounts]:
    counts = CollectiveCounts()
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name, fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            arguments = signature.bind_partial(*args, **kwargs).arguments
            size = _bytes(arguments.get(COLLECTIVES[name]))
            world = dist.get_world_size(arguments.get("group"))
            counts.wire_bytes += (2 if name.startswith("all_reduce") else 1) * size * (world - 1) / world
            counts.calls[name] += 1
            counts.bytes[name] += size
            if torch._C._current_graph_task_id() >= 0:  # called from a hook inside autograd
                counts.bytes_in_backward += size
            return fn(*args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
