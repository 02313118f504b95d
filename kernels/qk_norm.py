"""QK-norm: normalise queries and keys over the head dim, per head, with per-head-dim weights.

Layouts: any tensor whose last dim is the head dim works, e.g. [B, L, H, D] or [B, H, L, D], and a
view of the packed projection output ([B, L, 3, H, D] sliced to q and k). `kind` is "rms" (RMSNorm)
or "layer" (LayerNorm with bias; the released TextRIN checkpoints use nn.LayerNorm here).
"""
from typing import Optional, Tuple

import torch


def _norm_reference(x, weight, bias, eps, kind):
    xf = x.float()
    if kind == "layer":
        xf = xf - xf.mean(-1, keepdim=True)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def qk_norm_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float = 1e-6,
    q_bias: Optional[torch.Tensor] = None,
    k_bias: Optional[torch.Tensor] = None,
    kind: str = "rms",
) -> Tuple[torch.Tensor, torch.Tensor]:
    if kind not in ("rms", "layer"):
        raise ValueError(f"qk_norm kind must be 'rms' or 'layer', got {kind!r}")
    return _norm_reference(q, q_weight, q_bias, eps, kind), _norm_reference(k, k_weight, k_bias, eps, kind)
