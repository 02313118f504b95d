"""Text encoders and autoencoders behind two small interfaces.

TextEncoder.encode(prompts) -> (embeddings [B, L, D], mask [B, L] bool)
Autoencoder.encode(images in [-1, 1]) -> (mean, std) of the latent posterior; decode(z) -> images

Training reads precomputed latents and embeddings (as the release does); these are used to make
them, to encode prompts at sampling time, and to decode samples. Real models load from a local
path or a hub id; the identity autoencoder and the small text encoder serve the synthetic world.
"""
from __future__ import annotations

import hashlib
from typing import Protocol, Sequence, Tuple

import torch
import torch.nn as nn


class TextEncoder(Protocol):
    dim: int

    def encode(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]: ...


class Autoencoder(Protocol):
    latent_channels: int
    downsample: int

    def encode(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class T5TextEncoder(nn.Module):
    """FLAN-T5 encoder (transformers T5EncoderModel) with its tokenizer; prompts padded to max_length."""

    def __init__(self, name_or_path: str = "google/flan-t5-xl", max_length: int = 77,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 padding: str = "max_length"):
        super().__init__()
        from transformers import AutoTokenizer, T5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.model = T5EncoderModel.from_pretrained(name_or_path, dtype=dtype).to(device).eval()
        self.max_length = max_length
        self.padding = padding  # "longest" pads a batch only to its longest prompt (precomputing)
        self.dim = self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(list(prompts), padding=self.padding, truncation=True,
                                max_length=self.max_length, return_tensors="pt").to(self.model.device)
        hidden = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        mask = tokens.attention_mask.bool()
        return hidden * mask.unsqueeze(-1), mask


class SmallTextEncoder(nn.Module):
    """A small transformer over hashed words, for the synthetic world (no tokenizer files needed).

    Words map to buckets by a stable hash, so the same caption always gives the same tokens.
    Seeded random init; trainable, or frozen as a fixed embedding of captions.
    """

    def __init__(self, dim: int = 64, num_buckets: int = 4096, max_length: int = 32, num_layers: int = 1,
                 num_heads: int = 4, seed: int = 0):
        super().__init__()
        self.dim, self.num_buckets, self.max_length = dim, num_buckets, max_length
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            self.token_embedding = nn.Embedding(num_buckets, dim)
            self.position_embedding = nn.Parameter(torch.randn(max_length, dim) * 0.02)
            layer = nn.TransformerEncoderLayer(dim, num_heads, 4 * dim, dropout=0.0, batch_first=True,
                                               norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def tokenize(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            words = prompt.lower().split()[: self.max_length] or [""]
            for col, word in enumerate(words):
                digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
                ids[row, col] = int.from_bytes(digest, "little") % self.num_buckets
            mask[row, : len(words)] = True
        return ids, mask

    def encode(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(prompts)
        device = self.token_embedding.weight.device
        ids, mask = ids.to(device), mask.to(device)
        x = self.token_embedding(ids) + self.position_embedding
        x = self.encoder(x, src_key_padding_mask=~mask)
        return x * mask.unsqueeze(-1), mask


class SDXLAutoencoder(nn.Module):
    """The SDXL VAE (diffusers AutoencoderKL): 8x down, 4 channels."""

    latent_channels = 4
    downsample = 8

    def __init__(self, name_or_path: str = "stabilityai/sdxl-vae", dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", subfolder: str | None = None):
        super().__init__()
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(name_or_path, subfolder=subfolder, torch_dtype=dtype).to(device).eval()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist
        return posterior.mean, posterior.std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae.device, self.vae.dtype)).sample.clamp(-1, 1)


class IdentityAutoencoder(nn.Module):
    """Pixel space as its own latent space (std 0): lets the synthetic world train without a VAE."""

    downsample = 1

    def __init__(self, channels: int = 3):
        super().__init__()
        self.latent_channels = channels

    def encode(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return images, torch.zeros_like(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)


def build_text_encoder(kind: str, name_or_path: str, max_length: int, **kwargs) -> TextEncoder:
    if kind == "t5":
        return T5TextEncoder(name_or_path, max_length, **kwargs)
    if kind == "small":
        return SmallTextEncoder(max_length=max_length, **kwargs)
    raise ValueError(f"text_encoder.kind: unknown {kind!r}; expected 't5' or 'small'")


def build_autoencoder(kind: str, name_or_path: str, **kwargs) -> Autoencoder:
    if kind == "sdxl_vae":
        return SDXLAutoencoder(name_or_path, **kwargs)
    if kind == "identity":
        return IdentityAutoencoder(**kwargs)
    raise ValueError(f"autoencoder.kind: unknown {kind!r}; expected 'sdxl_vae' or 'identity'")



def text_encoder_from_config(cfg, device, max_length: int | None = None,
                             padding: str = "max_length") -> TextEncoder:
    """The config's text encoder, frozen and in eval mode on `device`. max_length overrides the
    T5 tokenisation length (sampling uses 77, precomputed embeddings data.max_text_len) and padding
    its padding ("longest" when precomputing); the small encoder's length and width are part of its
    architecture, so it always takes text_encoder.max_length and model.text_dim."""
    te = cfg.text_encoder
    if te.kind == "small":
        encoder = build_text_encoder(te.kind, te.name_or_path, te.max_length, dim=cfg.model.text_dim)
    else:
        encoder = build_text_encoder(te.kind, te.name_or_path, max_length or te.max_length, device=device,
                                     padding=padding)
    return encoder.to(device).eval().requires_grad_(False)


def autoencoder_from_config(cfg, device) -> Autoencoder:
    ae = cfg.autoencoder
    if ae.kind == "sdxl_vae":
        return build_autoencoder(ae.kind, ae.name_or_path, device=device)
    return build_autoencoder(ae.kind, ae.name_or_path, channels=cfg.model.latent_channels)
