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
        self._per_device: Dict[torch.device, Dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range [0, {self.num_samples})")
        batch = self.batch(torch.tensor([index]), torch.device("cpu"), self.seed * 1_000_003 + index)
        return {key: value[0] for key, value in batch.items()}

    def _constants(self, device: torch.device) -> Dict[str, torch.Tensor]:
        if device not in self._per_device:  # copied once per device, not per batch
            self._per_device[device] = {k: v.to(device) for k, v in (
                ("text", self.class_text), ("centres", self.class_centres), ("colours", self.class_colours),
                ("shift", self.shift), ("scale", self.scale))}
        return self._per_device[device]

    def batch(self, indices: torch.Tensor, device: torch.device, seed: int) -> Dict[str, torch.Tensor]:
        """The samples `indices`, made together on `device` by one generator there seeded with
        `seed`: no per-sample Python work and no host-to-device copy of the batch (a stream seeds
        it per chunk, so a chunk is the same on any number of ranks and after a resume)."""
        g = torch.Generator(device).manual_seed(seed)
        c = self._constants(device)
        index = indices.to(device)
        n, keys, size, length = len(index), len(self.reward_keys), self.size, self.text_len
        concept = index % self.num_classes
        bins = torch.randint(0, self.num_bins, (n, keys), generator=g, device=device)
        rewards = bins.float() / (self.num_bins - 1)
        ones = torch.ones(n, device=device)
        contrast = 0.4 + 0.6 * rewards[:, 0] if keys else ones
        width = 0.25 - 0.15 * rewards[:, 1] if keys > 1 else 0.15 * ones

        coords = torch.linspace(0, 1, size, device=device)
        centres = c["centres"][concept]  # [n, blob, (x, y)]
        distance2 = ((coords.view(1, 1, 1, size) - centres[..., 0, None, None]) ** 2
                     + (coords.view(1, 1, size, 1) - centres[..., 1, None, None]) ** 2)  # [n, blob, y, x]
        blobs = torch.exp(-distance2 / (2 * width.view(n, 1, 1, 1) ** 2))
        pattern = torch.einsum("nbc,nbyx->ncyx", c["colours"][concept], blobs)
        noise = torch.randn(pattern.shape, generator=g, device=device)
        latents = (contrast.view(n, 1, 1, 1) * pattern + 0.05 * noise) * c["scale"] + c["shift"]

        lengths = torch.randint(length // 2, length + 1, (n, 1), generator=g, device=device)
        mask = torch.arange(length, device=device) < lengths
        text = c["text"][concept] + 0.1 * torch.randn(n, length, self.text_dim, generator=g, device=device)
        return {"latents": latents, "text_embeddings": text * mask.unsqueeze(-1), "text_mask": mask,
                "rewards": rewards, "index": index}


def collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
