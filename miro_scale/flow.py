"""Flow matching exactly as released.

gamma is the signal level (gamma = 1 - t): x_t = gamma * x0 + (1 - gamma) * noise, the network
predicts v = noise - x0, and sampling integrates dx/dgamma = -v from gamma = 0 (noise) to 1.

``flow.prediction = "sample"`` (not in the release) has the network predict the clean sample x0
instead, and the velocity follows as v = (x_t - x0) / (1 - gamma): the identity part of v, which
a velocity network must learn pixel by pixel, is then exact by construction. Small pixel-space models
(the synthetic world through the identity autoencoder) learn to denoise far sooner this way; the
loss stays the velocity loss.
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from miro_scale.config import FlowConfig, ModelConfig
from miro_scale.models.textrin import FourierFeatures, TextRIN

MIN_GAMMA = 1e-9  # the released scheduler clamps gamma here
MIN_NOISE = 0.05  # sample prediction: 1 - gamma is clamped here when dividing by it


class FlowOutput(NamedTuple):
    velocity: torch.Tensor
    latents: torch.Tensor
    log_weight: Optional[torch.Tensor]  # u(gamma) of the learned loss weighting, [B]


class MiroFlowModel(nn.Module):
    """TextRIN with flow preconditioning and the EDM2 learned loss weighting u(gamma).

    Everything with parameters sits behind forward(), so ZeRO-3 and FSDP gather what they must.
    """

    def __init__(self, model_cfg: ModelConfig, flow_cfg: FlowConfig):
        super().__init__()
        self.net = TextRIN(model_cfg)
        self.sigma_data = flow_cfg.sigma_data
        self.prediction = flow_cfg.prediction
        self.logvar_proj = None
        if flow_cfg.learned_loss_weighting:
            channels = flow_cfg.loss_weighting_channels
            self.logvar_proj = nn.Sequential(FourierFeatures(channels), nn.Linear(channels, 1))

    @property
    def reward_keys(self):
        return self.net.reward_keys

    def forward(self, y: torch.Tensor, gamma: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                rewards: Optional[torch.Tensor] = None,
                previous_latents: Optional[torch.Tensor] = None) -> FlowOutput:
        g = gamma.float().reshape(-1, *([1] * (y.ndim - 1)))
        c_in = torch.rsqrt((g * self.sigma_data) ** 2 + (1 - g) ** 2)
        c_out = math.sqrt(1 + self.sigma_data ** 2)
        out, latents = self.net((y * c_in).to(y.dtype), gamma, text, text_mask, rewards, previous_latents)
        if self.prediction == "sample":  # x0 = sigma_data * out; v = (y - x0) / (1 - gamma)
            v = (y.float() - self.sigma_data * out.float()) / (1 - g).clamp_min(MIN_NOISE)
            v = v.to(out.dtype)
        else:
            v = out * c_out
        log_weight = None
        if self.logvar_proj is not None:
            log_weight = self.logvar_proj(gamma.float()).reshape(-1)
        return FlowOutput(v, latents, log_weight)


def normalize_latents(z: torch.Tensor, cfg: FlowConfig) -> torch.Tensor:
    """Per-channel (z - shift) * sigma_data / scale: latents with standard deviation ~sigma_data."""
    shift = z.new_tensor(cfg.latent_shift).view(1, -1, 1, 1)
    scale = z.new_tensor(cfg.latent_scale).view(1, -1, 1, 1)
    return (z - shift) * (cfg.sigma_data / scale)


def denormalize_latents(x: torch.Tensor, cfg: FlowConfig) -> torch.Tensor:
    shift = x.new_tensor(cfg.latent_shift).view(1, -1, 1, 1)
    scale = x.new_tensor(cfg.latent_scale).view(1, -1, 1, 1)
    return x * (scale / cfg.sigma_data) + shift


def clean_latents(batch: Dict[str, torch.Tensor], cfg: FlowConfig,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x0 from a batch of precomputed VAE posteriors: mean (+ std * eps when sampling), normalised."""
    z = batch["latents"].float()
    std = batch.get("latents_std")
    if cfg.sample_posterior and std is not None:
        z = z + std.float() * torch.randn(z.shape, generator=generator, device=z.device)
    return normalize_latents(z, cfg)


def sample_gamma(batch_size: int, cfg: FlowConfig, device, generator=None) -> torch.Tensor:
    if cfg.time_distribution == "logit_normal":
        n = torch.randn(batch_size, generator=generator, device=device)
        t = torch.sigmoid(n * cfg.logit_normal_std + cfg.logit_normal_mean)
    else:
        t = torch.rand(batch_size, generator=generator, device=device)
    return (1.0 - t).clamp_min(MIN_GAMMA)


def flow_matching_loss(model: nn.Module, batch: Dict[str, torch.Tensor], cfg: FlowConfig,
                       self_conditioning: bool, generator: Optional[torch.Generator] = None
                       ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The training objective for one micro-batch. `model` is a MiroFlowModel, possibly wrapped
    by an engine. With self-conditioning, a first pass on the same (x_t, gamma) gives latents
    that are kept with probability self_cond_rate (else zeros) and fed, detached, to the second
    pass; the first pass runs under no_grad, which gives the same gradients as the released
    detach-after-grad pass at a fraction of the memory, and needs no static graph."""
    x0 = clean_latents(batch, cfg, generator)
    b = x0.shape[0]
    gamma = sample_gamma(b, cfg, x0.device, generator)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    g = gamma.view(-1, 1, 1, 1)
    y = g * x0 + (1 - g) * noise
    text, text_mask, rewards = batch["text_embeddings"], batch["text_mask"], batch.get("rewards")

    previous = None
    if self_conditioning and cfg.self_cond_rate > 0:
        with torch.no_grad():
            previous = model(y, gamma, text, text_mask, rewards).latents
        keep = torch.rand(b, generator=generator, device=x0.device) < cfg.self_cond_rate
        previous = previous * keep.view(-1, 1, 1).to(previous.dtype)

    out = model(y, gamma, text, text_mask, rewards, previous)
    per_sample = (out.velocity.float() - (noise - x0)).pow(2).flatten(1).mean(1)
    metrics = {"raw_loss": per_sample.mean().detach()}
    if out.log_weight is not None:
        weighted = per_sample / out.log_weight.float().exp() + out.log_weight.float()
        metrics["log_weight"] = out.log_weight.mean().detach()
        return weighted.mean(), metrics
    return per_sample.mean(), metrics
