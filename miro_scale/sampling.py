"""Sampling on the flow ODE with reward controls and multi-reward classifier-free guidance.

    v = v(s+) + w * (v(s+) - v(s-))

Both branches run in one batched forward; s+ and s- are set per reward key (MiroPipeline: for the
whole batch, or per image, so one call can hold several settings); the negative branch
can use the empty-prompt text embedding; self-conditioning latents are carried per branch (the
stacked batch keeps them apart by construction).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from miro_scale.config import MiroConfig
from miro_scale.flow import MIN_GAMMA


def reward_vector(reward_keys: Sequence[str], targets: Mapping[str, float], default: float) -> torch.Tensor:
    """Values for each of the model's reward keys, in its order, passed as given (the release does
    not round them to bin values); NaN leaves a reward unconditioned."""
    unknown = set(targets) - set(reward_keys)
    if unknown:
        raise KeyError(f"reward targets {sorted(unknown)} are not among the model's reward keys {list(reward_keys)}")
    values = []
    for key in reward_keys:
        value = float(targets.get(key, default))
        if not math.isnan(value) and not 0.0 <= value <= 1.0:
            raise ValueError(f"reward target {key}={value} is not in [0, 1]")
        values.append(value)
    return torch.tensor(values, dtype=torch.float32)


Targets = Union[None, Mapping[str, float], Sequence[Mapping[str, float]]]


def reward_matrix(reward_keys: Sequence[str], base: Mapping[str, float], targets: Targets, default: float,
                  count: int) -> torch.Tensor:
    """One reward vector for the batch ([N]; ``targets`` a mapping or None) or one per image ([count, N];
    ``targets`` a sequence of ``count`` mappings, so one batched call can hold several reward settings);
    each over the config's ``base`` targets."""
    if targets is None or isinstance(targets, Mapping):
        return reward_vector(reward_keys, {**base, **(targets or {})}, default)
    targets = list(targets)
    if len(targets) != count:
        raise ValueError(f"{len(targets)} per-image reward targets for a batch of {count} images")
    return torch.stack([reward_vector(reward_keys, {**base, **t}, default) for t in targets])


def pad_text(text: torch.Tensor, mask: torch.Tensor, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    extra = length - text.shape[1]
    if extra <= 0:
        return text, mask
    return F.pad(text, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def gamma_grid(num_steps: int, device=None, final_gamma: float = 1.0) -> torch.Tensor:
    """Signal levels from noise (MIN_GAMMA) to ``final_gamma`` (1: data), linear in t = 1 - gamma, in
    the release's float32 arithmetic (gamma = 1 - (1 - i / N)), so a sampler run to 1 matches it to
    the last bit."""
    t = 1.0 - torch.arange(num_steps + 1, dtype=torch.float32, device=device) / num_steps
    gamma = 1.0 - t
    if final_gamma != 1.0:
        gamma = gamma * final_gamma
    return gamma.clamp_min(MIN_GAMMA)


@torch.no_grad()
def sample(model, noise: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
           rewards: Optional[torch.Tensor] = None, *, num_steps: int = 50, solver: str = "euler",
           guidance_scale: float = 0.0, negative_rewards: Optional[torch.Tensor] = None,
           negative_text: Optional[torch.Tensor] = None, negative_text_mask: Optional[torch.Tensor] = None,
           autocast_dtype: Optional[torch.dtype] = None, final_gamma: float = 1.0) -> torch.Tensor:
    """Integrate from gamma=0 (noise) to 1 (data); returns normalised latents.

    ``final_gamma`` < 1 stops the integration at that signal level and returns the model's estimate
    of the clean sample there, x - (1 - gamma) v (one more evaluation): the posterior mean rather
    than a sample, smooth where an undertrained model cannot yet remove the last of the noise.

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
            return v_pos * (1 + guidance_scale) - v_neg * guidance_scale  # = v+ + w (v+ - v-), as released
        return v

    if not 0.0 < final_gamma <= 1.0:
        raise ValueError(f"final_gamma must be in (0, 1], got {final_gamma}")
    x = noise.float()
    gammas = gamma_grid(num_steps, noise.device, final_gamma)
    for gamma_now, gamma_next in zip(gammas[:-1], gammas[1:]):
        step = gamma_next - gamma_now
        v = velocity(x, gamma_now)
        if solver == "heun":
            x_euler = x - v * step
            v = 0.5 * (v + velocity(x_euler, gamma_next))
        x = x - v * step
    if final_gamma < 1.0:
        x = x - (1.0 - gammas[-1]) * velocity(x, gammas[-1])
    return x


class MiroPipeline:
    """Prompts + reward dials -> images, loaded the way diffusion models load:

        pipe = MiroPipeline.from_pretrained("nicolas-dufour/miro", torch_dtype=torch.bfloat16, device="cuda")
        images = pipe("a tiger in a tuxedo", reward_targets={"aesthetic_score": 1.0},
                      generator=torch.Generator("cuda").manual_seed(0))          # list of PIL images
        pipe.save_pretrained("exports/miro")

    A bundle (miro_scale/bundle.py) holds the EMA flow model, its config and the empty-prompt
    embedding (the negative branch of guidance); the text encoder and autoencoder are loaded from
    the config's references (local path or hub id) on first use, or passed in.
    """

    def __init__(self, cfg: MiroConfig, model, uncond_embedding: torch.Tensor, text_encoder=None,
                 autoencoder=None):
        self.cfg, self.model = cfg, model.eval()
        self.uncond_embedding = uncond_embedding.float()
        self._text_encoder, self._autoencoder = text_encoder, autoencoder
        self.device, self.dtype = torch.device("cpu"), torch.float32

    @classmethod
    def from_pretrained(cls, path_or_id: str, *, variant: Optional[str] = None, revision: Optional[str] = None,
                        cache_dir: Optional[str] = None, torch_dtype: Optional[torch.dtype] = None,
                        device=None, text_encoder=None, autoencoder=None) -> "MiroPipeline":
        """A bundle directory or hub id (the released layout; ``variant``: a subfolder, as in
        ``nicolas-dufour/miro-ablations``). ``text_encoder`` / ``autoencoder``: objects to use instead
        of the config's references."""
        from miro_scale import bundle
        from miro_scale.flow import MiroFlowModel

        cfg, state, uncond, _ = bundle.load(path_or_id, variant=variant, revision=revision, cache_dir=cache_dir)
        model = MiroFlowModel(cfg.model, cfg.flow)
        model.load_state_dict(state)
        pipe = cls(cfg, model, torch.from_numpy(uncond), text_encoder, autoencoder)
        return pipe.to(device, torch_dtype)

    @classmethod
    def from_checkpoint(cls, path, *, weights: str = "ema", device=None, torch_dtype: Optional[torch.dtype] = None,
                        text_encoder=None, autoencoder=None) -> "MiroPipeline":
        """A training checkpoint (a step_* directory of any engine) as a pipeline, without writing a
        bundle: the weights checkpoints_tools/export.py would export (``weights``: "ema" or "raw")."""
        from miro_scale.convert import checkpoint_config, consolidate, empty_prompt_embedding
        from miro_scale.flow import MiroFlowModel

        cfg = checkpoint_config(path)
        model = MiroFlowModel(cfg.model, cfg.flow)
        model.load_state_dict(consolidate(path, weights))
        pipe = cls(cfg, model, torch.from_numpy(empty_prompt_embedding(cfg)), text_encoder, autoencoder)
        return pipe.to(device, torch_dtype)

    def save_pretrained(self, directory, dtype: Optional[torch.dtype] = None):
        from miro_scale import bundle

        return bundle.save(directory, self.cfg, self.model.state_dict(), self.uncond_embedding.numpy(), dtype)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "MiroPipeline":
        """Moves the flow model; ``dtype`` (bf16/fp16) is the compute dtype: weights stay fp32 and the
        sampler runs under autocast, as the release does."""
        if device is not None:
            self.device = torch.device(device)
            self.model.to(self.device)
        if dtype is not None:
            self.dtype = dtype
        return self

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from miro_scale.models.encoders import text_encoder_from_config
            # prompts are tokenised to the sampling length (77), as released
            self._text_encoder = text_encoder_from_config(self.cfg, self.device, self.cfg.sampling.max_text_len)
        return self._text_encoder

    @property
    def autoencoder(self):
        if self._autoencoder is None:
            from miro_scale.models.encoders import autoencoder_from_config
            self._autoencoder = autoencoder_from_config(self.cfg, self.device)
        return self._autoencoder

    @torch.no_grad()
    def __call__(self, prompt=None, *, num_inference_steps: Optional[int] = None,
                 guidance_scale: Optional[float] = None, generator: Optional[torch.Generator] = None,
                 num_images_per_prompt: int = 1, reward_targets: Targets = None,
                 negative_reward_targets: Targets = None,
                 latents: Optional[torch.Tensor] = None, prompt_embeds: Optional[torch.Tensor] = None,
                 prompt_attention_mask: Optional[torch.Tensor] = None, solver: Optional[str] = None,
                 final_gamma: Optional[float] = None, output_type: str = "pil"):
        """``prompt``: a string or a list (or ``prompt_embeds`` [B, L, D] + ``prompt_attention_mask``).
        Reward targets per key in [0, 1], passed as given: s+ defaults to 1, s- to 0; a list of
        mappings (one per output image) gives each image its own targets. ``latents``: the
        starting noise [B * num_images_per_prompt, C, h, w] (else drawn with ``generator``).
        ``output_type``: "pil" (list of images), "pt" ([B, 3, H, W] in [0, 1]), "np" ([B, H, W, 3]
        in [0, 1]) or "latent" (the sampler's normalised latents, before the autoencoder)."""
        if output_type not in ("pil", "pt", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'pt', 'np' or 'latent', got {output_type!r}")
        s, m = self.cfg.sampling, self.cfg.model
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("give prompt or prompt_embeds")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds, prompt_attention_mask = self.text_encoder.encode(prompts)
        elif prompt_attention_mask is None:
            prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.bool)
        text = prompt_embeds.float().repeat_interleave(num_images_per_prompt, 0).to(self.device)
        mask = prompt_attention_mask.bool().repeat_interleave(num_images_per_prompt, 0).to(self.device)
        keys = m.reward_keys
        w = s.guidance_scale if guidance_scale is None else guidance_scale
        guided = w > 0
        negative_text = negative_mask = None
        if guided and s.empty_prompt_negative:
            negative_text = self.uncond_embedding[None].to(self.device)
            negative_mask = torch.ones(negative_text.shape[:2], dtype=torch.bool, device=self.device)
        b = text.shape[0]
        positive = reward_matrix(keys, s.reward_targets, reward_targets, 1.0, b) if keys else None
        negative = reward_matrix(keys, s.negative_reward_targets, negative_reward_targets, 0.0, b) \
            if keys and guided else None
        if latents is None:
            latents = torch.randn((b, m.latent_channels, m.latent_size, m.latent_size), generator=generator,
                                  device=self.device, dtype=torch.float32)
        x = sample(self.model, latents.to(self.device, torch.float32), text, mask,
                   positive, num_steps=num_inference_steps or s.num_steps, solver=solver or s.solver,
                   guidance_scale=w if guided else 0.0, negative_rewards=negative,
                   negative_text=negative_text, negative_text_mask=negative_mask,
                   autocast_dtype=self.dtype if self.dtype != torch.float32 else None,
                   final_gamma=s.final_gamma if final_gamma is None else final_gamma)
        if output_type == "latent":
            return x
        images = self._decode(x)
        if output_type == "pt":
            return images
        if output_type == "np":
            return images.permute(0, 2, 3, 1).cpu().numpy()
        from torchvision.transforms.functional import to_pil_image
        return [to_pil_image(img.cpu()) for img in images]

    @torch.no_grad()
    def denoise(self, prompt, images: torch.Tensor, gamma: float, *, reward_targets: Targets = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The model's clean estimate of ``images`` ([B, 3, H, W] in [0, 1], one prompt each) noised to
        signal level ``gamma``: x = gamma x0 + (1 - gamma) noise, then x - (1 - gamma) v(x). What the
        model draws once the layout is given (at high gamma) or mostly left to it (at low gamma).
        Returns [B, 3, H, W] in [0, 1]."""
        from miro_scale.flow import normalize_latents

        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        text, mask = self.text_encoder.encode(prompts)
        mean, _ = self.autoencoder.encode(images.to(self.device) * 2 - 1)
        x0 = normalize_latents(mean.float(), self.cfg.flow)
        noise = torch.randn(x0.shape, generator=generator, device=self.device, dtype=torch.float32)
        x = gamma * x0 + (1 - gamma) * noise
        keys = self.cfg.model.reward_keys
        rewards = reward_matrix(keys, self.cfg.sampling.reward_targets, reward_targets, 1.0, len(prompts)) if keys else None
        gammas = torch.full((len(prompts),), gamma, device=self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            v = self.model(x, gammas, text.float().to(self.device), mask.bool().to(self.device),
                           None if rewards is None else rewards.to(self.device).expand(len(prompts), -1)
                           ).velocity.float()
        return self._decode(x - (1 - gamma) * v)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images [B, 3, H, W] in [0, 1]."""
        from miro_scale.flow import denormalize_latents

        return (self.autoencoder.decode(denormalize_latents(x, self.cfg.flow)).float() * 0.5 + 0.5).clamp(0, 1)
