"""Training batches: an endless, resumable stream of micro-batches.

The sampler walks a seeded permutation of the dataset per epoch; its state (epoch, position) is
saved with each checkpoint, so a resumed run continues with exactly the next batch. With several
processes, rank r takes every world-th index of the epoch's permutation.
"""
from __future__ import annotations

from typing import Dict, Iterator

import torch

from miro_scale.config import MiroConfig
from miro_scale.data.synthetic_tensors import SyntheticLatentDataset, collate


class EpochBatchStream:
    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if len(dataset) < batch_size * world_size:
            raise ValueError(f"dataset has {len(dataset)} samples, fewer than one global micro-batch "
                             f"({batch_size} x {world_size} processes)")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0  # position counts this rank's batches within the epoch
        self._indices = (None, None)  # (epoch, this rank's indices) cache

    def _epoch_indices(self) -> torch.Tensor:
        if self._indices[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed + 7919 * self.epoch)
            order = torch.randperm(len(self.dataset), generator=g)
            usable = len(order) - len(order) % (self.batch_size * self.world_size)  # same count per rank
            self._indices = (self.epoch, order[:usable][self.rank::self.world_size])
        return self._indices[1]

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        indices = self._epoch_indices()
        start = self.position * self.batch_size
        if start >= len(indices):
            self.epoch, self.position = self.epoch + 1, 0
            return next(self)
        self.position += 1
        return collate([self.dataset[int(i)] for i in indices[start:start + self.batch_size]])

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def build_dataset(cfg: MiroConfig):
    if cfg.data.source == "synthetic_tensors":
        return SyntheticLatentDataset(
            num_samples=cfg.data.num_samples, channels=cfg.model.latent_channels, size=cfg.model.latent_size,
            text_len=cfg.data.text_len, text_dim=cfg.model.text_dim, reward_keys=cfg.model.reward_keys,
            latent_shift=cfg.flow.latent_shift, latent_scale=cfg.flow.latent_scale,
            sigma_data=cfg.flow.sigma_data, num_bins=cfg.model.reward_bins, seed=cfg.train.seed)
    raise ValueError(f"data.source: unsupported {cfg.data.source!r}")
