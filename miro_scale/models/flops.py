"""Parameter counts and FLOPs of a config's model, built on the meta device (no memory).

FLOPs come from torch's FlopCounterMode (matmuls and attention; elementwise ops are not counted,
which is the convention MFU figures use). The trainer uses them for TFLOP/s and MFU.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch.utils.flop_counter import FlopCounterMode

from miro_scale.config import MiroConfig
from miro_scale.flow import MiroFlowModel


def build_meta_model(cfg: MiroConfig) -> MiroFlowModel:
    with torch.device("meta"):
        return MiroFlowModel(cfg.model, cfg.flow)


def parameter_counts(model: torch.nn.Module) -> Dict[str, int]:
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.net.named_children()}
    counts["<direct parameters>"] = sum(p.numel() for p in model.net.parameters(recurse=False))
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def forward_flops(cfg: MiroConfig, latent_size: int, text_len: int, batch_size: int = 1) -> int:
    """FLOPs of one forward pass of the network for `batch_size` samples."""
    model = build_meta_model(cfg)
    c = cfg.model.latent_channels
    with torch.device("meta"):
        x = torch.empty(batch_size, c, latent_size, latent_size)
        gamma = torch.empty(batch_size)
        text = torch.empty(batch_size, text_len, cfg.model.text_dim)
        mask = torch.ones(batch_size, text_len, dtype=torch.bool)
        rewards = torch.empty(batch_size, len(cfg.model.reward_keys))
    with FlopCounterMode(display=False) as counter:
        model(x, gamma, text, mask, rewards)
    return counter.get_total_flops()


def training_flops_per_sample(cfg: MiroConfig, text_len: int) -> int:
    """Forward + backward (3x forward) + the self-conditioning forward that precedes it, at the
    text length the batches are padded to (padding is computed too: miro_16m is 750 GFLOP per
    sample at 256 tokens, 694 at 77)."""
    fwd = forward_flops(cfg, cfg.model.latent_size, text_len)
    self_cond = fwd if cfg.model.self_conditioning and cfg.flow.self_cond_rate > 0 else 0
    return 3 * fwd + self_cond
