"""Periodic sample grids during training, on fixed prompts with fixed noise, from the EMA weights.

Top row: every reward at s+ = 1, guided against s- = 0 (the MIRO default); bottom row: every reward
at 0, unguided. The gap between the rows is the reward control the model has learnt so far.
Prompts are {"text_embeddings", "text_mask"} and, when the data has them, "captions".
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict

import torch
from torchvision.utils import make_grid, save_image

from miro_scale.config import MiroConfig
from miro_scale.flow import denormalize_latents
from miro_scale.models.encoders import autoencoder_from_config
from miro_scale.sampling import sample
from miro_scale.train.optim import EMA


def build_decoder(cfg: MiroConfig, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Normalised latents -> RGB in [-1, 1]. Without an RGB autoencoder (synthetic latents), the
    first three latent channels are shown as they are."""
    autoencoder = autoencoder_from_config(cfg, device)

    def decode(x: torch.Tensor) -> torch.Tensor:
        if cfg.autoencoder.kind == "identity" and x.shape[1] != 3:
            return (x[:, :3] / (2 * cfg.flow.sigma_data)).clamp(-1, 1)  # latents have std ~sigma_data
        return autoencoder.decode(denormalize_latents(x, cfg.flow))

    return decode


@contextmanager
def ema_weights(params: Dict[str, torch.Tensor], ema: EMA):
    """Swap the EMA weights in for the duration of the block (each rank its own shard)."""
    backup = {n: p.detach().clone() for n, p in params.items()}
    ema.copy_to(params)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(backup[name])


@torch.no_grad()
def render_samples(model, cfg: MiroConfig, prompts: Dict, decode, device, seed: int = 0) -> torch.Tensor:
    """[rows * count, 3, H, W] images in [-1, 1]: rewards at 1 (guided) then at 0 (one row without rewards)."""
    text = prompts["text_embeddings"].to(device)
    mask = prompts["text_mask"].to(device)
    count, m = text.shape[0], cfg.model
    generator = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(count, m.latent_channels, m.latent_size, m.latent_size, generator=generator, device=device)
    kwargs = dict(num_steps=cfg.sampling.num_steps, solver=cfg.sampling.solver)
    num_rewards = len(m.reward_keys)
    if num_rewards:
        high = sample(model, noise, text, mask, torch.ones(num_rewards), guidance_scale=cfg.sampling.guidance_scale,
                      negative_rewards=torch.zeros(num_rewards), **kwargs)
        low = sample(model, noise, text, mask, torch.zeros(num_rewards), **kwargs)
        latents = torch.cat([high, low])
    else:
        latents = sample(model, noise, text, mask, None, **kwargs)
    return decode(latents).float().cpu()


def to_grid(images: torch.Tensor, count: int) -> torch.Tensor:
    return make_grid((images + 1) / 2, nrow=count, padding=1).clamp(0, 1)


def save_grid(grid: torch.Tensor, out_dir: Path, step: int) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"step_{step:08d}.png"
    save_image(grid, path)
    return path
