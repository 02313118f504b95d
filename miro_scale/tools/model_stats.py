"""Parameter counts and forward FLOPs of a config's model, built on the meta device (no memory).

    python -m miro_scale.tools.model_stats --config configs/miro_16m.json --resolution 256 --text-len 77

FLOPs come from torch's FlopCounterMode (matmuls and attention; elementwise ops are not counted,
which is the convention MFU figures use).
"""
from __future__ import annotations

import argparse
from typing import Dict

import torch
from torch.utils.flop_counter import FlopCounterMode

from miro_scale.config import MiroConfig, load_config
from miro_scale.flow import MiroFlowModel


def build_meta_model(cfg: MiroConfig) -> MiroFlowModel:
    with torch.device("meta"):
        return MiroFlowModel(cfg.model, cfg.flow)


def parameter_counts(model: torch.nn.Module) -> Dict[str, int]:
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.net.named_children()}
    counts["<direct parameters>"] = sum(p.numel() for p in model.net.parameters(recurse=False))
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def forward_flops(cfg: MiroConfig, latent_size: int, text_len: int, batch_size: int = 1) -> int:
    """FLOPs of one forward pass of the network for `batch_size` samples."""
    model = build_meta_model(cfg)
    c = cfg.model.latent_channels
    with torch.device("meta"):
        x = torch.empty(batch_size, c, latent_size, latent_size)
        gamma = torch.empty(batch_size)
        text = torch.empty(batch_size, text_len, cfg.model.text_dim)
        mask = torch.ones(batch_size, text_len, dtype=torch.bool)
        rewards = torch.empty(batch_size, len(cfg.model.reward_keys))
    with FlopCounterMode(display=False) as counter:
        model(x, gamma, text, mask, rewards)
    return counter.get_total_flops()


def training_flops_per_sample(cfg: MiroConfig, text_len: int) -> int:
    """Forward + backward (3x forward) + the self-conditioning forward that precedes it."""
    fwd = forward_flops(cfg, cfg.model.latent_size, text_len)
    self_cond = fwd if cfg.model.self_conditioning and cfg.flow.self_cond_rate > 0 else 0
    return 3 * fwd + self_cond


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", nargs="*", default=[])
    parser.add_argument("--resolution", type=int, default=None,
                        help="image resolution in pixels (default: the config's autoencoder.image_size)")
    parser.add_argument("--downsample", type=int, default=None,
                        help="autoencoder downsampling factor (default: 8 for sdxl_vae, 1 for identity)")
    parser.add_argument("--text-len", type=int, default=77)
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    resolution = args.resolution or cfg.autoencoder.image_size
    downsample = args.downsample or (8 if cfg.autoencoder.kind == "sdxl_vae" else 1)
    if resolution % (downsample * cfg.model.patch_size):
        raise SystemExit(f"--resolution {resolution} is not a multiple of downsample x patch "
                         f"({downsample} x {cfg.model.patch_size})")
    latent_size = resolution // downsample
    if latent_size != cfg.model.latent_size:  # positional embeddings are sized by the config
        cfg.model.latent_size = latent_size

    counts = parameter_counts(build_meta_model(cfg))
    print(f"{'module':<32}{'parameters':>16}")
    for name, n in counts.items():
        print(f"{name:<32}{n:>16,}")
    fwd = forward_flops(cfg, latent_size, args.text_len)
    print(f"\nforward at {resolution}px ({latent_size}x{latent_size} latents, "
          f"{(latent_size // cfg.model.patch_size) ** 2} data tokens), text {args.text_len} tokens:")
    print(f"  {fwd / 1e9:,.2f} GFLOP per sample forward")
    print(f"  {training_flops_per_sample(cfg, args.text_len) / 1e9:,.2f} GFLOP per sample per training step "
          f"(fwd + bwd + self-conditioning pass)")


if __name__ == "__main__":
    main()
