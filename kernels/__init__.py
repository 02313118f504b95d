"""The hot layers of TextRIN behind one boundary.

The model calls only these functions. CUDA tensors run the fused Triton kernels (registered as
torch.library ops `miro_kernels::*`, so torch.compile and FSDP2 see one opaque op with its autograd
formula and fake impl); CPU tensors run the torch reference, unless TRITON_INTERPRET=1 was set
when this package was first imported, in which case CPU tensors run the same kernels in Triton's
interpreter (how CI tests them). Without an importable triton everything runs the reference.
This package deliberately defines no __version__: transformers probes a top-level `kernels`
package (Hugging Face's hub kernels) by distribution metadata and version, and must not mistake
this one for it (tests/test_kernels_dispatch.py checks that).
"""
from contextlib import contextmanager

from kernels import _triton_support
from kernels._triton_support import runs_triton
from kernels.qk_norm import qk_norm_op, qk_norm_reference
from kernels.rms_norm import rms_norm_op, rms_norm_reference
from kernels.swiglu import swiglu_op, swiglu_packed_op, swiglu_packed_reference, swiglu_reference

__all__ = ["rms_norm", "qk_norm", "swiglu", "swiglu_packed", "reference_only"]


@contextmanager
def reference_only():
    """Within the block every op runs its torch reference, on CUDA too (side-by-side benchmarks)."""
    previous = _triton_support._reference_only
    _triton_support._reference_only = True
    try:
        yield
    finally:
        _triton_support._reference_only = previous


def rms_norm(x, weight, eps: float = 1e-6):
    """RMSNorm over the last dim of x [..., N] (any leading strides); output in x's dtype."""
    if runs_triton(x):
        return rms_norm_op(x, weight, float(eps))
    return rms_norm_reference(x, weight, eps)


def qk_norm(q, k, q_weight, k_weight, eps: float = 1e-6, q_bias=None, k_bias=None, kind: str = "rms"):
    """Normalise q and k over the head dim, per head, in one launch; kind "rms" or "layer".

    Accepts [B, L, H, D], [B, H, L, D] (contiguous or a transposed view) and q/k views of a packed
    [B, L, 3, H, D] projection without copying; returns contiguous tensors of the input shapes.
    """
    if runs_triton(q):
        return qk_norm_op(q, k, q_weight, k_weight, float(eps), q_bias, k_bias, kind)
    return qk_norm_reference(q, k, q_weight, k_weight, eps, q_bias, k_bias, kind)


def swiglu(gate, up):
    """silu(gate) * up, in up's dtype."""
    if runs_triton(up):
        return swiglu_op(gate, up)
    return swiglu_reference(gate, up)


def swiglu_packed(x):
    """x[..., :F] * silu(x[..., F:]) for x [..., 2F] (value first, gate second, as released)."""
    if runs_triton(x):
        return swiglu_packed_op(x)
    return swiglu_packed_reference(x)
