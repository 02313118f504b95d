"""Sampling on the flow ODE with reward controls and multi-reward classifier-free guidance.

    v = v(s+) + w * (v(s+) - v(s-))

Both branches run in one batched forward; s+ and s- are set per reward key; the negative branch
can use the empty-prompt text embedding; self-conditioning latents are carried per branch (the
stacked batch keeps them apart by construction).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from miro_scale.flow import MIN_GAMMA


def reward_vector(reward_keys: Sequence[str], targets: Mapping[str, float], default: float,
                  snap_bins: Optional[int] = None) -> torch.Tensor:
    """Values for each of the model's reward keys, in its order; NaN leaves a reward unconditioned.

    snap_bins rounds each value to the nearest bin centre value k / (bins - 1), as in training.
    """
    unknown = set(targets) - set(reward_keys)
    if unknown:
        raise KeyError(f"reward targets {sorted(unknown)} are not among the model's reward keys {list(reward_keys)}")
    values = []
    for key in reward_keys:
        value = float(targets.get(key, default))
        if not math.isnan(value):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"reward target {key}={value} is not in [0, 1]")
            if snap_bins:
                value = round(value * (snap_bins - 1)) / (snap_bins - 1)
        values.append(value)
    return torch.tensor(values, dtype=torch.float32)


def pad_text(text: torch.Tensor, mask: torch.Tensor, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    extra = length - text.shape[1]
    if extra <= 0:
        return text, mask
    return F.pad(text, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def gamma_grid(num_steps: int, device=None) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, num_steps + 1, device=device).clamp_min(MIN_GAMMA)


@torch.no_grad()
def sample(model, noise: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
           rewards: Optional[torch.Tensor] = None, *, num_steps: int = 50, solver: str = "euler",
           guidance_scale: float = 0.0, negative_rewards: Optional[torch.Tensor] = None,
           negative_text: Optional[torch.Tensor] = None, negative_text_mask: Optional[torch.Tensor] = None,
           autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Integrate from gamma=0 (noise) to 1 (data); returns normalised latents.

    model: a MiroFlowModel. rewards / negative_rewards: [B, N] (or [N], broadcast). Guidance runs
    when negative rewards or a negative text is given; with neither, the positive branch alone.
    negative_text (e.g. the empty-prompt embedding, [1 or B, L, D]) defaults to the prompt itself,
    so the two branches then differ only in their rewards.
    """
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")
    b = noise.shape[0]

    def per_sample(r: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if r is None else r.to(noise.device, torch.float32).expand(b, -1)

    rewards, negative_rewards = per_sample(rewards), per_sample(negative_rewards)
    guided = negative_rewards is not None or negative_text is not None
    if guided:
        if negative_rewards is None:
            negative_rewards = rewards
        if negative_text is None:
            negative_text, negative_text_mask = text, text_mask
        negative_text = negative_text.to(text.device, text.dtype).expand(b, -1, -1)
        negative_text_mask = negative_text_mask.to(text_mask.device).expand(b, -1)
        length = max(text.shape[1], negative_text.shape[1])
        text, text_mask = pad_text(text, text_mask, length)
        negative_text, negative_text_mask = pad_text(negative_text, negative_text_mask, length)
        text = torch.cat([text, negative_text])
        text_mask = torch.cat([text_mask, negative_text_mask])
        if rewards is not None:
            rewards = torch.cat([rewards, negative_rewards])

    latents = None

    def velocity(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        nonlocal latents
        x_in = torch.cat([x, x]) if guided else x
        gammas = gamma.expand(x_in.shape[0])
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            out = model(x_in, gammas, text, text_mask, rewards, latents)
        latents = out.latents
        v = out.velocity.float()
        if guided:
            v_pos, v_neg = v.chunk(2)
            return v_pos + guidance_scale * (v_pos - v_neg)
        return v

    x = noise.float()
    gammas = gamma_grid(num_steps, noise.device)
    for gamma_now, gamma_next in zip(gammas[:-1], gammas[1:]):
        step = gamma_next - gamma_now
        v = velocity(x, gamma_now)
        if solver == "heun":
            x_euler = x - v * step
            v = 0.5 * (v + velocity(x_euler, gamma_next))
        x = x - v * step
    return x


class MiroPipeline:
    """Prompts + reward dials -> images: text encoder, EMA flow model, sampler, autoencoder.

        pipe = MiroPipeline.from_model_file("exports/miro.safetensors")
        images = pipe(["a red circle"], reward_targets={"aesthetic_score": 1.0}, seed=0)
    """

    def __init__(self, cfg, model, text_encoder, autoencoder, device):
        self.cfg, self.model, self.device = cfg, model.eval(), torch.device(device)
        self.text_encoder, self.autoencoder = text_encoder, autoencoder

    @classmethod
    def from_model_file(cls, path, device: str = "cpu", cfg=None) -> "MiroPipeline":
        from miro_scale.convert import load_model_file, model_file_config
        from miro_scale.flow import MiroFlowModel
        from miro_scale.models.encoders import autoencoder_from_config, text_encoder_from_config

        cfg = cfg or model_file_config(path)
        model = MiroFlowModel(cfg.model, cfg.flow)
        model.load_state_dict(load_model_file(path))
        # Prompts are tokenised to the sampling length (77), as released.
        text_encoder = text_encoder_from_config(cfg, device, cfg.sampling.max_text_len)
        return cls(cfg, model.to(device), text_encoder, autoencoder_from_config(cfg, device), device)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], reward_targets: Optional[Mapping[str, float]] = None,
                 negative_reward_targets: Optional[Mapping[str, float]] = None,
                 guidance_scale: Optional[float] = None, num_steps: Optional[int] = None,
                 solver: Optional[str] = None, seed: int = 0, snap_bins: bool = True) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1]. Rewards not named default to 1 (s+) and 0 (s-)."""
        from miro_scale.flow import denormalize_latents

        s, m = self.cfg.sampling, self.cfg.model
        keys = m.reward_keys
        bins = m.reward_bins if snap_bins else None
        positive = {**s.reward_targets, **(reward_targets or {})}
        negative = {**s.negative_reward_targets, **(negative_reward_targets or {})}
        rewards = reward_vector(keys, positive, 1.0, bins) if keys else None
        negative_rewards = reward_vector(keys, negative, 0.0, bins) if keys else None
        w = s.guidance_scale if guidance_scale is None else guidance_scale
        text, mask = self.text_encoder.encode(list(prompts))
        negative_text = negative_mask = None
        if w > 0 and s.empty_prompt_negative:
            negative_text, negative_mask = self.text_encoder.encode([""])
        generator = torch.Generator(self.device).manual_seed(seed)
        noise = torch.randn(len(prompts), m.latent_channels, m.latent_size, m.latent_size,
                            generator=generator, device=self.device)
        latents = sample(self.model, noise, text.to(self.device), mask.to(self.device), rewards,
                         num_steps=num_steps or s.num_steps, solver=solver or s.solver, guidance_scale=w,
                         negative_rewards=negative_rewards if w > 0 else None,
                         negative_text=negative_text, negative_text_mask=negative_mask,
                         autocast_dtype=torch.bfloat16 if self.device.type == "cuda" else None)
        return self.autoencoder.decode(denormalize_latents(latents, self.cfg.flow)).float().clamp(-1, 1)
