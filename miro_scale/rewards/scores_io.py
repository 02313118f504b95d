"""Reading the score stage's output (pyarrow only: no torch, so binning stays light)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from miro_scale.shard_jobs import finished_inputs

SCORES = "{stem}.scores.parquet"


def finished_score_files(scores_dir: str) -> List[Path]:
    """The scores files of the shards the score stage finished (a file without its done record,
    from a killed run, is not one of them), in stem order."""
    return [Path(scores_dir) / SCORES.format(stem=s) for s in finished_inputs(scores_dir, "score")]


def read_scores(scores_dir: str, columns: Optional[Sequence[str]] = None):
    """All finished shards of a scores directory as one pyarrow table (plus a 'shard' column); for
    analysis and tests: the bin stage streams the shards instead."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    files = finished_score_files(scores_dir)
    if not files:
        raise FileNotFoundError(f"{scores_dir}: no finished scored shards")
    tables = []
    for f in files:
        t = pq.read_table(f, columns=None if columns is None else ["key", "status", *columns])
        tables.append(t.append_column("shard", pa.array([f.name.split(".")[0]] * t.num_rows, pa.string())))
    return pa.concat_tables(tables, promote_options="default")


def scoring_metadata(files: Sequence[Path]) -> dict:
    """Reward ids / digests recorded in scores files (union over files; schemas only)."""
    import pyarrow.parquet as pq
    rewards: Dict[str, dict] = {}
    for f in files:
        md = pq.read_schema(f).metadata or {}
        if b"miro_scoring" in md:
            for k, v in json.loads(md[b"miro_scoring"])["rewards"].items():
                rewards.setdefault(k, v)
    return rewards
