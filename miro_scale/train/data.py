"""Training batches: an endless, resumable stream of micro-batches.

The sampler walks a seeded permutation of the dataset per epoch, cut into micro-batch-sized
chunks; rank r takes chunks r, r + world, r + 2*world, ... So one optimizer step always consumes
the same consecutive chunks whatever the split between processes and accumulation (1 rank x 2
micro-batches sees what 2 ranks x 1 micro-batch see), and `last_chunk_id` names the chunk just
served so per-sample randomness can be tied to it. The state (epoch, position) is saved with each
checkpoint, so a resumed run continues with exactly the next batch.
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
        # Whole rounds of `world` chunks only, so every rank serves the same number per epoch.
        self.chunks_per_epoch = len(dataset) // (batch_size * world_size) * world_size
        self.last_chunk_id = -1
        self._order = (None, None)  # (epoch, permutation) cache

    def _epoch_order(self) -> torch.Tensor:
        if self._order[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed + 7919 * self.epoch)
            self._order = (self.epoch, torch.randperm(len(self.dataset), generator=g))
        return self._order[1]

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        chunk = self.position * self.world_size + self.rank
        if chunk >= self.chunks_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            return next(self)
        self.position += 1
        self.last_chunk_id = self.epoch * self.chunks_per_epoch + chunk
        indices = self._epoch_order()[chunk * self.batch_size:(chunk + 1) * self.batch_size]
        return collate([self.dataset[int(i)] for i in indices])

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
