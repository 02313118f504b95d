#!/usr/bin/env python
r"""Calibrate reward bins from scored shards and bin every score (the bin stage).

  python preprocessing/bin.py --scores scores/ --out bins/ --num-bins 64 --strategy quantile \
      --calibration-size 100000 [--missing drop|median|nan]
  python preprocessing/bin.py --scores scores/ --out bins2/ --use bins/bins.json     # existing edges

Reads the score stage's finished shards (scores/{stem}.scores.parquet with a done record) one at a
time and writes, per shard, bins/{stem}.rewards.parquet (key, then per reward column
<col>.raw / .bin / .value = bin / (num_bins - 1), and .imputed with --missing median) on the
shard-job runner, then bins/bins.json last: a bins directory is complete exactly when bins.json is
there. Memory is bounded by one shard plus the calibration sample. A rerun skips shards already
binned with the same edges. See miro_scale/rewards/binning.py for ties, constant and missing rewards
and the strategies. The shard stage (preprocessing/shard.py --bins bins/) merges the sidecars.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from miro_scale import shard_jobs  # noqa: E402
from miro_scale.rewards import binning  # noqa: E402
from miro_scale.rewards.registry import canonical_key  # noqa: E402

BINS_FILE = "bins.json"
# how the edges were fitted (carried over by --use)
FIT_FIELDS = ("strategy", "requested_bins", "calibration_size", "seed", "unique_values", "refine_last",
              "refine_factor")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores", required=True, help="the score stage's output directory")
    p.add_argument("--out", required=True, help="output directory: bins.json and per-shard rewards sidecars")
    p.add_argument("--use", default=None, help="an existing bins.json to apply instead of fitting")
    p.add_argument("--num-bins", type=int, default=64)
    p.add_argument("--strategy", default="quantile", choices=binning.STRATEGIES)
    p.add_argument("--refine-last", type=int, default=8, help="refined: how many top quantile bins to split")
    p.add_argument("--refine-factor", type=int, default=2, help="refined: split each of them into this many")
    p.add_argument("--population-quantiles", action="store_true",
                   help="quantiles of all calibration values; the default, as MIRO's released code did, takes "
                        "quantiles of the unique values (they differ on tied scores: docs/fidelity.md)")
    p.add_argument("--calibration-size", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rewards", default=None, help="comma-separated subset of rewards (default: all in the scores)")
    p.add_argument("--missing", default="drop", choices=binning.MISSING_POLICIES)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    import pyarrow.parquet as pq

    from miro_scale.atomic import write_parquet_atomic
    from miro_scale.rewards.scores_io import finished_score_files, scoring_metadata
    shard_jobs.setup_logging()
    out = Path(a.out)
    # the source tar each scores file was made from (only that: records of 10k+ shards add up)
    sources = {stem: rec["source"] for stem, rec in shard_jobs.finished_inputs(a.scores, "score").items()}
    files = [str(f) for f in finished_score_files(a.scores)]
    if not files:
        raise SystemExit(f"--scores {a.scores}: no finished score shards (*.score.done.json); "
                         "run preprocessing/score.py first")
    try:
        planned = len(json.loads((Path(a.scores) / "score.job.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        planned = len(files)
    if planned > len(files):
        print(f"warning: {planned - len(files)} of the {planned} shards of {a.scores} are not scored (see its "
              "score.summary.json); binning the others", file=sys.stderr)
    rewards = None if not a.rewards else [canonical_key(k) for k in a.rewards.split(",") if k.strip()]
    if a.use:
        bins, doc = binning.load_bins(a.use)
        info = {k: doc.get(k) for k in FIT_FIELDS}
    else:
        tables = (pq.read_table(f) for f in files)  # one shard in memory at a time
        bins = binning.fit_bins(tables, a.num_bins, a.strategy, a.calibration_size, a.seed, a.refine_last,
                                a.refine_factor, not a.population_quantiles, rewards, scoring_metadata(files))
        info = dict(strategy=a.strategy, requested_bins=a.num_bins, calibration_size=a.calibration_size,
                    seed=a.seed, unique_values=not a.population_quantiles,
                    refine_last=a.refine_last if a.strategy == "refined" else None,
                    refine_factor=a.refine_factor if a.strategy == "refined" else None)
        for k, b in bins.items():
            flag = " CONSTANT" if b.constant else (" EMPTY" if b.empty else "")
            print(f"{k}: {b.num_bins} bins from {b.n_calibration} values, {b.n_missing} missing, "
                  f"range [{b.lo:.4g}, {b.hi:.4g}]{flag}")
    digest = binning.edges_digest(bins)
    try:  # bins.json marks a complete directory: none while its sidecars are being (re)written
        if json.loads((out / BINS_FILE).read_text()).get("edges_sha256") != digest:
            (out / BINS_FILE).unlink()
    except (OSError, ValueError):
        pass
    meta = {"bins_edges_sha256": digest, "missing": a.missing,
            "num_bins": {k: b.num_bins for k, b in bins.items()}}

    def process(task):
        task.source = sources[task.stem]
        part = pq.read_table(task.shard)
        captions = json.loads(part.schema.metadata[b"miro_scoring"]).get("captions", ["txt"])
        part = part.select([c for c in part.column_names if c in ("key", "status", "error")
                            or binning.base_key(c) in bins])
        binned = binning.apply_bins(part, bins, a.missing)
        md = {**meta, "captions": captions}
        write_parquet_atomic(binned.replace_schema_metadata({"miro_bins": json.dumps(md, sort_keys=True)}),
                           task.path("{stem}.rewards.parquet"))
        return {"samples": part.num_rows, "written": binned.num_rows,
                "failures": {"missing_reward": part.num_rows - binned.num_rows} if a.missing == "drop" else {}}

    job = shard_jobs.ShardJob(stage="bin", out_dir=str(out), outputs=["{stem}.rewards.parquet"],
                              params={"edges_sha256": digest, "missing": a.missing,
                                      "scores": os.path.abspath(a.scores)},
                              process=process, progress=not a.no_progress,
                              stem_of=lambda path: Path(path).name[: -len(".scores.parquet")])
    summary = shard_jobs.run(job, files, 0, 1)
    if summary["complete"]:
        binning.save_bins(str(out / BINS_FILE), bins, **info, missing=a.missing,
                          scores_dir=os.path.abspath(a.scores), num_shards=len(files))
        print(f"wrote {out / BINS_FILE} and {len(files)} rewards sidecars "
              f"({summary['counts'].get('written', 0)} of {summary['counts'].get('samples', 0)} rows, "
              f"missing={a.missing})")
    return shard_jobs.report(summary)


if __name__ == "__main__":
    sys.exit(main())
