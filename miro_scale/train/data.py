"""Training batches: an endless, resumable stream of micro-batches.

The sampler walks a seeded permutation of the dataset per epoch, cut into micro-batch-sized
chunks; rank r takes chunks r, r + world, r + 2*world, ... So one optimizer step always consumes
the same consecutive chunks whatever the split between processes and accumulation (1 rank x 2
micro-batches sees what 2 ranks x 1 micro-batch see); the shard loaders of miro_scale.data plan
their epochs the same way. The state is saved with each checkpoint, so a resumed run continues
with exactly the next batch.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional

import torch

from miro_scale.config import MiroConfig
from miro_scale.data.loader import device_batch
from miro_scale.data.synthetic_tensors import SyntheticLatentDataset, collate
from miro_scale.models.encoders import autoencoder_from_config, text_encoder_from_config


class EpochBatchStream:
    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 device: torch.device = torch.device("cpu")):
        if len(dataset) < batch_size * world_size:
            raise ValueError(f"dataset has {len(dataset)} samples, fewer than one global micro-batch "
                             f"({batch_size} x {world_size} processes)")
        self.dataset, self.batch_size, self.seed, self.device = dataset, batch_size, seed, device
        self.num_samples = len(dataset)
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0  # position counts this rank's batches within the epoch
        # Whole rounds of `world` chunks only, so every rank serves the same number per epoch.
        self.chunks_per_epoch = len(dataset) // (batch_size * world_size) * world_size
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
        indices = self._epoch_order()[chunk * self.batch_size:(chunk + 1) * self.batch_size]
        if hasattr(self.dataset, "batch"):  # synthetic tensors: made at once on the device, seeded per chunk
            return self.dataset.batch(indices, self.device, seed=self.seed * 1_000_003 + 7919 * self.epoch + chunk)
        return collate([self.dataset[int(i)] for i in indices])

    def preview_prompts(self, count: int) -> Dict[str, torch.Tensor]:
        """Fixed prompts for sample grids: the dataset's first samples."""
        batch = collate([self.dataset[i] for i in range(min(count, len(self.dataset)))])
        return {k: batch[k] for k in ("text_embeddings", "text_mask")}

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "world_size": self.world_size}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Resume; on another world size too, at a step boundary (ranks move in lockstep, so
        position x world chunks of the epoch are done, whichever rank saved the state)."""
        done = int(state["position"]) * int(state.get("world_size", self.world_size))
        if done % self.world_size:
            raise ValueError(f"data state: {done} chunks done in epoch {state['epoch']} is not a multiple of "
                             f"world size {self.world_size}; cannot resume exactly")
        self.epoch, self.position = int(state["epoch"]), done // self.world_size


class ShardBatchStream:
    """Batches from WebDataset shards (miro_scale.data loaders) in the trainer's format.

    Images are encoded by the autoencoder and captions by the (frozen) text encoder on the fly
    when the shards carry no precomputed latents or embeddings.
    """

    def __init__(self, cfg: MiroConfig, rank: int, world_size: int, device: torch.device):
        from miro_scale.data import make_loader

        d = cfg.data
        kwargs = dict(mode=d.mode, resolution=d.resolution, reward_keys=cfg.model.reward_keys,
                      caption_source=d.caption_source, text_embeddings=d.precomputed_text,
                      max_text_len=d.max_text_len, rank=rank, world_size=world_size, seed=cfg.train.seed)
        if d.loader == "dali":
            kwargs["device_id"] = device.index if device.type == "cuda" else None
        else:
            kwargs.update(num_workers=d.num_workers, latent_std=cfg.flow.sample_posterior)
        self.loader = make_loader(d.loader, d.shards, cfg.train.micro_batch_size, **kwargs)
        self.num_samples = getattr(self.loader, "num_samples", None)
        self.device = device
        self.max_text_len = d.max_text_len
        self.autoencoder = None
        self.autoencoder = autoencoder_from_config(cfg, device) if d.mode == "image" else None
        # captions are encoded to data.max_text_len tokens (256: the release trains on up to 256)
        self.text_encoder = (None if d.precomputed_text
                             else text_encoder_from_config(cfg, device, max_length=d.max_text_len))
        self._stream: Optional[Iterator] = None

    @torch.no_grad()
    def encode_captions(self, captions: List[str]) -> Dict[str, torch.Tensor]:
        embeddings, mask = self.text_encoder.encode(captions)
        return {"text_embeddings": embeddings, "text_mask": mask}

    @torch.no_grad()
    def to_training_batch(self, batch: Dict) -> Dict[str, torch.Tensor]:
        """The trainer's batch, on the device: the loader hands over compact host tensors (stored
        fp16, text padded to the batch's longest caption); the cast to float32 and the padding to
        data.max_text_len happen there (device_batch)."""
        batch = device_batch(batch, self.device, self.max_text_len)
        out = {"rewards": batch["rewards"]}
        if self.autoencoder is not None:
            mean, std = self.autoencoder.encode(batch["image"])
            out["latents"], out["latents_std"] = mean, std
        else:
            out["latents"] = batch["latents"]
            if "latents_std" in batch:
                out["latents_std"] = batch["latents_std"]
        if self.text_encoder is not None:
            out.update(self.encode_captions(batch["text"]))
        else:
            out["text_embeddings"], out["text_mask"] = batch["text_embeddings"], batch["text_mask"]
        return out

    def __next__(self) -> Dict[str, torch.Tensor]:
        if self._stream is None:
            self._stream = self.loader.stream()
        return self.to_training_batch(next(self._stream))

    def preview_prompts(self, count: int) -> Dict[str, torch.Tensor]:
        """Fixed prompts for sample grids: the first samples of epoch 0's plan on rank 0."""
        state = self.loader.state_dict()
        self.loader.load_state_dict({**state, "epoch": 0, "batch_in_epoch": 0})
        batch = next(iter(self.loader))
        self.loader.load_state_dict(state)
        out = self.to_training_batch(batch)
        prompts = {k: out[k][:count].cpu() for k in ("text_embeddings", "text_mask")}
        if "text" in batch:
            prompts["captions"] = list(batch["text"][:count])
        return prompts

    def state_dict(self) -> Dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: Dict) -> None:
        self.loader.load_state_dict(state)
        self._stream = None


def build_batch_stream(cfg: MiroConfig, rank: int, world_size: int, device: torch.device):
    if cfg.data.source == "shards":
        return ShardBatchStream(cfg, rank, world_size, device)
    return EpochBatchStream(build_dataset(cfg), cfg.train.micro_batch_size, cfg.train.seed, rank, world_size, device)


def build_dataset(cfg: MiroConfig):
    if cfg.data.source == "synthetic_tensors":
        return SyntheticLatentDataset(
            num_samples=cfg.data.num_samples, channels=cfg.model.latent_channels, size=cfg.model.latent_size,
            text_len=cfg.data.text_len, text_dim=cfg.model.text_dim, reward_keys=cfg.model.reward_keys,
            latent_shift=cfg.flow.latent_shift, latent_scale=cfg.flow.latent_scale,
            sigma_data=cfg.flow.sigma_data, num_bins=cfg.model.reward_bins, seed=cfg.train.seed)
    raise ValueError(f"data.source: unsupported {cfg.data.source!r}")
