"""Merge reward scores/bins into shards from a sidecar, and reshard (or just index) shards.

Sidecar formats (``--sidecar``):

- ``.json``: ``{key: {reward_key: {"raw": float, "bin": int, "value": float}}}`` (``value`` is
  recomputed from ``bin`` when absent; an entry may also be a bare raw score with ``--bin-from-raw``).
- ``.jsonl``: one ``{"key": ..., "rewards": {reward_key: {...}}}`` per line.
- ``.parquet``: a ``key`` column and, per reward, ``<reward>_raw`` and/or ``<reward>_bin`` (and
  optionally ``<reward>_value``) columns.

``--sidecar`` takes several files and directories (all sidecars in them, e.g. the per-shard
``*.rewards.json`` / ``*.rewards.parquet`` that ``preprocessing/bin.py --apply`` writes, whose json
entries are wrapped in ``{"rewards": ...}`` and whose parquet columns are ``<reward>.<field>``).

With ``--bin-from-raw``, bins are quantile bins of all the raw scores (``--num-bins`` bins, computed
by miro_scale.rewards.binning, which preprocessing/bin.py uses too); the edges go into manifest.json.
For calibration on a sample, other strategies and a missing-reward policy, use preprocessing/bin.py.

Examples::

    python -m miro_scale.data.reshard --input in_dir --out out_dir --sidecar scores.parquet \
        --reward-keys clip_score,aesthetic_score --shard-size 5000 --validate-images
    python -m miro_scale.data.reshard --input 'img2dataset_out/*.tar' --index-only
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from collections import Counter
from typing import Mapping, Sequence

import numpy as np

from .decode import decode_image
from miro_scale.rewards.binning import RewardBins, compute_edges

from .format import IMAGE_EXTS, SampleError, image_ext, parse_json, reward_entry
from .plan import resolve_shards
from .tario import index_path_for, load_index, iter_samples, write_index_file
from .writer import ShardWriter, keys_digest, write_manifest

log = logging.getLogger("miro_scale.data")


# ----------------------------------------------------------------------------- sidecar
SIDECAR_SUFFIXES = (".json", ".jsonl", ".parquet")


def sidecar_files(paths) -> list:
    """Sidecar files from files and directories (a directory contributes every sidecar in it)."""
    files = []
    for path in [paths] if isinstance(paths, str) else list(paths):
        if os.path.isdir(path):
            found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(SIDECAR_SUFFIXES))
            if not found:
                raise ValueError(f"{path}: directory has no sidecar ({', '.join(SIDECAR_SUFFIXES)}) files")
            files += found
        elif os.path.exists(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"sidecar {path} not found")
    return files


def _read_sidecar_file(path: str) -> dict:
    """{key: {reward: entry}} from one sidecar file."""
    raw: dict = {}
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path).to_pydict()
        if "key" not in table:
            raise ValueError(f"{path}: parquet sidecar has no 'key' column")
        # Columns "<reward>_<field>" or, as preprocessing/bin.py writes them, "<reward>.<field>".
        fields = {}
        for c in table:
            for sep in (".", "_"):
                name, _, field_name = c.rpartition(sep)
                if c != "key" and name and field_name in ("raw", "bin", "value"):
                    fields.setdefault(name, {})[field_name] = c
                    break
        for i, key in enumerate(table["key"]):
            raw[str(key)] = {r: {f: table[c][i] for f, c in cols.items()} for r, cols in fields.items()}
    elif path.endswith(".jsonl"):
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if "key" not in row:
                        raise ValueError(f"{path}:{lineno}: no 'key'")
                    raw[str(row["key"])] = row.get("rewards", {})
    else:  # {key: {reward: entry}} or, as preprocessing/bin.py writes it, {key: {"rewards": {...}}}
        with open(path) as f:
            raw = {str(k): v.get("rewards", v) if isinstance(v, Mapping) else v for k, v in json.load(f).items()}
    return raw


def load_sidecar(paths, reward_keys: Sequence[str] | None = None, num_bins: int = 64,
                 bin_from_raw: bool = False) -> tuple:
    """Returns ({key: {reward: entry}}, {reward: edges list} or {})."""
    raw, source = {}, {}
    for path in sidecar_files(paths):
        for key, rewards in _read_sidecar_file(path).items():
            if key in raw:
                raise ValueError(f"{path}: key {key!r} is also in {source[key]}")
            raw[key], source[key] = rewards, path
    keys = list(reward_keys) if reward_keys else sorted({r for v in raw.values() for r in v})
    edges_out: dict = {}
    binners = {}
    if bin_from_raw:  # the project's one binning implementation (preprocessing/bin.py uses it too)
        for r in keys:
            vals = np.array([_raw_of(v.get(r)) for v in raw.values()], dtype=np.float64)
            edges = compute_edges(vals, num_bins, "quantile")
            binners[r] = RewardBins(key=r, strategy="quantile", num_bins=num_bins, edges=edges.tolist())
            edges_out[r] = edges.tolist()
    out: dict = {}
    for key, rewards in raw.items():
        d = {}
        for r in keys:
            e = rewards.get(r)
            if e is None:
                continue
            where = f"{source[key]}:{key}:{r}"
            if bin_from_raw:
                x = _raw_of(e)
                if x is None or not np.isfinite(x):
                    continue
                d[r] = reward_entry(x, int(binners[r].assign(np.array([x]))[0]), num_bins)
            else:
                if not isinstance(e, Mapping) or e.get("bin") is None:
                    raise ValueError(f"{where}: entry has no 'bin' (use --bin-from-raw for raw scores)")
                b = int(e["bin"])
                ent = reward_entry(e.get("raw"), b, num_bins)
                if e.get("value") is not None and abs(float(e["value"]) - ent["value"]) > 1e-6:
                    raise ValueError(f"{where}: value {e['value']} != bin/(num_bins-1) = {ent['value']}"
                                     f" (num_bins={num_bins})")
                d[r] = ent
        out[key] = d
    return out, edges_out


def _raw_of(e):
    if e is None:
        return None
    if isinstance(e, Mapping):
        v = e.get("raw")
        return None if v is None else float(v)
    return float(e)


# ----------------------------------------------------------------------------- tools
def index_shards(paths: Sequence[str], progress: bool = True) -> list:
    """Write DALI .idx files and a manifest.json for existing shards (in each shard's directory)."""
    from tqdm import tqdm

    by_dir: dict = {}
    for p in tqdm(paths, desc="index", disable=not progress):
        idx = load_index(p, use_idx_file=False)
        keys = idx.keys
        write_index_file(index_path_for(p), keys, idx.members)
        by_dir.setdefault(os.path.dirname(os.path.abspath(p)), []).append(
            {"name": os.path.basename(p), "num_samples": len(idx), "num_bytes": os.path.getsize(p),
             "keys_sha256": keys_digest(keys), **({"truncated": True} if idx.truncated else {})})
    for d, entries in by_dir.items():
        write_manifest(d, entries)
    return [e for es in by_dir.values() for e in es]


def reshard(inputs, out_dir: str, sidecar=None, reward_keys: Sequence[str] | None = None,
            num_bins: int = 64, bin_from_raw: bool = False, shard_size: int | None = 1000,
            max_bytes: int | None = None, validate_images: bool = False, drop_missing: bool = False,
            require: Sequence = (IMAGE_EXTS, "txt"), progress: bool = True) -> Counter:
    """Copy samples from ``inputs`` into new shards in ``out_dir``, merging sidecar rewards into each
    json (a json member is created when the input has none). Samples missing a required member,
    with an empty member, with a duplicate key, with a bad
    image (``validate_images``) or without sidecar rewards (``drop_missing``) are skipped with a
    warning and counted. Returns the counters."""
    from tqdm import tqdm

    paths = resolve_shards(inputs)
    side, edges = ({}, {})
    if sidecar:
        side, edges = load_sidecar(sidecar, reward_keys, num_bins, bin_from_raw)
    req = [tuple(r) if isinstance(r, (tuple, list)) else (r,) for r in require]
    stats: Counter = Counter()
    seen: set = set()
    extra = {"sources": [os.path.abspath(p) for p in paths]}
    if sidecar:
        extra.update(reward_keys=list(reward_keys) if reward_keys else sorted(
            {r for v in side.values() for r in v}), num_bins=num_bins)
    if edges:
        extra["reward_bin_edges"] = edges
    bar = tqdm(total=len(paths), desc="reshard", unit="shard", disable=not progress)
    with ShardWriter(out_dir, max_samples=shard_size, max_bytes=max_bytes, manifest_extra=extra) as w:
        for p in paths:
            for key, members in iter_samples(p):
                where = f"{p}:{key}"
                out_key = key.replace("/", "_")
                missing = [alts[0] for alts in req if not any(a in members for a in alts)]
                if missing:
                    stats[f"missing_{missing[0]}"] += 1
                    log.warning("%s: skipped (no .%s member)", where, missing[0])
                    continue
                if any(len(members[a]) == 0 for alts in req for a in alts if a in members):
                    stats["empty_member"] += 1
                    log.warning("%s: skipped (empty member)", where)
                    continue
                if out_key in seen:
                    stats["duplicate_key"] += 1
                    log.warning("%s: skipped (key already written)", where)
                    continue
                try:
                    meta = parse_json(members["json"], where) if "json" in members else {}
                    if validate_images and image_ext(members):
                        decode_image(members[image_ext(members)], where)
                except SampleError as e:
                    stats[e.reason] += 1
                    log.warning("%s (skipped)", e)
                    continue
                if sidecar:
                    r = side.get(key, side.get(out_key, side.get(meta.get("key", ""))))
                    if r is None or (reward_keys and any(k not in r for k in reward_keys)):
                        stats["no_sidecar_rewards"] += 1
                        if drop_missing:
                            log.warning("%s: skipped (no rewards in sidecar)", where)
                            continue
                    else:
                        meta.setdefault("rewards", {}).update(r)
                        if edges:
                            meta["reward_bins"] = {"num_bins": num_bins, "scheme": "quantile"}
                if "json" in members or sidecar:
                    members = dict(members)
                    members["json"] = meta
                w.write(out_key, members)
                seen.add(out_key)
                stats["written"] += 1
            bar.update(1)
    bar.close()
    return stats


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Merge sidecar rewards into shards; reshard; index.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="shard dirs, globs, .tar files")
    p.add_argument("--out", help="output directory (not with --index-only)")
    p.add_argument("--sidecar", nargs="+", help="reward sidecars (.json, .jsonl, .parquet) or directories of them")
    p.add_argument("--reward-keys", default="", help="comma-separated reward keys (default: all)")
    p.add_argument("--num-bins", type=int, default=64)
    p.add_argument("--bin-from-raw", action="store_true", help="quantile-bin raw sidecar scores")
    p.add_argument("--shard-size", type=int, default=1000, help="max samples per shard")
    p.add_argument("--max-bytes", type=int, default=None, help="max bytes per shard")
    p.add_argument("--validate-images", action="store_true", help="decode each image, skip bad ones")
    p.add_argument("--drop-missing", action="store_true", help="skip samples without sidecar rewards")
    p.add_argument("--index-only", action="store_true", help="only write .idx files and manifest")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if a.index_only:
        entries = index_shards(resolve_shards(a.input))
        print(f"indexed {len(entries)} shards, {sum(e['num_samples'] for e in entries)} samples")
        return
    if not a.out:
        p.error("--out is required unless --index-only")
    keys = [k for k in a.reward_keys.split(",") if k] or None
    stats = reshard(a.input, a.out, a.sidecar, keys, a.num_bins, a.bin_from_raw, a.shard_size,
                    a.max_bytes, a.validate_images, a.drop_missing)
    print(json.dumps(dict(stats), sort_keys=True))


if __name__ == "__main__":
    main()
