#!/usr/bin/env python
"""Score webdataset shards with reward models (thin CLI over miro_scale.rewards.scoring).

  torchrun --nproc_per_node 8 preprocessing/score.py --shards 'data/{00000..00009}.tar' \
      --rewards aesthetic,hpsv2,pickscore,sciscore,image_reward --out scores/

Reruns skip finished shards. See miro_scale/rewards/scoring.py for the output format.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from miro_scale.rewards.registry import canonical_key  # noqa: E402
from miro_scale.data.plan import resolve_shards  # noqa: E402
from miro_scale.rewards.scoring import ScoreConfig, parse_groups, run_scoring  # noqa: E402


def _kv(s: str, what: str) -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in (s or "").split(","))):
        if "=" not in part:
            raise SystemExit(f"{what}: expected key=value, got {part!r}")
        k, v = part.split("=", 1)
        out[canonical_key(k)] = int(v)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, nargs="+", help="brace patterns / globs / paths (comma-separated ok)")
    p.add_argument("--rewards", required=True, help="comma-separated reward keys or aliases")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--groups", default=None,
                   help="passes of rewards, ';'-separated groups of ','-separated keys (models of one group "
                        "are loaded together); default: one pass")
    p.add_argument("--captions", default="txt", help="caption sources: txt and/or json captions.<name> entries")
    p.add_argument("--variant", default="pretrained", choices=["pretrained", "random", "tiny"])
    p.add_argument("--reward-config", default=None, help="JSON file {reward_key: {builder kwargs}} (weights paths...)")
    p.add_argument("--batch-size", default="", help="per-reward batch sizes: key=N,key=N")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=4, help="decode threads per process")
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"], help="autocast dtype on GPU")
    p.add_argument("--weights-dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="dtype of the weights (bf16 halves memory)")
    p.add_argument("--draft-decode", action="store_true",
                   help="decode big JPEGs at a reduced DCT scale (>= the largest view): faster, slightly different")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    rewards = [canonical_key(k) for k in a.rewards.split(",") if k.strip()]
    shards = resolve_shards(a.shards)
    if not shards:
        raise SystemExit(f"--shards {a.shards}: no shard matched")
    missing = [s for s in shards if not os.path.exists(s)]
    if missing:
        raise SystemExit(f"--shards: {len(missing)} shard(s) do not exist, e.g. {missing[:3]}")
    reward_kwargs = {}
    if a.reward_config:
        with open(a.reward_config) as f:
            reward_kwargs = {canonical_key(k): v for k, v in json.load(f).items()}
    cfg = ScoreConfig(shards=shards, rewards=rewards, out_dir=a.out, groups=parse_groups(a.groups, rewards),
                      captions=[c.strip() for c in a.captions.split(",") if c.strip()], variant=a.variant,
                      reward_kwargs=reward_kwargs, batch_sizes=_kv(a.batch_size, "--batch-size"),
                      chunk_size=a.chunk_size, num_workers=a.num_workers, device=a.device,
                      precision=a.precision, weights_dtype=a.weights_dtype, draft_decode=a.draft_decode,
                      progress=not a.no_progress, debug_delay=a.debug_delay)
    summary = run_scoring(cfg)
    if summary is not None:
        print(json.dumps({k: summary[k] for k in ("num_shards", "shards_done", "num_samples", "num_ok",
                                                  "failures_by_kind", "rewards")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
