#!/usr/bin/env python
r"""Precompute VAE latents and text embeddings of every sample (the encode stage).

  torchrun --nproc_per_node 8 preprocessing/encode.py --shards 'data/{00000..09999}.tar' \
      --captions captions/ --config configs/miro_16m.json --out encoded/

Writes encoded/{stem}.encoded.tar per shard: latent_mean.npy / latent_std.npy (fp16 posterior of
the release's 256 px centre crop) and text_emb[_<caption>].npy (fp16 token embeddings trimmed to the
caption's tokens, up to data.max_text_len) for each caption source of data.caption_source (txt and
the caption stage's `long` in the 16M recipe). The encoders come from the training config, so
what is precomputed is what that config trains on; weights load from a local path or hub id
(--set autoencoder.name_or_path=/ckpt/sdxl-vae text_encoder.name_or_path=/ckpt/flan-t5-xl).
Runs on the shard-job runner: resumable, split over RANK/WORLD_SIZE, failed shards retried by the
next run (exit status 1 while any shard is not done). See miro_scale/data/encode.py.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "miro_16m.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, nargs="+", help="brace patterns / globs / paths / directories")
    p.add_argument("--out", required=True, help="output directory of the encoded sidecars")
    p.add_argument("--captions", default=None, help="the caption stage's output directory (for synthetic captions)")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="training config whose autoencoder, text_encoder and data sections say what to encode")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--caption-sources", default=None,
                   help="captions to embed (default: the config's data.caption_source names)")
    p.add_argument("--batch-size", type=int, default=64, help="images / captions per encoder call")
    p.add_argument("--num-workers", type=int, default=4, help="decode threads per process")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="autocast dtype on CUDA")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--retries", type=int, default=1, help="retries of a failed shard within this run")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    import torch

    from miro_scale import shard_jobs
    from miro_scale.config import ConfigError, config_to_dict, load_config
    from miro_scale.data.encode import INDEX, OUTPUT, STAGE, EncodeSettings, ShardEncoder
    from miro_scale.data.plan import resolve_shards
    from miro_scale.models.encoders import autoencoder_from_config, text_encoder_from_config

    shard_jobs.setup_logging()
    try:
        cfg = load_config(a.config, a.set)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}")
    try:
        shards = resolve_shards(a.shards)
    except FileNotFoundError as e:
        raise SystemExit(f"--shards: {e}")
    sources = ([c.strip() for c in a.caption_sources.split(",") if c.strip()] if a.caption_sources
               else [k for k, w in cfg.data.caption_mix().items() if w > 0])
    if a.device:
        device = torch.device(a.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    settings = EncodeSettings(caption_sources=sources, image_size=cfg.autoencoder.image_size,
                              max_text_len=cfg.data.max_text_len, batch_size=a.batch_size,
                              num_workers=a.num_workers, precision=a.precision)
    params = {"autoencoder": config_to_dict(cfg.autoencoder), "text_encoder": config_to_dict(cfg.text_encoder),
              "caption_sources": sources, "max_text_len": cfg.data.max_text_len, "precision": a.precision,
              "captions_dir": os.path.abspath(a.captions) if a.captions else None}
    state = {}  # encoders load on the first shard that needs them (a rerun may need none)

    def process(task):
        if "encoder" not in state:
            ae = autoencoder_from_config(cfg, device)
            te = text_encoder_from_config(cfg, device, max_length=cfg.data.max_text_len, padding="longest")
            state["encoder"] = ShardEncoder(ae, te, settings, device)
        return state["encoder"].encode_shard(task, a.captions)

    job = shard_jobs.ShardJob(stage=STAGE, out_dir=a.out, outputs=[OUTPUT], optional_outputs=[INDEX],
                              params=params, process=process, retries=a.retries, progress=not a.no_progress)
    return shard_jobs.report(shard_jobs.run(job, shards))


if __name__ == "__main__":
    sys.exit(main())
