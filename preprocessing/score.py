#!/usr/bin/env python
r"""Score webdataset shards with reward models (the score stage; CLI over miro_scale.rewards.scoring).

  torchrun --nproc_per_node 8 preprocessing/score.py --shards 'data/{00000..00009}.tar' \
      --rewards clip,aesthetic,image_reward,pickscore,hpsv2,vqa,sciscore \
      --captions captions/ --caption-sources txt,long --out scores/

Writes scores/{stem}.scores.parquet per shard (see miro_scale/rewards/scoring.py for the columns).
Reruns skip finished shards; a failed shard is named in scores/score.summary.json and retried by the
next run; the exit status is 1 while any shard is not done.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from miro_scale.data.plan import resolve_shards  # noqa: E402
from miro_scale.rewards.registry import canonical_key  # noqa: E402
from miro_scale.rewards.scoring import ScoreConfig, parse_groups, run_scoring  # noqa: E402
from miro_scale.rewards.units import RELEASE_CAPTIONS, SCALES  # noqa: E402
from miro_scale.shard_jobs import report, setup_logging  # noqa: E402


def _kv(s: str, what: str, value=int) -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in (s or "").split(","))):
        if "=" not in part:
            raise SystemExit(f"{what}: expected key=value, got {part!r}")
        k, v = part.split("=", 1)
        out[canonical_key(k)] = value(v.strip())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, nargs="+", help="brace patterns / globs / paths (comma-separated ok)")
    p.add_argument("--rewards", required=True, help="comma-separated reward keys or aliases")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--groups", default=None,
                   help="passes of rewards, ';'-separated groups of ','-separated keys (models of one group "
                        "are loaded together); default: one pass")
    p.add_argument("--captions", default=None,
                   help="the caption stage's output directory (preprocessing/caption.py --out)")
    p.add_argument("--caption-sources", default="txt",
                   help="captions to score: txt and/or names of json/sidecar captions (e.g. txt,long)")
    p.add_argument("--variant", default="pretrained", choices=["pretrained", "random", "tiny"])
    p.add_argument("--reward-config", default=None, help="JSON file {reward_key: {builder kwargs}} (weights paths...)")
    p.add_argument("--batch-size", default="", help="per-reward batch sizes: key=N,key=N")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=4, help="decode threads per process")
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="auto",
                   help="weights + autocast dtype per reward: auto (the policy file on GPU, fp32 on CPU), "
                        "fp32, bf16, fp16, or key=dtype,key=dtype (others auto)")
    p.add_argument("--precision-policy", default=None,
                   help="policy file for auto (default configs/score_precision.json; written by "
                        "preprocessing/bench_precision.py --write-policy)")
    p.add_argument("--scale", default="raw", choices=list(SCALES),
                   help="units of the written scores: raw model outputs, or release (what MIRO binned: "
                        "clip/100, aesthetic/10, (image_reward+2)/4, pick/100, sciscore/100)")
    p.add_argument("--caption-for", default="",
                   help="score a reward on one caption source only: key=source,key=source")
    p.add_argument("--empty-captions", default="skip", choices=["skip", "score"],
                   help="an empty caption: skip (NaN, status empty_caption) or score it (as the release did)")
    p.add_argument("--as-released", action="store_true",
                   help="score as MIRO's release did: --scale release, the short caption for image_reward, "
                        "pickscore, hpsv2 and sciscore and the long one for clip and vqa (sources named "
                        "short and long), empty captions scored, VQAScore on JPEG-75 images and captions "
                        "without code fences and <...> tags")
    p.add_argument("--draft-decode", action="store_true",
                   help="decode big JPEGs at a reduced DCT scale (>= the largest view): faster, slightly different")
    p.add_argument("--retries", type=int, default=1, help="retries of a failed shard within this run")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    setup_logging()
    rewards = [canonical_key(k) for k in a.rewards.split(",") if k.strip()]
    try:
        shards = resolve_shards(a.shards)
    except FileNotFoundError as e:
        raise SystemExit(f"--shards: {e}")
    reward_kwargs = {}
    if a.reward_config:
        with open(a.reward_config) as f:
            reward_kwargs = {canonical_key(k): v for k, v in json.load(f).items()}
    caption_sources = [c.strip() for c in a.caption_sources.split(",") if c.strip()]
    caption_for = _kv(a.caption_for, "--caption-for", str)
    scale, empty_captions = a.scale, a.empty_captions
    if a.as_released:
        caption_for = {k: v for k, v in RELEASE_CAPTIONS.items() if k in rewards} | caption_for
        used = list(dict.fromkeys(caption_for.values()))
        caption_sources = used or caption_sources
        scale, empty_captions = "release", "score"
        if "vqa_score" in rewards:  # JPEG-75 images, captions without code fences and <...> tags
            reward_kwargs.setdefault("vqa_score", {}).setdefault("as_released", True)
    cfg = ScoreConfig(shards=shards, rewards=rewards, out_dir=a.out, groups=parse_groups(a.groups, rewards),
                      caption_sources=caption_sources, caption_for=caption_for, scale=scale,
                      empty_captions=empty_captions, captions_dir=a.captions, variant=a.variant, reward_kwargs=reward_kwargs,
                      batch_sizes=_kv(a.batch_size, "--batch-size"), chunk_size=a.chunk_size,
                      num_workers=a.num_workers, device=a.device, precision=a.precision,
                      precision_policy=a.precision_policy, draft_decode=a.draft_decode, retries=a.retries,
                      progress=not a.no_progress, debug_delay=a.debug_delay)
    summary = run_scoring(cfg)
    return report(summary, extra={"images_per_s": summary["images_per_s"]} if summary else None)


if __name__ == "__main__":
    sys.exit(main())
