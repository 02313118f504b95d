"""Per-shard sidecars: what each preprocessing stage writes beside a source shard, and how the next
stage reads a source shard together with them (one way to read a sample before training).

Every sidecar is one file per source shard ``STEM.tar``, written by the shard-job runner
(:mod:`miro_scale.shard_jobs`) with a done record that names the exact source tar (its fingerprint):

=========  ===================================  ================  =====================================
kind       file                                 stage             content (keyed by the sample key)
=========  ===================================  ================  =====================================
captions   ``STEM.captions.parquet``            caption           key, status, error, caption_<name>
encoded    ``STEM.encoded.tar`` (+ ``.idx``)    encode            latent_mean/std.npy, text_emb[_<name>].npy
scores     ``STEM.scores.parquet``              score             key, status, error, <reward>[@<caption>]
rewards    ``STEM.rewards.parquet``             bin               key, <reward>[@<caption>].raw/.bin/.value
=========  ===================================  ================  =====================================

A stage that reads a sidecar checks its done record first: a missing record (the stage has not
finished that shard) or one made from another file than the source tar at hand is a
:class:`~miro_scale.shard_jobs.ShardError` that names the sidecar and the stage to run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

from miro_scale.shard_jobs import ShardError, read_record

from .format import SampleError, choose_caption, parse_json
from .tario import ShardIndex, load_index

# kind -> (stage that writes it, file name template, the command that makes it)
SIDECARS = {
    "captions": ("caption", "{stem}.captions.parquet", "preprocessing/caption.py"),
    "encoded": ("encode", "{stem}.encoded.tar", "preprocessing/encode.py"),
    "scores": ("score", "{stem}.scores.parquet", "preprocessing/score.py"),
    "rewards": ("bin", "{stem}.rewards.parquet", "preprocessing/bin.py"),
}


def check_sidecar(directory: str, kind: str, stem: str, source: dict) -> Path:
    """The path of ``stem``'s ``kind`` sidecar in ``directory``, after checking that its stage
    finished it from the source tar whose fingerprint is ``source``."""
    stage, template, command = SIDECARS[kind]
    path = Path(directory) / template.format(stem=stem)
    rec = read_record(directory, stage, stem)
    if rec is None:
        raise ShardError(f"{path}: no finished {kind} for shard {stem} (run {command} on it, or leave the "
                         "shard out)")
    if rec.get("source") != source:
        raise ShardError(f"{path}: made from another file than {source['name']} (its record: "
                         f"{rec.get('source')}, the tar now: {source}); rerun {command}")
    return path


def open_source_shard(path: str) -> ShardIndex:
    """The index of a source shard for a preprocessing stage. A tar that is empty, unreadable or
    truncated is an error for the whole shard (a rerun retries it: downloads get completed), never
    a partial result."""
    if os.path.getsize(path) == 0:
        raise ShardError(f"{path}: empty file (0 bytes)")
    idx = load_index(path)
    if idx.truncated:
        where = f" inside sample {idx.cut_key}" if idx.cut_key else ""
        raise ShardError(f"{path}: truncated or not a tar{where} ({len(idx)} complete samples before "
                         "the damage); re-download it or leave it out")
    return idx


def count_index_problems(idx: ShardIndex, failures: Dict[str, int], skipped: Dict[str, list]) -> None:
    """Add what a shard's index left out (duplicate keys, bad member names) to a stage's counts of
    failures by reason and its skipped keys by reason."""
    for reason, name in idx.problems:
        failures[reason] = failures.get(reason, 0) + 1
        skipped.setdefault(reason, []).append(name)


def iter_members(path: str, idx: ShardIndex) -> Iterator[Tuple[str, dict]]:
    """``(key, {ext: bytes})`` for each sample of a shard, in tar order."""
    with open(path, "rb") as f:
        for j in range(len(idx)):
            data = {}
            for ext, (off, size, _) in idx.member_dict(j).items():
                f.seek(off)
                data[ext] = f.read(size)
            yield idx.key(j), data


def read_captions(directory: Optional[str], stem: str, source: dict) -> Dict[str, Dict[str, str]]:
    """``{key: {caption name: text}}`` from the caption stage's sidecar (empty without a directory).
    Rows whose caption failed are left out, so the sample lacks that caption."""
    if not directory:
        return {}
    import pyarrow.parquet as pq

    t = pq.read_table(check_sidecar(directory, "captions", stem, source)).to_pydict()
    names = [c[len("caption_"):] for c in t if c.startswith("caption_")]
    out: Dict[str, Dict[str, str]] = {}
    for i, key in enumerate(t["key"]):
        caps = {n: t[f"caption_{n}"][i] for n in names if isinstance(t[f"caption_{n}"][i], str)}
        if caps:
            out[key] = caps
    return out


def sample_meta(members: dict, where: str, captions: Optional[dict] = None) -> dict:
    """The sample's json metadata (``{}`` without a json member) with the caption sidecar's
    captions merged into ``captions`` (the sidecar wins: it is the newer product)."""
    meta = parse_json(members["json"], where) if "json" in members else {}
    if captions:
        caps = meta.get("captions")
        meta["captions"] = {**(caps if isinstance(caps, dict) else {}), **captions}
    return meta


def sample_captions(members: dict, meta: dict, where: str, sources: Sequence[str],
                    allow_empty: bool = False) -> Tuple[dict, dict]:
    """``({source: caption}, {source: SampleError})`` for each requested caption source of a sample
    (``txt``: the txt member, else json ``caption``; a name: json/sidecar ``captions[name]``); a
    source that cannot be used has an error instead (``bad_txt``, ``missing_txt``,
    ``missing_caption``, ``empty_caption`` unless ``allow_empty``)."""
    txt = txt_error = None
    if "txt" in members:
        try:
            txt = members["txt"].decode("utf-8-sig").strip()
        except UnicodeDecodeError as e:
            txt_error = SampleError("bad_txt", f"{where}: txt is not UTF-8 ({e})")
    captions, errors = {}, {}
    for s in sources:
        try:
            c = choose_caption(txt, meta, s, where)
            if not c.strip() and not allow_empty:
                raise SampleError("empty_caption", f"{where}: caption {s!r} is empty")
            captions[s] = c
        except SampleError as e:
            errors[s] = txt_error if (s == "txt" and txt_error is not None) else e
    return captions, errors
