"""Deterministic synthetic latents, text embeddings and rewards: a dataset that needs nothing on disk.

Each sample belongs to one of `num_classes` "concepts". Its latent is a smooth pattern of
Gaussian blobs placed by the concept, its text embedding is the concept's fixed random embedding
(plus noise, with a random padding length), and its reward values set the pattern's contrast and
sharpness, so both text and rewards carry information a model can learn. Latents come out in the
raw (unnormalised) latent space described by the flow config's shift/scale.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch.utils.data import Dataset


class SyntheticLatentDataset(Dataset):
    def __init__(self, num_samples: int, channels: int, size: int, text_len: int, text_dim: int,
                 reward_keys: Sequence[str], latent_shift: Sequence[float], latent_scale: Sequence[float],
                 sigma_data: float = 0.5, num_classes: int = 16, num_bins: int = 64, seed: int = 0):
        self.num_samples, self.channels, self.size = num_samples, channels, size
        self.text_len, self.text_dim = text_len, text_dim
        self.reward_keys = list(reward_keys)
        self.num_bins, self.num_classes, self.seed = num_bins, num_classes, seed
        self.shift = torch.tensor(latent_shift).view(-1, 1, 1)
        self.scale = torch.tensor(latent_scale).view(-1, 1, 1) / sigma_data
        g = torch.Generator().manual_seed(seed)
        self.class_text = torch.randn(num_classes, text_len, text_dim, generator=g)
        self.class_centres = torch.rand(num_classes, 3, 2, generator=g)  # 3 blobs per concept
        self.class_colours = torch.randn(num_classes, 3, channels, generator=g)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range [0, {self.num_samples})")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        concept = index % self.num_classes
        bins = torch.randint(0, self.num_bins, (len(self.reward_keys),), generator=g)
        rewards = bins.float() / (self.num_bins - 1)
        contrast = 0.4 + 0.6 * rewards[0] if len(rewards) else torch.tensor(1.0)
        width = 0.25 - 0.15 * rewards[1] if len(rewards) > 1 else torch.tensor(0.15)

        coords = torch.linspace(0, 1, self.size)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        pattern = torch.zeros(self.channels, self.size, self.size)
        for centre, colour in zip(self.class_centres[concept], self.class_colours[concept]):
            blob = torch.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * width ** 2))
            pattern += colour.view(-1, 1, 1) * blob
        pattern = contrast * pattern + 0.05 * torch.randn(pattern.shape, generator=g)
        latents = pattern * self.scale + self.shift

        length = int(torch.randint(self.text_len // 2, self.text_len + 1, (1,), generator=g))
        mask = torch.arange(self.text_len) < length
        text = (self.class_text[concept] + 0.1 * torch.randn(self.text_len, self.text_dim, generator=g))
        return {
            "latents": latents,
            "text_embeddings": text * mask.unsqueeze(-1),
            "text_mask": mask,
            "rewards": rewards,
            "index": torch.tensor(index),
        }


def collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
