#!/usr/bin/env python
r"""Join each source shard with its sidecars into a training shard (the shard stage).

  torchrun --nproc_per_node 8 preprocessing/shard.py --shards 'data/{00000..09999}.tar' \
      --captions captions/ --encoded encoded/ --bins bins/ --out train/ [--images drop]
  python preprocessing/shard.py --shards 'data/*.tar' --index-only      # DALI .idx files + manifest

One output shard per source shard (same stem, same keys, same order): the source's members, json
captions/rewards/rewards_by_caption from the caption and bin stages, and the encode stage's
latents and text embeddings (see miro_scale/data/join.py and docs/data.md). Runs on the shard-job
runner: split over RANK/WORLD_SIZE, resumable per shard, memory bounded by one shard; a sample
lacking a sidecar is skipped, counted and named in the shard's done record. train/manifest.json is
written only when every shard is done, and the loaders refuse the directory until then. Re-binning
rewrites the output shards (their done records depend on the bins); use --images drop for
latent-mode training to leave the image bytes out.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, nargs="+", help="source shards: brace patterns / globs / paths / directories")
    p.add_argument("--out", default=None, help="output directory of the training shards")
    p.add_argument("--captions", default=None, help="the caption stage's output directory")
    p.add_argument("--encoded", default=None, help="the encode stage's output directory (latents, text embeddings)")
    p.add_argument("--bins", default=None, help="the bin stage's output directory (bins.json + rewards sidecars)")
    p.add_argument("--images", default="keep", choices=["keep", "drop"],
                   help="copy the image bytes (image-mode / DALI training) or leave them out (latent mode)")
    p.add_argument("--index-only", action="store_true",
                   help="only write DALI .idx files and a manifest.json beside existing shards")
    p.add_argument("--retries", type=int, default=1, help="retries of a failed shard within this run")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    from miro_scale import shard_jobs
    from miro_scale.data.join import STAGE, JoinSettings, join_shard, write_dataset_manifest
    from miro_scale.data.plan import resolve_shards
    from miro_scale.data.writer import MANIFEST_NAME

    shard_jobs.setup_logging()
    try:
        shards = resolve_shards(a.shards)
    except FileNotFoundError as e:
        raise SystemExit(f"--shards: {e}")
    if a.index_only:
        from miro_scale.data.writer import index_shards
        entries = index_shards(shards, progress=not a.no_progress)
        print(f"indexed {len(entries)} shards, {sum(e['num_samples'] for e in entries)} samples")
        return 0
    if not a.out:
        p.error("--out is required (unless --index-only)")
    if a.images == "drop" and not a.encoded:
        p.error("--images drop leaves nothing to train on without --encoded (precomputed latents)")
    settings = JoinSettings(captions_dir=a.captions, encoded_dir=a.encoded, bins_dir=a.bins, images=a.images)
    bins_doc = settings.bins_doc()
    out = Path(a.out)
    rank, _ = shard_jobs.dist_env()
    if rank == 0:  # a manifest says "complete": none while shards may change
        (out / MANIFEST_NAME).unlink(missing_ok=True)
    job = shard_jobs.ShardJob(stage=STAGE, out_dir=str(out), outputs=["{stem}.tar"],
                              optional_outputs=["{stem}.idx"], params=settings.params(),
                              process=lambda task: join_shard(task, settings, bins_doc),
                              retries=a.retries, progress=not a.no_progress)
    summary = shard_jobs.run(job, shards)
    if summary is not None and summary["complete"]:
        path = write_dataset_manifest(str(out), shards, job.stem_of, settings, bins_doc)
        print(f"wrote {path}: {summary['counts'].get('written', 0)} samples in {len(shards)} shards")
    return shard_jobs.report(summary)


if __name__ == "__main__":
    sys.exit(main())
