"""The shard stage: one training shard per source shard, joining its per-shard sidecars.

For a source shard ``STEM.tar`` it writes ``STEM.tar`` (and ``STEM.idx``) in the output directory
with the same keys, in the same order, each sample carrying

* the source's members as they are (image unless ``images="drop"``, txt, and json with
  img2dataset's fields kept), under canonical extensions;
* json ``captions``: the caption stage's captions, merged over any the source json had;
* json ``rewards`` (the ``txt`` caption's rewards) and ``rewards_by_caption[name]`` for every other
  scored caption, each the complete reward vector (image-only rewards are shared), as
  ``{"raw", "bin", "value"}``, plus ``reward_bins``;
* the encode stage's ``latent_mean.npy``, ``latent_std.npy``, ``text_emb[_<name>].npy``.

Memory is bounded by one shard's sidecar tables (rewards, captions) plus one sample. A sample is
written only when it has every sidecar asked for; otherwise it is skipped, counted by reason and
named in the shard's done record (``no_rewards:<score status>``: the bin stage dropped it, e.g.
``no_rewards:empty_caption``; ``no_latents:<reason>``: the encode stage could not use its image, e.g.
``no_latents:corrupt_image``; ``bad_json``). Sidecars made
from another file than the source tar, or not finished, fail the shard with a message naming them.

The runner writes ``manifest.json`` once every shard is done (:func:`write_dataset_manifest`); the
loaders refuse a shard-stage directory without it and name the shards still missing.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from miro_scale import shard_jobs

from .format import IMAGE_EXTS, JSON_EXT, TEXT_EXT, SampleError
from .sidecars import check_sidecar, count_index_problems, iter_members, open_source_shard, read_captions, sample_meta
from .tario import MemberReader, load_index
from .writer import TarSampleWriter, keys_digest, write_index_file, write_manifest

STAGE = "shard"
BINS_FILE = "bins.json"


@dataclass
class JoinSettings:
    captions_dir: Optional[str] = None
    encoded_dir: Optional[str] = None
    bins_dir: Optional[str] = None
    images: str = "keep"  # keep | drop

    def params(self) -> dict:
        bins = self.bins_doc()
        return {"captions": _abs(self.captions_dir), "encoded": _abs(self.encoded_dir), "bins": _abs(self.bins_dir),
                "bins_edges_sha256": bins.get("edges_sha256"), "missing": bins.get("missing"),
                "images": self.images}

    def bins_doc(self) -> dict:
        """bins.json of the bin stage's directory: it is written last, so without it the bin stage has
        not finished."""
        if not self.bins_dir:
            return {}
        path = Path(self.bins_dir) / BINS_FILE
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise SystemExit(f"--bins {self.bins_dir}: no {BINS_FILE}; the bin stage has not finished "
                             "(run preprocessing/bin.py)") from None


def _abs(path: Optional[str]) -> Optional[str]:
    return os.path.abspath(path) if path else None


def _read_rewards(bins_dir: str, stem: str, source: dict):
    """({key: {column: entry}}, scored caption sources) from the bin stage's sidecar."""
    import pyarrow.parquet as pq

    from miro_scale.rewards.binning import rewards_by_key

    table = pq.read_table(check_sidecar(bins_dir, "rewards", stem, source))
    meta = json.loads(table.schema.metadata[b"miro_bins"])
    return rewards_by_key(table), meta.get("captions", ["txt"])


def _score_status(bins_doc: dict, stem: str) -> Dict[str, str]:
    """{key: status} of the scores the bins were made from (why a sample has no rewards), or {} when
    that directory is not at hand."""
    import pyarrow.parquet as pq

    path = Path(bins_doc.get("scores_dir") or "") / f"{stem}.scores.parquet"
    try:
        t = pq.read_table(path, columns=["key", "status"]).to_pydict()
    except (OSError, ValueError):
        return {}
    return dict(zip(t["key"], t["status"]))


def _encode_failures(encoded_dir: str, stem: str) -> Dict[str, str]:
    """{key: reason} of the samples the encode stage left out."""
    rec = shard_jobs.read_record(encoded_dir, "encode", stem) or {}
    return {k: r for r, keys in rec.get("counts", {}).get("skipped_keys", {}).items() for k in keys}


def _by_caption(entries: Dict[str, dict], captions: list) -> Dict[str, dict]:
    """Score columns (``reward`` for the first caption source, ``reward@name`` for the others) as
    ``{caption source: {reward: entry}}``; image-only rewards (one column) go to every source."""
    first = captions[0]
    out: Dict[str, dict] = {c: {} for c in captions}
    for col, e in entries.items():
        key, _, src = col.partition("@")
        if src:
            out[src][key] = e
        else:
            for c in captions:
                if c == first or f"{key}@{c}" not in entries:
                    out[c].setdefault(key, e)
    return out


def _num_bins(bins_doc: dict) -> Optional[int]:
    counts = {v["num_bins"] for v in (bins_doc.get("rewards") or {}).values()}
    return counts.pop() if len(counts) == 1 else None


def join_shard(task: shard_jobs.ShardTask, settings: JoinSettings, bins_doc: dict) -> dict:
    idx = open_source_shard(task.shard)
    captions = read_captions(settings.captions_dir, task.stem, task.source)
    rewards, scored, status = {}, [], {}
    if settings.bins_dir:
        rewards, scored = _read_rewards(settings.bins_dir, task.stem, task.source)
        status = _score_status(bins_doc, task.stem)
    encoded = reader = None
    encode_failures = {}
    if settings.encoded_dir:
        encode_failures = _encode_failures(settings.encoded_dir, task.stem)
        path = check_sidecar(settings.encoded_dir, "encoded", task.stem, task.source)
        enc_idx = load_index(str(path))  # its .idx when the encode stage wrote one, else a scan
        if enc_idx.truncated:
            raise shard_jobs.ShardError(f"{path}: truncated; rerun preprocessing/encode.py on it")
        encoded = (str(path), {enc_idx.key(j): enc_idx.member_dict(j) for j in range(len(enc_idx))})
        reader = MemberReader(max_open=1)
    reward_bins = {"num_bins": _num_bins(bins_doc), "scheme": bins_doc.get("strategy"),
                   "edges_sha256": bins_doc.get("edges_sha256")}
    failures: Dict[str, int] = {}
    skipped: Dict[str, list] = {}

    def skip(reason: str, key: str) -> None:
        failures[reason] = failures.get(reason, 0) + 1
        skipped.setdefault(reason, []).append(key)

    n = 0
    with open(task.path("{stem}.tar"), "wb") as f:
        writer = TarSampleWriter(f)
        for key, members in iter_members(task.shard, idx):
            n += 1
            where = f"{task.shard}:{key}"
            try:
                meta = sample_meta(members, where, captions.get(key))
            except SampleError as e:
                skip(e.reason, key)
                continue
            out = {e: v for e, v in members.items()
                   if e == TEXT_EXT or (e in IMAGE_EXTS and settings.images == "keep")}
            if settings.bins_dir:
                entries = rewards.get(key)
                if entries is None:
                    why = status.get(key, "ok")
                    skip("no_rewards" if why == "ok" else f"no_rewards:{why}", key)
                    continue
                per_caption = _by_caption(entries, scored)
                if "txt" in per_caption:
                    meta["rewards"] = per_caption.pop("txt")
                if per_caption:
                    meta["rewards_by_caption"] = per_caption
                meta["reward_bins"] = reward_bins
            if encoded is not None:
                mem = encoded[1].get(key)
                if mem is None:
                    why = encode_failures.get(key)
                    skip(f"no_latents:{why}" if why else "no_latents", key)
                    continue
                for ext, (off, size, _) in mem.items():
                    out[ext] = reader.read(encoded[0], off, size)
            out[JSON_EXT] = meta
            writer.write(key, out)
            if task.bar is not None:
                task.bar.update(1)
        writer.close()
    if reader is not None:
        reader.close()
    write_index_file(str(task.path("{stem}.idx")), writer.keys, writer.members)
    count_index_problems(idx, failures, skipped)
    return {"samples": n + len(idx.problems), "written": len(writer.keys), "failures": failures,
            "skipped_keys": skipped, "keys_sha256": keys_digest(writer.keys)}


def write_dataset_manifest(out_dir: str, shards, stem_of, settings: JoinSettings, bins_doc: dict) -> str:
    """manifest.json of a complete shard-stage directory (from the shards' done records)."""
    entries = []
    for s in shards:
        stem = stem_of(s)
        rec = shard_jobs.read_record(out_dir, STAGE, stem)
        entries.append({"name": f"{stem}.tar", "num_samples": rec["counts"]["written"],
                        "num_bytes": rec["outputs"][f"{stem}.tar"], "keys_sha256": rec["counts"]["keys_sha256"],
                        "source": rec["source"]})
    extra = {"stage": STAGE, "complete": True, "images": settings.images,
             "reward_keys": sorted(bins_doc.get("rewards") or {}), "num_bins": _num_bins(bins_doc),
             "bins_edges_sha256": bins_doc.get("edges_sha256")}
    return write_manifest(out_dir, entries, extra, replace=True)
