"""The one attention function every TextRIN block calls.

flash_attn when it is importable, the tensors are on CUDA in fp16/bf16 and there is no padding
mask; torch's scaled_dot_product_attention otherwise (it carries FlashAttention-2 and
memory-efficient kernels of its own, and takes the key-padding masks of the conditioning tokens).
"""
from typing import Optional

import torch
import torch.nn.functional as F

try:  # optional GPU extra
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the install
    flash_attn_func = None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Multi-head attention on [B, L, H, D] tensors; key_padding_mask is [B, Lk], True = attend.

    Returns [B, Lq, H, D]. Every query must see at least one key (TextRIN always keeps the time
    token and registers visible), so masked rows never turn into NaN.
    """
    if (
        flash_attn_func is not None
        and key_padding_mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
    ):
        return flash_attn_func(q, k, v)
    attn_mask = None
    if key_padding_mask is not None:
        attn_mask = key_padding_mask[:, None, None, :].to(torch.bool)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
    )
    return out.transpose(1, 2)
