"""Reading and writing scored shards (pyarrow only: no torch, so binning stays light)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence

from miro_scale.atomic import write_bytes_atomic


def write_table_atomic(table, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes_atomic(path, sink.getvalue().to_pybytes())


def read_scores(out_dir: str, columns: Optional[Sequence[str]] = None):
    """All finished shards of a scores directory as one pyarrow table (plus a 'shard' column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    files = sorted(p for p in Path(out_dir).glob("*.parquet") if not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{out_dir}: no scored shards (*.parquet)")
    tables = []
    for f in files:
        t = pq.read_table(f, columns=None if columns is None else ["key", "status", *columns])
        tables.append(t.append_column("shard", pa.array([f.stem] * t.num_rows, pa.string())))
    return pa.concat_tables(tables, promote_options="default")


def scoring_metadata(out_dir: str) -> dict:
    """Reward ids / digests recorded in the scored shards (union over shards)."""
    import pyarrow.parquet as pq
    rewards: Dict[str, dict] = {}
    for f in sorted(Path(out_dir).glob("*.parquet")):
        md = pq.read_schema(f).metadata or {}
        if b"miro_scoring" in md:
            for k, v in json.loads(md[b"miro_scoring"])["rewards"].items():
                rewards.setdefault(k, v)
    return rewards
