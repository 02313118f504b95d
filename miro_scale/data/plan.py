"""Which sample goes to which rank, worker and batch, in which order, each epoch.

Every rank builds the same :class:`DatasetIndex` (all shards' indices, in the order the shards are
given) and the same per-epoch permutation, seeded by ``(seed, epoch)``: each shard's samples are
permuted, cut into chunks of ``shuffle_chunk`` samples, and the chunks of all shards are permuted
together. That order is cut into global batch-chunks of ``batch_size``; rank ``r`` serves chunks
``r, r + world, r + 2 world, ...``, so every sample goes to exactly one rank, and the samples of one
optimizer step (``world x accumulation`` consecutive chunks) are the same whatever the split between
ranks and accumulation (which also lets a run resume on another world size at a step boundary).
DataLoader worker ``w`` loads a rank's batches ``w, w + W, ...`` (the order DataLoader returns them
in), so the stream a rank sees does not depend on the number of workers. With ``drop_last`` only
whole rounds of ``world`` full chunks are used, so each rank gets the same number of full batches (the
permuted tail, fewer than ``world * batch_size`` samples, waits for another epoch); without it the
epoch's last chunk may be short and ranks may differ by one batch.
Chunks keep reads local (DALI reads one chunk per index entry) while still mixing shards in a batch.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .format import IMAGE_EXTS
from .tario import load_index

log = logging.getLogger("miro_scale.data")


@dataclass
class DatasetIndex:
    """All shards' indices plus the flat list of usable samples (those with every required member,
    none of them empty)."""

    shards: list
    indices: list  # ShardIndex per shard
    shard_of: np.ndarray  # int32 [n]: shard number of usable sample i
    pos_of: np.ndarray  # int32 [n]: its position in that shard's index
    skipped: Counter = field(default_factory=Counter)
    messages: list = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.shard_of.shape[0])

    def key(self, i: int) -> str:
        return self.indices[self.shard_of[i]].key(self.pos_of[i])

    def members(self, i: int) -> dict:
        return self.indices[self.shard_of[i]].member_dict(self.pos_of[i])

    def where(self, i: int) -> str:
        return f"{self.shards[self.shard_of[i]]}:{self.key(i)}"


def resolve_shards(spec) -> list:
    """Shard paths from a directory (its manifest's shards, else ``*.tar``), a brace pattern
    (``data/{00000..01999}.tar``), a glob, a single ``.tar``, a file listing paths one per line
    (``.txt``), comma-separated specs, or a list of any of these; each path once, in order."""
    paths = _resolve(spec)
    unique = list(dict.fromkeys(paths))
    if len(unique) != len(paths):
        log.warning("%d shard paths are listed more than once; each shard is used once", len(paths) - len(unique))
    return unique


def _resolve(spec) -> list:
    import glob
    import json

    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in _resolve(s)]
    spec = os.fspath(spec)
    if "," in spec and not os.path.exists(spec):
        return _resolve([s.strip() for s in spec.split(",") if s.strip()])
    if "{" in spec and not os.path.exists(spec):
        from braceexpand import braceexpand

        return _resolve(list(braceexpand(spec)))
    if os.path.isdir(spec):
        man = os.path.join(spec, "manifest.json")
        if os.path.exists(man):
            with open(man) as f:
                names = [e["name"] for e in json.load(f)["shards"]]
            paths = [os.path.join(spec, n) for n in names]
            missing = [p for p in paths if not os.path.exists(p)]
            if missing:
                raise FileNotFoundError(f"{man} lists shards that do not exist: {missing[:3]}")
            return paths
        _refuse_unfinished_stage_output(spec)
        paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not paths:
            raise FileNotFoundError(f"{spec}: no .tar shards and no manifest.json")
        return paths
    if spec.endswith(".txt") and os.path.isfile(spec):
        with open(spec) as f:
            return [ln.strip() for ln in f if ln.strip()]
    if any(c in spec for c in "*?["):
        paths = sorted(glob.glob(spec))
        if not paths:
            raise FileNotFoundError(f"no shards match {spec}")
        return paths
    if not os.path.exists(spec):
        raise FileNotFoundError(f"shard {spec} does not exist")
    return [spec]


def _refuse_unfinished_stage_output(directory: str) -> None:
    """The shard stage writes manifest.json only when every shard is done; its directory without one
    is not a dataset yet (a killed or failing run): say which shards are missing."""
    import json

    job = os.path.join(directory, "shard.job.json")
    if not os.path.exists(job):
        return  # a plain directory of tars (img2dataset's output): read as it is
    from miro_scale.shard_jobs import read_record, shard_stem

    with open(job) as f:
        stems = [shard_stem(p) for p in json.load(f)["shards"]]
    missing = [s for s in stems if read_record(directory, "shard", s) is None]
    if not missing:
        raise FileNotFoundError(f"{directory}: every shard is done but manifest.json was not written (the run "
                                "was stopped at its end); rerun preprocessing/shard.py to write it")
    raise FileNotFoundError(
        f"{directory}: the shard stage has not finished ({len(stems) - len(missing)} of {len(stems)} shards done, "
        f"no manifest.json); missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; rerun "
        "preprocessing/shard.py (see shard.summary.json for failures)")


def build_dataset_index(shards: Sequence[str], required: Iterable, use_index_files: bool = True,
                        threads: int = 8) -> DatasetIndex:
    """Index all shards and keep the samples that have every ``required`` member. ``required`` holds
    extensions or tuples of alternatives (e.g. ``(IMAGE_EXTS, "txt", "json")``). Samples left out
    are counted in ``skipped`` by reason (``missing_<ext>``, ``empty_member``, and the index's
    ``duplicate_key`` / ``bad_member_name``) with a message naming shard and key; a truncated tar
    counts under ``truncated_shard``."""
    required = [tuple(r) if isinstance(r, (tuple, list)) else (r,) for r in required]
    shards = list(shards)
    if not shards:
        raise ValueError("no shards given")
    unique = list(dict.fromkeys(os.path.abspath(p) for p in shards))
    if len(unique) != len(shards):
        log.warning("%d shard paths are listed more than once; each shard is used once",
                    len(shards) - len(unique))
        seen: set = set()
        shards = [p for p in shards if not (os.path.abspath(p) in seen or seen.add(os.path.abspath(p)))]
    with ThreadPoolExecutor(max(1, min(threads, len(shards)))) as ex:
        indices = list(ex.map(lambda p: load_index(p, use_index_files), shards))
    skipped: Counter = Counter()
    messages: list = []
    shard_of, pos_of = [], []
    for s, idx in enumerate(indices):
        if idx.truncated:
            skipped["truncated_shard"] += 1
            messages.append(f"{shards[s]}: truncated or unreadable tar; read up to its last complete member")
        if idx.cut_key is not None:
            skipped["truncated_sample"] += 1
            messages.append(f"{shards[s]}:{idx.cut_key}: skipped (its members are cut by the tar's end)")
        for reason, name in idx.problems:
            skipped[reason] += 1
            messages.append(f"{shards[s]}:{name}: skipped ({reason})")
        n = len(idx)
        ok = np.ones(n, dtype=bool)
        col = {e: c for c, e in enumerate(idx.exts)}
        for alts in required:  # vectorised: the first alternative present must be non-empty
            chosen = np.full(n, -1, dtype=np.int64)
            for e in reversed(alts):
                if e in col:
                    present = idx.sizes[:, col[e]] >= 0
                    chosen = np.where(present, idx.sizes[:, col[e]], chosen)
            missing = ok & (chosen < 0)
            empty = ok & (chosen == 0)
            name = "missing_image" if alts == tuple(IMAGE_EXTS) else f"missing_{alts[0]}"
            for j in np.flatnonzero(missing):
                skipped[name] += 1
                messages.append(f"{shards[s]}:{idx.key(j)}: skipped ({name})")
            for j in np.flatnonzero(empty):
                e = next(a for a in alts if a in col and idx.sizes[j, col[a]] >= 0)
                skipped["empty_member"] += 1
                messages.append(f"{shards[s]}:{idx.key(j)}: skipped (member .{e} is empty)")
            ok &= ~(missing | empty)
        keep = np.flatnonzero(ok)
        shard_of.append(np.full(len(keep), s, dtype=np.int32))
        pos_of.append(np.asarray(keep, dtype=np.int32))
    di = DatasetIndex(shards=shards, indices=indices,
                      shard_of=np.concatenate(shard_of) if shard_of else np.zeros(0, np.int32),
                      pos_of=np.concatenate(pos_of) if pos_of else np.zeros(0, np.int32),
                      skipped=skipped, messages=messages)
    return di


def epoch_order(dindex: DatasetIndex, seed: int, epoch: int, shuffle: bool = True,
                shuffle_chunk: int = 64) -> np.ndarray:
    """The global order of usable sample ids for one epoch (int64 [n])."""
    n = len(dindex)
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(epoch), 0x6D69726F])
    bounds = np.flatnonzero(np.diff(dindex.shard_of)) + 1
    starts = np.concatenate([[0], bounds]).astype(np.int64)
    ends = np.concatenate([bounds, [n]]).astype(np.int64)
    pieces = []
    for a, b in zip(starts, ends):
        if b <= a:
            continue
        perm = a + rng.permutation(b - a)
        for c in range(0, b - a, shuffle_chunk):
            pieces.append(perm[c:c + shuffle_chunk])
    if not pieces:
        return np.zeros(0, np.int64)
    order = rng.permutation(len(pieces))
    return np.concatenate([pieces[i] for i in order]).astype(np.int64)


def rank_chunks(n: int, rank: int, world_size: int, batch_size: int, drop_last: bool) -> range:
    """Global batch-chunks (``order[c*B:(c+1)*B]``) of an epoch of n samples that ``rank`` serves:
    ``rank, rank + world, ...``. With drop_last only whole rounds of ``world`` full chunks are used,
    so every rank serves the same number of full batches."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    if drop_last:
        total = n // (batch_size * world_size) * world_size
    else:
        total = (n + batch_size - 1) // batch_size
    return range(rank, total, world_size)


def rank_slice(order: np.ndarray, rank: int, world_size: int, batch_size: int, drop_last: bool) -> np.ndarray:
    """This rank's samples, in order: its chunks concatenated (only the epoch's very last chunk can
    be short, and it is the last of its rank, so the rank's batches are its chunks)."""
    chunks = rank_chunks(len(order), rank, world_size, batch_size, drop_last)
    if len(chunks) == 0:
        return order[:0]
    return np.concatenate([order[c * batch_size:(c + 1) * batch_size] for c in chunks])


def num_batches(n_rank: int, batch_size: int) -> int:
    return (n_rank + batch_size - 1) // batch_size
