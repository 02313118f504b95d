"""The hot layers of TextRIN behind one boundary.

The model calls only these functions. CUDA tensors (or any tensor when TRITON_INTERPRET=1) run the
fused Triton kernels once they are registered here; everything else runs the torch reference.
This package deliberately defines no __version__: transformers probes a top-level `kernels`
package (Hugging Face's hub kernels) by distribution metadata and version, and must not mistake
this one for it (tests/test_kernels_dispatch.py checks that).
"""
from kernels.qk_norm import qk_norm_reference
from kernels.rms_norm import rms_norm_reference
from kernels.swiglu import swiglu_packed_reference, swiglu_reference

__all__ = ["rms_norm", "qk_norm", "swiglu", "swiglu_packed"]


def rms_norm(x, weight, eps: float = 1e-6):
    return rms_norm_reference(x, weight, eps)


def qk_norm(q, k, q_weight, k_weight, eps: float = 1e-6, q_bias=None, k_bias=None, kind: str = "rms"):
    return qk_norm_reference(q, k, q_weight, k_weight, eps, q_bias, k_bias, kind)


def swiglu(gate, up):
    return swiglu_reference(gate, up)


def swiglu_packed(x):
    return swiglu_packed_reference(x)
