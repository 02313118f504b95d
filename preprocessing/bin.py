#!/usr/bin/env python
"""Calibrate reward bins from scored shards and (optionally) write per-shard binned sidecars.

  python preprocessing/bin.py --scores scores/ --bins 64 --strategy quantile \
      --calibration-size 100000 --out bins.json [--apply bins/ --missing drop --format parquet]
  python preprocessing/bin.py --scores scores/ --use bins.json --apply bins/   # apply existing bins

Sidecars: `{apply}/{shard}.rewards.parquet` (key, <reward>.raw/.bin/.value) or, with --format json,
`{apply}/{shard}.rewards.json` ({key: {"rewards": {reward: {"raw", "bin", "value"}}}}). See
miro_scale/rewards/binning.py for ties, constant rewards and the missing-reward policy.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from miro_scale.atomic import write_bytes_atomic  # noqa: E402
from miro_scale.rewards import binning  # noqa: E402
from miro_scale.rewards.registry import canonical_key  # noqa: E402
from miro_scale.rewards.scores_io import read_scores, scoring_metadata, write_table_atomic  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores", required=True, help="directory of scored shards (preprocessing/score.py --out)")
    p.add_argument("--out", default=None, help="bins.json to write (fit mode)")
    p.add_argument("--use", default=None, help="an existing bins.json to apply instead of fitting")
    p.add_argument("--bins", type=int, default=64)
    p.add_argument("--strategy", default="quantile", choices=binning.STRATEGIES)
    p.add_argument("--refine-last", type=int, default=8, help="refined: how many top quantile bins to split")
    p.add_argument("--refine-factor", type=int, default=2, help="refined: split each of them into this many")
    p.add_argument("--unique-values", action="store_true",
                   help="quantiles of the unique values (what MIRO's released code did) instead of the population")
    p.add_argument("--calibration-size", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rewards", default=None, help="comma-separated subset of rewards (default: all in the scores)")
    p.add_argument("--apply", default=None, help="directory for per-shard binned sidecars")
    p.add_argument("--missing", default="drop", choices=binning.MISSING_POLICIES)
    p.add_argument("--format", default="parquet", choices=["parquet", "json"])
    a = p.parse_args(argv)
    if (a.out is None) == (a.use is None):
        raise SystemExit("give exactly one of --out (fit bins) or --use (apply existing bins.json)")
    rewards = None if not a.rewards else [canonical_key(k) for k in a.rewards.split(",") if k.strip()]
    if a.use:
        bins, doc = binning.load_bins(a.use)
    else:
        table = read_scores(a.scores)
        bins = binning.fit_bins(table, a.bins, a.strategy, a.calibration_size, a.seed, a.refine_last,
                                a.refine_factor, a.unique_values, rewards, scoring_metadata(a.scores))
        doc = binning.save_bins(a.out, bins, strategy=a.strategy, requested_bins=a.bins,
                                calibration_size=a.calibration_size, seed=a.seed, unique_values=a.unique_values,
                                refine_last=a.refine_last if a.strategy == "refined" else None,
                                refine_factor=a.refine_factor if a.strategy == "refined" else None,
                                scores_dir=str(a.scores), num_rows=table.num_rows)
        del table
        for k, b in bins.items():
            flag = " CONSTANT" if b.constant else (" EMPTY" if b.empty else "")
            print(f"{k}: {b.num_bins} bins from {b.n_calibration} values, {b.n_missing} missing, "
                  f"range [{b.lo:.4g}, {b.hi:.4g}]{flag}")
        print(f"wrote {a.out}")
    if a.apply:  # one scored shard at a time: memory and time linear in the data
        import pyarrow.parquet as pq
        out = Path(a.apply)
        out.mkdir(parents=True, exist_ok=True)
        files = sorted(p for p in Path(a.scores).glob("*.parquet") if not p.name.startswith("."))
        if not files:
            raise SystemExit(f"--scores {a.scores}: no scored shards (*.parquet)")
        n_rows = n_in = 0
        meta = {"bins_edges_sha256": doc["edges_sha256"], "missing": a.missing}
        for f in files:
            part = pq.read_table(f)
            part = part.select([c for c in part.column_names if c in ("key", "status", "error")
                                or binning.base_key(c) in bins])
            binned = binning.apply_bins(part, bins, a.missing)
            n_in += part.num_rows
            n_rows += binned.num_rows
            if a.format == "parquet":
                binned = binned.replace_schema_metadata({"miro_bins": json.dumps(meta)})
                write_table_atomic(binned, out / f"{f.stem}.rewards.parquet")
            else:
                js = binning.sidecar_json(binned, {k: b.num_bins for k, b in bins.items()})
                write_bytes_atomic(out / f"{f.stem}.rewards.json", json.dumps(js).encode())
        print(f"wrote sidecars for {n_rows} of {n_in} rows to {out} (missing={a.missing})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
