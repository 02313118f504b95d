#!/usr/bin/env python
r"""How far bf16 and fp16 move each reward's bins, and the cheapest precision that keeps them.

  python preprocessing/bench_precision.py --shards 'data/{00000..00003}.tar' --num-samples 4096 \
      --rewards clip,aesthetic,image_reward,pickscore,hpsv2,vqa,sciscore --reward-config weights.json \
      --captions captions/ --as-released --out benchmarks/results --write-policy configs/score_precision.json

Scores the same samples with each reward in fp32, bf16 and fp16 (weights in that dtype, autocast to
it: what preprocessing/score.py --precision runs), calibrates 64 quantile bins on the fp32 scores as
the bin stage does, and counts the samples whose bin moves by more than one (NaN/inf counts as a
move). The cheapest precision moving fewer than --max-moved (0.5%) of them is the reward's choice;
--write-policy merges the choices into the policy that `score.py --precision auto` reads (only for
released weights: random weights say nothing about trained activations). Prints a table and writes
bench_precision.json. Without --shards it scores a generated fixed set (smooth random images and
word captions) for smoke tests.
"""
import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from miro_scale.rewards import precision as prec  # noqa: E402
from miro_scale.rewards.registry import build_reward, canonical_key  # noqa: E402
from miro_scale.rewards.scoring import ScoreConfig, ShardScorer, _prepare  # noqa: E402
from miro_scale.rewards.units import RELEASE_CAPTIONS  # noqa: E402
from miro_scale.tools.bench_report import run_facts, write_report  # noqa: E402


def generated_samples(n: int, seed: int = 0):
    """A fixed set without data: smooth random colour fields at 512 x 384 px and word captions, as
    (key, members, sidecar captions) like a shard's samples."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    words = ("a photo of red blue green small large dog cat car street tree house sky water person wooden "
             "table next to under above left right shiny vintage bright dark").split()
    for i in range(n):
        low = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(low).resize((512, 384), Image.BICUBIC).save(buf, "PNG")
        cap = " ".join(rng.choice(words, size=int(rng.integers(3, 40))))
        yield f"gen{i:06d}", {"png": buf.getvalue(), "txt": cap.encode()}, {"short": cap, "long": cap}


def shard_samples(shards, n: int, captions_dir):
    """The first ``n`` samples of the shards as (key, members, sidecar captions)."""
    from miro_scale.data.sidecars import iter_members, open_source_shard, read_captions
    from miro_scale.shard_jobs import shard_stem

    out = []
    for shard in shards:
        caps = read_captions(captions_dir, shard_stem(shard), shard) or {}
        for key, members in iter_members(shard, open_source_shard(shard)):
            out.append((key, members, caps.get(key)))
            if len(out) == n:
                return out
    return out


def score_all(key, variant, precision, device, cfg, samples, reward_kwargs, batch_size, pool):
    """Scores of every sample in one precision, through the scorer's own batching and autocast;
    samples it cannot use (bad image, missing caption) are NaN in every precision alike."""
    reward = build_reward(key, variant, device=device, dtype=prec.DTYPES[precision], **reward_kwargs)
    scorer = ShardScorer([reward], cfg, device, {key: precision})
    rows = {c: [float("nan")] * len(samples) for c in scorer.cols}
    rows.update(status=["ok"] * len(samples), error=[None] * len(samples))
    timing = {key: [0.0, 0]}

    def prepare(sample):
        k, members, caps = sample
        return _prepare(k, members, k, [reward.view], scorer.sources, None, caps, allow_empty=True)

    for start in range(0, len(samples), batch_size):
        items = list(pool.map(prepare, samples[start:start + batch_size]))
        scorer._run_reward(reward, items, rows, start, timing)
    return {c: np.asarray(rows[c], np.float64) for c in scorer.cols}, timing[key][0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rewards", default="aesthetic,hpsv2,pickscore,sciscore,image_reward,clip,vqa")
    p.add_argument("--shards", nargs="+", default=None, help="source shards (default: a generated set)")
    p.add_argument("--captions", default=None, help="the caption stage's output directory")
    p.add_argument("--caption-sources", default="txt")
    p.add_argument("--as-released", action="store_true",
                   help="score each reward on the caption the release used (short / long)")
    p.add_argument("--num-samples", type=int, default=2048)
    p.add_argument("--num-bins", type=int, default=prec.NUM_BINS)
    p.add_argument("--max-moved", type=float, default=prec.MAX_MOVED,
                   help="largest fraction of samples allowed to move by more than one bin")
    p.add_argument("--precisions", default="bf16,fp16", help="compared with fp32")
    p.add_argument("--variant", default="pretrained", choices=["pretrained", "random", "tiny"])
    p.add_argument("--reward-config", default=None, help="JSON {reward_key: {builder kwargs}} (weights paths...)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results", help="directory of bench_precision.json")
    p.add_argument("--write-policy", default=None, help="merge the choices into this policy file")
    a = p.parse_args(argv)
    if a.write_policy and a.variant != "pretrained":
        raise SystemExit("--write-policy needs --variant pretrained: random weights say nothing about the "
                         "activations of the trained models")
    keys = [canonical_key(k) for k in a.rewards.split(",") if k.strip()]
    others = [x.strip() for x in a.precisions.split(",") if x.strip()]
    for x in others:
        if x not in prec.DTYPES or x == "fp32":
            raise SystemExit(f"--precisions: {x!r} is not bf16 or fp16")
    device = torch.device(a.device)
    reward_kwargs = {}
    if a.reward_config:
        reward_kwargs = {canonical_key(k): v for k, v in json.loads(Path(a.reward_config).read_text()).items()}
    sources = [c.strip() for c in a.caption_sources.split(",") if c.strip()]
    caption_for = {k: v for k, v in RELEASE_CAPTIONS.items() if k in keys} if a.as_released else {}
    if caption_for:
        sources = list(dict.fromkeys(caption_for.values()))
    cfg = ScoreConfig(shards=[], rewards=keys, out_dir="", caption_sources=sources, caption_for=caption_for,
                      empty_captions="score", num_workers=0, progress=False)
    if a.shards:
        from miro_scale.data.plan import resolve_shards
        samples = shard_samples(resolve_shards(a.shards), a.num_samples, a.captions)
    else:
        samples = list(generated_samples(a.num_samples))
    pool = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)))
    results = {}
    for key in tqdm(keys, desc="rewards"):
        run = partial(score_all, key, a.variant, device=device, cfg=cfg, samples=samples,
                      reward_kwargs=reward_kwargs.get(key, {}), batch_size=a.batch_size, pool=pool)
        ref, seconds = run("fp32")
        entry = {"samples": int(np.isfinite(next(iter(ref.values()))).sum()), "seconds": {"fp32": round(seconds, 2)},
                 "columns": {}}
        for x in others:
            got, seconds = run(x)
            entry["seconds"][x] = round(seconds, 2)
            for col in ref:
                entry["columns"].setdefault(col, {})[x] = prec.bin_changes(ref[col], got[col], a.num_bins)
        # the reward's figure for a precision is its worst column
        worst = {x: max((c[x] for c in entry["columns"].values()), key=lambda d: d["moved_over_one_bin"])
                 for x in others}
        entry["worst"] = worst
        entry["precision"] = prec.choose(worst, a.max_moved)
        results[key] = entry
    print(f"\n{'reward':<22}" + "".join(f"{x + ' >1 bin':>14}{x + ' any':>11}{x + ' max':>10}" for x in others)
          + f"{'choice':>8}")
    for key, e in results.items():
        line = f"{key:<22}"
        for x in others:
            w = e["worst"][x]
            line += f"{100 * w['moved_over_one_bin']:>13.2f}%{100 * w['moved_any_bin']:>10.1f}%{str(w['max_bin_shift']):>10}"
        print(line + f"{e['precision']:>8}")
    report = {**run_facts(device), "variant": a.variant, "num_bins": a.num_bins, "max_moved": a.max_moved,
              "data": a.shards or f"generated ({a.num_samples})", "caption_for": caption_for, "rewards": results}
    print(f"wrote {write_report(report, a.out, 'bench_precision')}")
    if a.write_policy:
        merge_policy(Path(a.write_policy), results, report)
        print(f"updated {a.write_policy}")
    return 0


def merge_policy(path: Path, results: dict, report: dict) -> None:
    """Write each measured reward's choice into the policy file, keeping the others' entries."""
    from miro_scale.atomic import write_text_atomic

    doc = json.loads(path.read_text()) if path.exists() else {"rewards": {}}
    for key, e in results.items():
        doc["rewards"][key] = {"precision": e["precision"], "measured": {
            "date": report["date"], "device": report["device"], "samples": e["samples"], "data": str(report["data"]),
            "moved_over_one_bin": {x: w["moved_over_one_bin"] for x, w in e["worst"].items()}}}
    write_text_atomic(path, json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
