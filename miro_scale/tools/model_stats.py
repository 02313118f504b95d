"""Parameter counts and forward FLOPs of a config's model, built on the meta device (no memory).

    python -m miro_scale.tools.model_stats --config configs/miro_16m.json --resolution 256 --text-len 77

"""
from __future__ import annotations

import argparse

from miro_scale.config import load_config
from miro_scale.models.flops import build_meta_model, forward_flops, parameter_counts, training_flops_per_sample


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
