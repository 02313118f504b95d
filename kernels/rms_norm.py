"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, statistics in fp32.

The torch reference lives here; the fused Triton forward/backward and its autograd Function sit
beside it (issue: fused Triton kernels). `kernels.rms_norm` dispatches between them.
"""
import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalise and scale over the last dim in fp32; the output has x's dtype."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)
