"""TextRIN: the 0.36B multi-reward conditioned flow network of MIRO ("CADRINTextCond").

Plain modules in the style of DiT's models.py. Module and parameter names follow the released
state dict (patch_extractor, rin_blocks.{i}.retriever_ca, coherence_embedder.{key}_coherence, ...)
so that an importer maps released checkpoints one to one. The released bool "mask" parameters
(cond_mask, registers_coherence_mask, attention_mask_dummy) carry no information and are not kept.

Hot layers go through `kernels` (RMSNorm, QK-norm, SwiGLU) and attention through one function.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn

import kernels
from miro_scale.config import ModelConfig
from miro_scale.models.attention import attention


class RMSNorm(nn.Module):
    """RMSNorm with fp32 statistics (bf16 variance loses precision at these widths)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class FourierFeatures(nn.Module):
    """Random Fourier features cos(2*pi*f*x + phi) * sqrt(2), f ~ N(0, 1), phi ~ U(0, 2*pi); fixed."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels))
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.float(), self.freqs.float()) + self.phases.float()
        return y.cos() * math.sqrt(2)


class SinusoidalFeatures(nn.Module):
    """Transformer-style sin/cos features of a bin index (the paper's appendix form).

    The input is the normalised value in [0, 1]; it is scaled back to the bin index first.
    """

    def __init__(self, num_channels: int, num_bins: int, max_positions: float = 10_000.0):
        super().__init__()
        self.num_bins = num_bins
        exponents = torch.arange(num_channels // 2, dtype=torch.float32) * 2 / num_channels
        self.register_buffer("freqs", (1.0 / max_positions) ** exponents)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.float() * (self.num_bins - 1), self.freqs.float())
        return torch.cat([y.cos(), y.sin()], dim=-1)


class ScalarEmbedder(nn.Module):
    """Scalar -> token: features, standardised per vector, Linear -> SiLU -> Linear.

    Used for the signal level gamma (time) and, one per key, for the reward values.
    """

    def __init__(self, dim: int, expansion: int = 4, features: Optional[nn.Module] = None):
        super().__init__()
        self.encode_time = features if features is not None else FourierFeatures(dim)
        self.map_time_input = nn.Linear(dim, dim * expansion)
        self.map_time_output = nn.Linear(dim * expansion, dim * expansion)
        self.activation = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encode_time(x)
        feats = (feats - feats.mean(-1, keepdim=True)) / feats.std(-1, keepdim=True)
        return self.map_time_output(self.activation(self.map_time_input(feats.to(self.map_time_input.weight.dtype))))


class GeluMLP(nn.Module):
    def __init__(self, dim: int, multiplier: int = 4, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim * multiplier, bias=bias)
        self.activation = nn.GELU()
        self.linear_2 = nn.Linear(dim * multiplier, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.activation(self.linear_1(x)))


def sincos_2d(grid_size: int, dim: int) -> torch.Tensor:
    """[grid_size**2, dim] 2-D sin-cos position table (MAE/DiT): half the channels encode the row,
    half the column, each with SinusoidalFeatures' frequencies; dim must be divisible by 4."""
    rows, cols = torch.meshgrid(torch.arange(grid_size, dtype=torch.float32),
                                torch.arange(grid_size, dtype=torch.float32), indexing="ij")
    exponents = torch.arange(dim // 4, dtype=torch.float32) * 4 / dim
    freqs = (1.0 / 10_000.0) ** exponents
    parts = []
    for position in (rows.reshape(-1), cols.reshape(-1)):
        angles = torch.outer(position, freqs)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)


def swiglu_hidden_dim(dim: int, multiplier: int) -> int:
    """ceil-to-256 of int(2/3 * multiplier * dim), as released."""
    hidden = int(multiplier * dim * 2 / 3)
    return hidden if hidden % 256 == 0 else hidden + 256 - hidden % 256


class SwiGLU(nn.Module):
    def __init__(self, dim: int, multiplier: int = 4, bias: bool = True):
        super().__init__()
        hidden = swiglu_hidden_dim(dim, multiplier)
        self.linear_packed = nn.Linear(dim, 2 * hidden, bias=bias)  # [up | gate]
        self.linear_out = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(kernels.swiglu_packed(self.linear_packed(x)))


class AttentionOp(nn.Module):
    """Self- (packed qkv) or cross- (q, packed kv) attention with optional QK-norm over the head dim."""

    def __init__(self, attention_dim: int, num_heads: int, dim_q: int, dim_kv: int, *, is_self: bool,
                 qkv_bias: bool = False, out_bias: bool = True, qk_norm: Optional[str] = "layer"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = attention_dim // num_heads
        self.is_self = is_self
        if is_self:
            self.qkv = nn.Linear(dim_q, 3 * attention_dim, bias=qkv_bias)
        else:
            self.q = nn.Linear(dim_q, attention_dim, bias=qkv_bias)
            self.kv = nn.Linear(dim_kv, 2 * attention_dim, bias=qkv_bias)
        self.out = nn.Linear(attention_dim, dim_q, bias=out_bias)
        self.qk_norm = qk_norm
        if qk_norm == "layer":
            self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
            self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        elif qk_norm == "rms":
            self.q_norm = RMSNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor, source: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, lq, _ = x.shape
        if self.is_self:
            q, k, v = self.qkv(x).view(b, lq, 3, self.num_heads, self.head_dim).unbind(2)
        else:
            q = self.q(x).view(b, lq, self.num_heads, self.head_dim)
            k, v = self.kv(source).view(b, source.shape[1], 2, self.num_heads, self.head_dim).unbind(2)
        if self.qk_norm is not None:
            q, k = kernels.qk_norm(q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps,
                                   q_bias=getattr(self.q_norm, "bias", None),
                                   k_bias=getattr(self.k_norm, "bias", None), kind=self.qk_norm)
        out = attention(q, k, v, key_padding_mask)
        return self.out(out.reshape(b, lq, -1))


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention (queries normed, sources as they are) then a SwiGLU FFN."""

    def __init__(self, dim_q: int, dim_kv: int, num_heads: int, mlp_multiplier: int, qk_norm: str):
        super().__init__()
        self.initial_to_ln = RMSNorm(dim_q)
        self.ca = AttentionOp(min(dim_q, dim_kv), num_heads, dim_q, dim_kv, is_self=False, qk_norm=qk_norm)
        self.middle_ln = RMSNorm(dim_q)
        self.ffn = SwiGLU(dim_q, mlp_multiplier)

    def forward(self, x: torch.Tensor, source: torch.Tensor,
                source_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.ca(self.initial_to_ln(x), source, source_mask)
        return x + self.ffn(self.middle_ln(x))


class SelfAttentionBlock(nn.Module):
    """Pre-norm self-attention block: RMSNorm/QK-norm/SwiGLU in the RIN core; LayerNorm/GELU MLP,
    qkv bias and layer scale 0.1 in the two conditioning blocks (use_layer_scale)."""

    def __init__(self, dim: int, num_heads: int, mlp_multiplier: int = 4, *, qk_norm: Optional[str],
                 conditioning_style: bool = False):
        super().__init__()
        norm = (lambda d: nn.LayerNorm(d, eps=1e-6)) if conditioning_style else RMSNorm
        self.initial_ln = norm(dim)
        self.sa = AttentionOp(dim, num_heads, dim, dim, is_self=True, qkv_bias=conditioning_style,
                              qk_norm=None if conditioning_style else qk_norm)
        self.middle_ln = norm(dim)
        self.ffn = GeluMLP(dim, mlp_multiplier) if conditioning_style else SwiGLU(dim, mlp_multiplier)
        self.use_layer_scale = conditioning_style
        if conditioning_style:
            self.layer_scale_1 = nn.Parameter(torch.full((dim,), 0.1))
            self.layer_scale_2 = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        attn = self.sa(self.initial_ln(x), key_padding_mask=key_padding_mask)
        if self.use_layer_scale:
            x = x + self.layer_scale_1 * attn
            return x + self.layer_scale_2 * self.ffn(self.middle_ln(x))
        x = x + attn
        return x + self.ffn(self.middle_ln(x))


class RINBlock(nn.Module):
    """(1) latents read the conditioning tokens, (2) read the data, (3) process, (4) write to the data."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.retrieve_cond = CrossAttentionBlock(cfg.latents_dim, cfg.latents_dim, cfg.read_write_heads,
                                                 cfg.latent_mlp_multiplier, cfg.qk_norm)
        self.retriever_ca = CrossAttentionBlock(cfg.latents_dim, cfg.data_dim, cfg.read_write_heads,
                                                cfg.latent_mlp_multiplier, cfg.qk_norm)
        self.processer_sa = nn.ModuleList([
            SelfAttentionBlock(cfg.latents_dim, cfg.compute_heads, cfg.latent_mlp_multiplier, qk_norm=cfg.qk_norm)
            for _ in range(cfg.num_processing_layers)
        ])
        self.writer_ca = CrossAttentionBlock(cfg.data_dim, cfg.latents_dim, cfg.read_write_heads,
                                             cfg.data_mlp_multiplier, cfg.qk_norm)

    def forward(self, data: torch.Tensor, latents: torch.Tensor, cond: torch.Tensor,
                cond_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        latents = self.retrieve_cond(latents, cond, cond_mask)
        latents = self.retriever_ca(latents, data)
        for block in self.processer_sa:
            latents = block(latents)
        data = self.writer_ca(data, latents)
        return data, latents


class TextRIN(nn.Module):
    """v = TextRIN(x_t, gamma, text tokens, reward values, previous latents) -> (v, latents)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        p, c = cfg.patch_size, cfg.latent_channels
        num_patches = (cfg.latent_size // p) ** 2
        self.reward_keys = list(cfg.reward_keys)

        k = cfg.patch_context
        if k > 1:  # overlapping patches: a k x k block of patches around each token's own
            self.patch_extractor = nn.Conv2d(c, cfg.data_dim, k * p, stride=p, padding=(k // 2) * p)
        else:
            self.patch_extractor = nn.Linear(c * p * p, cfg.data_dim)
        self.data_pos_embedding = nn.Parameter(torch.zeros(num_patches, cfg.data_dim))
        self.data_ln = RMSNorm(cfg.data_dim)
        self.latents = nn.Parameter(torch.zeros(cfg.num_latents, cfg.latents_dim))
        embed_dim = cfg.latents_dim // 4
        self.time_embedder = ScalarEmbedder(embed_dim)

        # Conditioning sequence [time, rewards, registers, text]; rewards+registers+text pass
        # through `cond_blocks` self-attention blocks first.
        self.transformers_blocks = nn.ModuleList([
            SelfAttentionBlock(cfg.latents_dim, cfg.cond_heads, 4, qk_norm=None, conditioning_style=True)
            for _ in range(cfg.cond_blocks)
        ])
        self.coherence_embedder = nn.ModuleDict({
            f"{key}_coherence": ScalarEmbedder(embed_dim, features=self._reward_features(embed_dim))
            for key in self.reward_keys
        })
        if self.reward_keys:
            self.coherence_positional_embedding = nn.Parameter(torch.zeros(len(self.reward_keys), cfg.latents_dim))
        self.map_text_tokens = nn.Linear(cfg.text_dim, cfg.latents_dim)
        self.text_registers = nn.Parameter(torch.zeros(cfg.num_text_registers, cfg.latents_dim))

        if cfg.self_conditioning:
            self.ln_previous_1 = nn.LayerNorm(cfg.latents_dim, eps=1e-6)
            self.linear_previous = GeluMLP(cfg.latents_dim, cfg.latent_mlp_multiplier)
            self.ln_previous_2 = nn.LayerNorm(cfg.latents_dim, eps=1e-6)

        self.rin_blocks = nn.ModuleList([RINBlock(cfg) for _ in range(cfg.num_blocks)])
        # with patch_context k, each token writes a (k p) x (k p) block; overlapping blocks are summed
        self.map_tokens_to_patches = nn.Sequential(RMSNorm(cfg.data_dim), nn.Linear(cfg.data_dim, c * (k * p) ** 2))
        self.initialize_weights()

    def _reward_features(self, dim: int) -> nn.Module:
        if self.cfg.reward_embedding == "sinusoidal":
            return SinusoidalFeatures(dim, self.cfg.reward_bins)
        return FourierFeatures(dim)

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        embeddings = [self.data_pos_embedding, self.latents, self.text_registers]
        if self.reward_keys:
            embeddings.append(self.coherence_positional_embedding)
        for param in embeddings:
            nn.init.trunc_normal_(param, std=0.02, a=-0.04, b=0.04)
        if self.cfg.data_pos_init == "sincos":
            with torch.no_grad():
                grid = self.cfg.latent_size // self.cfg.patch_size
                self.data_pos_embedding.copy_(sincos_2d(grid, self.cfg.data_dim))
        if self.cfg.self_conditioning:  # zero gate: self-conditioning starts as a no-op
            nn.init.zeros_(self.ln_previous_2.weight)
            nn.init.zeros_(self.ln_previous_2.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """b c (h p1) (w p2) -> b (h w) (p1 p2 c)"""
        b, c, h, w = x.shape
        p = self.cfg.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b = x.shape[0]
        p, c = self.cfg.patch_size, self.cfg.latent_channels
        x = x.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h, w)

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, data_dim] patch tokens (before RMSNorm and positions)."""
        if self.cfg.patch_context > 1:
            return self.patch_extractor(x).flatten(2).transpose(1, 2)
        return self.patch_extractor(self.patchify(x))

    def tokens_to_image(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[B, N, C * (k p)^2] output blocks -> [B, C, H, W]; overlapping blocks (k > 1) are summed."""
        k, p = self.cfg.patch_context, self.cfg.patch_size
        if k > 1:
            return nn.functional.fold(tokens.transpose(1, 2), (h, w), k * p, stride=p, padding=(k // 2) * p)
        return self.unpatchify(tokens, h, w)

    def embed_rewards(self, rewards: torch.Tensor) -> torch.Tensor:
        """[B, N] reward values in [0, 1] -> [B, N, D] tokens. A dropped reward (training) gives a
        zero embedding plus the key's position vector; so does a NaN one at inference (the model is
        told nothing about that reward). A NaN reward in training is embedded as value 0, as the
        release did (``model.nan_reward_in_training: zero_token`` treats it as at inference)."""
        b = rewards.shape[0]
        keep = ~torch.isnan(rewards)
        if self.training and self.cfg.nan_reward_in_training == "value0":
            keep = torch.ones_like(keep)
        if self.training and self.cfg.reward_dropout > 0:
            drop = torch.rand(b, len(self.reward_keys), device=rewards.device) < self.cfg.reward_dropout
            all_dropped = drop.all(dim=1, keepdim=True)
            # Keep one random reward where every one was dropped, as released.
            rescue = torch.zeros_like(drop).scatter_(
                1, torch.randint(0, len(self.reward_keys), (b, 1), device=rewards.device), True)
            keep = keep & ~torch.where(all_dropped, ~rescue, drop)
        values = torch.nan_to_num(rewards.float(), nan=0.0)
        tokens = torch.stack([
            self.coherence_embedder[f"{key}_coherence"](values[:, i]) for i, key in enumerate(self.reward_keys)
        ], dim=1)
        tokens = tokens * keep.unsqueeze(-1).to(tokens.dtype)
        return tokens + self.coherence_positional_embedding.unsqueeze(0)

    def embed_conditioning(self, time: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                           rewards: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        b = text.shape[0]
        parts = []
        if self.reward_keys:
            if rewards is None or rewards.shape != (b, len(self.reward_keys)):
                got = None if rewards is None else tuple(rewards.shape)
                raise ValueError(f"rewards must be [batch, {len(self.reward_keys)}] for keys "
                                 f"{self.reward_keys}, got {got}")
            parts.append(self.embed_rewards(rewards))
        parts.append(self.text_registers.unsqueeze(0).expand(b, -1, -1))
        tokens = self.map_text_tokens(text.to(self.map_text_tokens.weight.dtype))
        seq = torch.cat([p.to(tokens.dtype) for p in parts] + [tokens], dim=1)
        always_visible = torch.ones(b, seq.shape[1] - text.shape[1] + 1, dtype=torch.bool, device=text.device)
        mask = torch.cat([always_visible[:, 1:], text_mask.to(torch.bool)], dim=1)
        for block in self.transformers_blocks:
            seq = block(seq, mask)
        cond = torch.cat([time.unsqueeze(1).to(seq.dtype), seq], dim=1)
        return cond, torch.cat([always_visible[:, :1], mask], dim=1)

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                rewards: Optional[torch.Tensor] = None,
                previous_latents: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: [B, C, H, W] scaled noisy latents; gamma: [B] signal level; text: [B, L, text_dim];
        text_mask: [B, L] bool; rewards: [B, N] in reward_keys order; previous_latents: [B, M, D]
        from a previous pass (zeros when None). Returns the prediction and the final latents."""
        b, _, h, w = x.shape
        data = self.data_ln(self.embed_patches(x)) + self.data_pos_embedding.unsqueeze(0)
        time = self.time_embedder(gamma)
        cond, cond_mask = self.embed_conditioning(time, text, text_mask, rewards)
        latents = self.latents.unsqueeze(0) + time.unsqueeze(1)
        if self.cfg.self_conditioning:
            if previous_latents is None:
                previous_latents = torch.zeros_like(latents)
            previous_latents = previous_latents.to(latents.dtype)
            latents = latents + self.ln_previous_2(
                previous_latents + self.linear_previous(self.ln_previous_1(previous_latents)))
        for block in self.rin_blocks:
            data, latents = block(data, latents, cond, cond_mask)
        return self.tokens_to_image(self.map_tokens_to_patches(data), h, w), latents


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
