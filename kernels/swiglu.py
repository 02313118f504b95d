"""SwiGLU: silu(gate) * up, and the packed form over one projection output [..., 2F].

Packed layout follows the released TextRIN (`linear_packed` then chunk(2)): the first half is the
value ("up"), the second half the gate, so swiglu_packed(x) = x[..., :F] * silu(x[..., F:]).
"""
import torch
import torch.nn.functional as F


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(up.dtype)


def swiglu_packed_reference(x: torch.Tensor) -> torch.Tensor:
    up, gate = x.chunk(2, dim=-1)
    return swiglu_reference(gate, up)
