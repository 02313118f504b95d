"""Distributed, resumable reward scoring of webdataset shards (the score stage).

Runs on the shard-job runner (:mod:`miro_scale.shard_jobs`): one process per device (torchrun),
shard i of the list goes to global rank i % WORLD_SIZE, ``{out}/{stem}.scores.parquet`` is written
atomically with a done record naming the source tar, so a rerun skips finished shards, a killed run
loses at most the shards in flight, and another dataset's scores are never taken as done.

Per sample the image is decoded once; each distinct preprocessing View needed by the active rewards
(by content, ``View.spec``, not name) is computed once and shared by every reward that uses it, and
views share their common steps (``compute_views``). Rewards that need text encode each image batch
once and score every caption source against the same image features. Broken images, captions or
reward failures become rows with a status, never a crash; an unreadable or truncated tar fails its
shard (retried by the next run).

Output columns: key, status ("ok" or a ";"-joined list of failure kinds), error (first message or
null), then one float32 column per reward (NaN where it could not be computed). A caption-dependent
reward scored against several caption sources gets `{reward}` for the first source and
`{reward}@{source}` for the others; one given a single source (``caption_for``, as the release gave
the short caption to the 77-token models and the long one to jina-clip-v2 and VQAScore) gets
`{reward}`. Values are in the ``scale`` of miro_scale.rewards.units (raw by default; ``release`` is
what MIRO's data preparation binned). Each reward runs in its own precision (weights and autocast:
miro_scale.rewards.precision). The parquet schema metadata `miro_scoring` records the rewards'
model ids and checkpoint digests, the caption sources, the scale and the precisions. Captions are
read from the sample (txt, json ``captions``) and from the caption stage's sidecars
(``captions_dir``); ``<PERSON>`` tags are removed before scoring, as the release did; an empty
caption is a failure (``empty_caption``) unless ``empty_captions="score"`` (the release scored it).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from miro_scale import shard_jobs
from miro_scale.data.sidecars import (count_index_problems, iter_members, open_source_shard, read_captions,
                                      sample_captions, sample_meta)

from . import units
from .base import Reward, View, compute_views
from .precision import DTYPES, load_policy
from .precision import resolve as resolve_precision
from .registry import build_reward, canonical_key
from miro_scale.atomic import write_parquet_atomic

STATUS_OK = "ok"
STAGE = "score"


@dataclass
class ScoreConfig:
    shards: List[str]
    rewards: List[str]
    out_dir: str
    groups: Optional[List[List[str]]] = None      # passes of rewards; default: one pass with all
    caption_sources: List[str] = field(default_factory=lambda: ["txt"])  # see data.format.choose_caption
    caption_for: Dict[str, str] = field(default_factory=dict)  # reward -> the one caption source it scores
    empty_captions: str = "skip"   # skip (NaN, status empty_caption) | score (as the release did)
    scale: str = "raw"             # raw | release | paper (miro_scale.rewards.units)
    captions_dir: Optional[str] = None            # the caption stage's sidecars (preprocessing/caption.py)
    variant: str = "pretrained"
    reward_kwargs: Dict[str, dict] = field(default_factory=dict)
    batch_sizes: Dict[str, int] = field(default_factory=dict)
    chunk_size: int = 256          # samples decoded per step
    num_workers: int = 4           # decode threads
    device: Optional[str] = None   # default: cuda:LOCAL_RANK if available else cpu
    precision: str = "auto"        # per reward weights + autocast dtype (miro_scale.rewards.precision.resolve)
    precision_policy: Optional[str] = None  # policy file for "auto" (default configs/score_precision.json)
    progress: bool = True
    rank: Optional[int] = None
    world_size: Optional[int] = None
    retries: int = 1
    draft_decode: bool = False     # JPEG DCT-domain downscaling to >= the largest view (faster on big
                                   # images; values then differ slightly from full-resolution decoding)
    debug_delay: float = 0.0       # seconds to sleep per chunk (tests of kill/resume)


def _rows_to_table(rows: Dict[str, list], reward_cols: List[str], meta: dict, scale: str = "raw"):
    import pyarrow as pa
    cols = {"key": pa.array(rows["key"], pa.string()), "status": pa.array(rows["status"], pa.string()),
            "error": pa.array(rows["error"], pa.string())}
    for c in reward_cols:
        cols[c] = pa.array(np.asarray(units.from_raw(c, rows[c], scale), dtype=np.float32), pa.float32())
    t = pa.table(cols)
    return t.replace_schema_metadata({"miro_scoring": json.dumps(meta, sort_keys=True)})


# ----------------------------------------------------------------------------- sample preparation
@dataclass
class Prepared:
    key: str
    views: Dict[tuple, object]  # View.spec -> the view of this sample's image
    captions: Dict[str, Optional[str]]
    failures: List[str]
    error: Optional[str]


def _prepare(key: str, members: dict, where: str, views: Sequence[View], caption_sources: Sequence[str],
             min_size: int, sidecar_captions: Optional[dict] = None, allow_empty: bool = False) -> Prepared:
    from miro_scale.data.decode import decode_image
    from miro_scale.data.format import SampleError, clean_caption, image_ext
    failures: List[str] = []
    error: Optional[str] = None
    out_views: Dict[tuple, object] = {}
    try:
        meta = sample_meta(members, where, sidecar_captions)
    except SampleError as e:
        meta = sample_meta({}, where, sidecar_captions)
        if any(s != "txt" for s in caption_sources) or "txt" not in members:
            failures.append(e.reason)
            error = str(e)
    found, errors = sample_captions(members, meta, where, caption_sources, allow_empty=allow_empty)
    caps: Dict[str, Optional[str]] = {s: (clean_caption(found[s]) if s in found else None)
                                      for s in caption_sources}
    for e in errors.values():
        if e.reason not in failures:
            failures.append(e.reason)
        error = error or str(e)
    ext = image_ext(members)
    if ext is None:
        failures.append("missing_image")
        error = error or f"{where}: no image member (have {sorted(members)})"
        return Prepared(key, {}, caps, failures, error)
    try:
        img = decode_image(members[ext], where, min_size=min_size)
        out_views = compute_views(img, views)
    except SampleError as e:
        failures.append(e.reason)
        error = error or str(e)
    except Exception as e:  # anything else the decoder or a view raises
        failures.append("corrupt_image")
        error = error or f"{where}: {type(e).__name__}: {e}"
    return Prepared(key, out_views, caps, failures, error)


def _chunks(it, n):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def reward_sources(reward: Reward, caption_sources: Sequence[str], caption_for: Mapping[str, str]) -> List[str]:
    """The caption sources a reward is scored on: its one source in ``caption_for``, else all of
    ``caption_sources`` (an image-only reward: the first, for its column's name)."""
    if not reward.needs_text:
        return list(caption_sources[:1])
    if reward.key in caption_for:
        return [caption_for[reward.key]]
    return list(caption_sources)


def _column(reward: Reward, source: str, caption_sources: Sequence[str], caption_for: Mapping[str, str]) -> str:
    plain = not reward.needs_text or reward.key in caption_for or source == caption_sources[0]
    return reward.key if plain else f"{reward.key}@{source}"


def reward_columns(rewards: Sequence[Reward], caption_sources: Sequence[str],
                   caption_for: Optional[Mapping[str, str]] = None) -> List[str]:
    caption_for = caption_for or {}
    return [_column(r, s, caption_sources, caption_for) for r in rewards
            for s in reward_sources(r, caption_sources, caption_for)]


def sources_to_read(cfg: "ScoreConfig") -> List[str]:
    """Every caption source a sample must provide: the scored ones and those of ``caption_for``."""
    return list(dict.fromkeys(list(cfg.caption_sources) + list(cfg.caption_for.values())))


# ----------------------------------------------------------------------------- the scorer
class ShardScorer:
    def __init__(self, rewards: Sequence[Reward], cfg: ScoreConfig, device: torch.device,
                 precision: Mapping[str, str]):
        self.rewards = list(rewards)
        self.cfg = cfg
        self.device = device
        self.views = list({r.view.spec: r.view for r in self.rewards}.values())
        self.min_size = (max(v.size for v in self.views) if self.views else 0) if cfg.draft_decode else None
        self.sources = sources_to_read(cfg)
        self.cols = reward_columns(self.rewards, cfg.caption_sources, cfg.caption_for)
        self.pool = ThreadPoolExecutor(max(1, cfg.num_workers)) if cfg.num_workers > 0 else None
        self.prefetch = ThreadPoolExecutor(1) if cfg.num_workers > 0 else None
        self.precision = dict(precision)

    def autocast(self, r: Reward):
        p = self.precision.get(r.key, "fp32")
        if p == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[p])

    def _bs(self, r: Reward) -> int:
        return int(self.cfg.batch_sizes.get(r.key, r.batch_size))

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _run_reward(self, r: Reward, items: List[Prepared], rows: Dict[str, list], base: int,
                    timing: Dict[str, list]):
        srcs = reward_sources(r, self.cfg.caption_sources, self.cfg.caption_for)
        valid = [i for i, p in enumerate(items) if r.view.spec in p.views]
        if r.needs_text:
            # bucket by caption length (first available source) so batches pad little
            def clen(i):
                c = next((items[i].captions[s] for s in srcs if items[i].captions[s] is not None), "")
                return len(c)
            valid.sort(key=clen)
        bs = self._bs(r)
        for b0 in range(0, len(valid), bs):
            idx = valid[b0:b0 + bs]
            t0 = time.perf_counter()
            try:
                self._score_batch(r, items, idx, srcs, rows, base)
            except Exception:  # isolate the failing sample(s) one by one
                for i in idx:
                    try:
                        self._score_batch(r, items, [i], srcs, rows, base)
                    except Exception as e1:
                        self._fail(rows, base + i, f"reward_error:{r.key}",
                                   f"{r.key}: {type(e1).__name__}: {e1}")
            self._sync()
            timing[r.key][0] += time.perf_counter() - t0
            timing[r.key][1] += len(idx)

    @torch.no_grad()
    def _score_batch(self, r: Reward, items, idx, srcs, rows, base):
        imgs = r.view.collate([items[i].views[r.view.spec] for i in idx])
        if isinstance(imgs, torch.Tensor):
            imgs = imgs.to(self.device, non_blocking=True)
        with self.autocast(r):
            if not r.needs_text:
                vals = r.score(imgs, None).float().cpu().numpy()
                for j, i in enumerate(idx):
                    rows[r.key][base + i] = vals[j]
                return
            if r.shares_image_features:
                feats = r.encode_images(imgs)
            for s in srcs:
                col = _column(r, s, self.cfg.caption_sources, self.cfg.caption_for)
                sel = [j for j, i in enumerate(idx) if items[i].captions[s] is not None]
                if not sel:
                    continue
                caps = [items[idx[j]].captions[s] for j in sel]
                if r.shares_image_features:
                    if len(sel) == len(idx):
                        f = feats
                    else:
                        f = _select(feats, sel)
                    vals = r.score_features(f, caps).float().cpu().numpy()
                else:
                    sub = imgs[sel] if isinstance(imgs, torch.Tensor) else [imgs[j] for j in sel]
                    vals = r.score(sub, caps).float().cpu().numpy()
                for k, j in enumerate(sel):
                    rows[col][base + idx[j]] = vals[k]

    @staticmethod
    def _fail(rows, row, kind, msg):
        st = rows["status"][row]
        kinds = [] if st == STATUS_OK else st.split(";")
        if kind not in kinds:
            kinds.append(kind)
        rows["status"][row] = ";".join(kinds)
        if rows["error"][row] is None:
            rows["error"][row] = msg

    def score_shard(self, shard: str, captions: Optional[dict] = None, progress=None) -> tuple:
        """Score one source shard: (rows, counts, timing). ``captions``: the caption sidecar's
        ``{key: {name: text}}``."""
        rows: Dict[str, list] = {"key": [], "status": [], "error": []}
        for c in self.cols:
            rows[c] = []
        timing = {r.key: [0.0, 0] for r in self.rewards}
        t_start = time.perf_counter()
        decode_s = 0.0
        stem = shard_jobs.shard_stem(shard)
        idx = open_source_shard(shard)
        captions = captions or {}

        def prep(kv):
            key, members = kv
            return _prepare(key, members, f"{stem}:{key}", self.views, self.sources, self.min_size,
                            captions.get(key), allow_empty=self.cfg.empty_captions == "score")

        chunks = _chunks(iter_members(shard, idx), self.cfg.chunk_size)

        def load_next():  # runs in the prefetch thread: reads and decodes the next chunk
            chunk = next(chunks, None)
            if chunk is None:
                return None
            return list(self.pool.map(prep, chunk)) if self.pool else [prep(kv) for kv in chunk]

        # decode chunk i+1 while the models score chunk i
        fut = self.prefetch.submit(load_next) if self.prefetch else None
        while True:
            t0 = time.perf_counter()
            items = fut.result() if fut is not None else load_next()
            decode_s += time.perf_counter() - t0  # time the scorer waited for decoded images
            if items is None:
                break
            if self.prefetch:
                fut = self.prefetch.submit(load_next)
            base = len(rows["key"])
            for p in items:
                rows["key"].append(p.key)
                rows["status"].append(STATUS_OK if not p.failures else ";".join(dict.fromkeys(p.failures)))
                rows["error"].append(p.error)
                for c in self.cols:
                    rows[c].append(float("nan"))
            for r in self.rewards:
                self._run_reward(r, items, rows, base, timing)
            if self.cfg.debug_delay:
                time.sleep(self.cfg.debug_delay)
            if progress is not None:
                progress.update(len(items))
        failures, skipped = _status_counts(rows["status"]), {}
        count_index_problems(idx, failures, skipped)  # left out of the index: not rows, but counted and named
        n = len(rows["key"])
        counts = {"samples": n, "ok": sum(1 for s in rows["status"] if s == STATUS_OK), "failures": failures,
                  "skipped_keys": skipped,
                  "rewards": {k: {"images": v[1]} for k, v in timing.items()}}
        timing_out = {"total": time.perf_counter() - t_start, "decode_wait": decode_s,
                      "rewards": {k: v[0] for k, v in timing.items()}}
        return rows, counts, timing_out


def _status_counts(statuses) -> Dict[str, int]:
    """Failure kinds of a shard's rows (a status is "ok" or ";"-joined kinds), counted."""
    failures: Dict[str, int] = {}
    for st in statuses:
        if st != STATUS_OK:
            for k in st.split(";"):
                failures[k] = failures.get(k, 0) + 1
    return failures


def _select(feats, sel):
    if isinstance(feats, torch.Tensor):
        return feats[torch.as_tensor(sel, device=feats.device)]
    if isinstance(feats, list):
        return [feats[j] for j in sel]
    if isinstance(feats, tuple):
        return tuple(_select(f, sel) for f in feats)
    if isinstance(feats, dict):
        return {k: _select(v, sel) for k, v in feats.items()}
    raise TypeError(type(feats).__name__)


# ----------------------------------------------------------------------------- driver
def parse_groups(groups: Optional[str], rewards: Sequence[str]) -> List[List[str]]:
    if not groups:
        return [list(rewards)]
    out = [[canonical_key(k) for k in g.split(",") if k.strip()] for g in groups.split(";") if g.strip()]
    flat = [k for g in out for k in g]
    if sorted(flat) != sorted(rewards) or len(set(flat)) != len(flat):
        raise ValueError(f"--groups must list every reward exactly once: groups {out} vs rewards {list(rewards)}")
    return out


def _params(cfg: ScoreConfig, keys: Sequence[str], precision: Mapping[str, str]) -> dict:
    return {"rewards": list(keys), "caption_sources": cfg.caption_sources, "variant": cfg.variant,
            "caption_for": {k: v for k, v in sorted(cfg.caption_for.items()) if k in keys},
            "empty_captions": cfg.empty_captions, "scale": cfg.scale,
            "reward_kwargs": {k: cfg.reward_kwargs.get(k, {}) for k in keys},
            "precision": {k: precision[k] for k in keys}, "draft_decode": cfg.draft_decode,
            "captions_dir": os.path.abspath(cfg.captions_dir) if cfg.captions_dir else None}


def _merge_parts(task: shard_jobs.ShardTask, parts_dir: Path, ngroups: int) -> dict:
    """The merge pass of a multi-group run: the groups' part files of one shard as one table."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    tables, recs = [], []
    for g in range(ngroups):
        stage = f"{STAGE}-g{g}"
        rec = shard_jobs.read_record(parts_dir, stage, task.stem)
        if rec is None or rec["source"] != task.source:
            raise shard_jobs.ShardError(f"{task.shard}: group {g}'s scores are missing or stale")
        tables.append(pq.read_table(parts_dir / f"{task.stem}.g{g}.parquet"))
        recs.append(rec)
    keys = tables[0].column("key").to_pylist()
    status = tables[0].column("status").to_pylist()
    error = tables[0].column("error").to_pylist()
    cols, meta_rewards = {}, {}
    for g, t in enumerate(tables):
        if t.column("key").to_pylist() != keys:
            raise shard_jobs.ShardError(f"{task.shard}: group {g} has other keys than group 0")
        for i, (st, e) in enumerate(zip(t.column("status").to_pylist(), t.column("error").to_pylist())):
            if st != STATUS_OK:
                kinds = [] if status[i] == STATUS_OK else status[i].split(";")
                status[i] = ";".join(dict.fromkeys(kinds + st.split(";")))
                error[i] = error[i] or e
        cols.update({n: t.column(n) for n in t.column_names if n not in ("key", "status", "error")})
        meta_rewards.update(json.loads(t.schema.metadata[b"miro_scoring"])["rewards"])
    meta = json.loads(tables[0].schema.metadata[b"miro_scoring"])
    meta["rewards"] = meta_rewards
    table = pa.table({"key": pa.array(keys, pa.string()), "status": pa.array(status, pa.string()),
                      "error": pa.array(error, pa.string()), **cols})
    write_parquet_atomic(table.replace_schema_metadata({"miro_scoring": json.dumps(meta, sort_keys=True)}),
                       task.path("{stem}.scores.parquet"))
    counts: dict = {}
    for rec in recs:
        shard_jobs._sum_into(counts, {"rewards": rec["counts"]["rewards"]})
    failures = _status_counts(status)
    for reason, names in recs[0]["counts"].get("skipped_keys", {}).items():
        failures[reason] = failures.get(reason, 0) + len(names)
    timing: dict = {}
    for rec in recs:
        shard_jobs._sum_into(timing, {k: v for k, v in rec["timing"].items() if k != "seconds"})
    return {"samples": len(keys), "ok": status.count(STATUS_OK), "failures": failures,
            "skipped_keys": recs[0]["counts"].get("skipped_keys", {}), "rewards": counts["rewards"],
            "timing": timing}


def run_scoring(cfg: ScoreConfig) -> Optional[dict]:
    """Score every shard (this rank's share); returns the summary on rank 0."""
    rank, world = shard_jobs.dist_env()
    rank = cfg.rank if cfg.rank is not None else rank
    world = cfg.world_size if cfg.world_size is not None else world
    local = int(os.environ.get("LOCAL_RANK", 0))
    cfg.rewards = [canonical_key(k) for k in cfg.rewards]
    if cfg.device:
        device = torch.device(cfg.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    groups = [[canonical_key(k) for k in g] for g in (cfg.groups or [cfg.rewards])]
    if sorted(k for g in groups for k in g) != sorted(cfg.rewards):
        raise ValueError(f"groups {groups} must partition the rewards {cfg.rewards}")
    out = Path(cfg.out_dir)
    parts_dir = out / "_parts"
    if cfg.scale not in units.SCALES:
        raise ValueError(f"scale must be one of {', '.join(units.SCALES)}, got {cfg.scale!r}")
    if cfg.empty_captions not in ("skip", "score"):
        raise ValueError(f"empty_captions must be skip or score, got {cfg.empty_captions!r}")
    cfg.caption_for = {canonical_key(k): v for k, v in cfg.caption_for.items()}
    precision = resolve_precision(cfg.precision, cfg.rewards, device,
                                  load_policy(cfg.precision_policy) if cfg.precision_policy else None)
    final = shard_jobs.ShardJob(stage=STAGE, out_dir=str(out), outputs=["{stem}.scores.parquet"],
                                params=_params(cfg, cfg.rewards, precision), process=None, retries=cfg.retries,
                                progress=cfg.progress)

    def scoring_job(keys, stage, out_dir, output):
        state = {}  # models are built on the first shard that needs them (a rerun may need none)

        def process(task: shard_jobs.ShardTask) -> dict:
            if "scorer" not in state:
                rewards = []
                for k in keys:
                    dtype = DTYPES[precision[k]]
                    # builders place weights on the device in the dtype (what must stay fp32 stays fp32)
                    rewards.append(build_reward(k, cfg.variant, device=device, dtype=dtype,
                                                **cfg.reward_kwargs.get(k, {})))
                state["scorer"] = ShardScorer(rewards, cfg, device, precision)
            scorer = state["scorer"]
            captions = read_captions(cfg.captions_dir, task.stem, task.source)
            rows, counts, timing = scorer.score_shard(task.shard, captions, task.bar)
            meta = {"shard": os.path.basename(task.shard), "rewards": {r.key: r.info() for r in scorer.rewards},
                    "captions": cfg.caption_sources, "caption_for": cfg.caption_for, "scale": cfg.scale,
                    "precision": {k: precision[k] for k in keys}}
            write_parquet_atomic(_rows_to_table(rows, scorer.cols, meta, cfg.scale), task.path(output))
            counts["timing"] = timing
            return counts

        job = shard_jobs.ShardJob(stage=stage, out_dir=str(out_dir), outputs=[output],
                                  params=_params(cfg, keys, precision), process=process, retries=cfg.retries,
                                  progress=cfg.progress)
        return job, state

    if len(groups) == 1:
        job, state = scoring_job(cfg.rewards, STAGE, out, "{stem}.scores.parquet")
        summary = shard_jobs.run(job, cfg.shards, rank, world)
    else:
        pending = [s for s in shard_jobs.assign(cfg.shards, rank, world) if not final.is_done(s)[0]]
        for g, keys in enumerate(groups):  # one pass per group: its models alone in memory
            job, state = scoring_job(keys, f"{STAGE}-g{g}", parts_dir, f"{{stem}}.g{g}.parquet")
            shard_jobs.run(job, pending, 0, 1)
            state.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        final.process = lambda task: _merge_parts(task, parts_dir, len(groups))
        summary = shard_jobs.run(final, cfg.shards, rank, world)
        for s in pending:
            if final.is_done(s)[0]:
                for g in range(len(groups)):
                    stem = shard_jobs.shard_stem(s)
                    (parts_dir / f"{stem}.g{g}.parquet").unlink(missing_ok=True)
                    shard_jobs.done_path(parts_dir, f"{STAGE}-g{g}", stem).unlink(missing_ok=True)
        if summary is not None and summary["complete"]:
            shutil.rmtree(parts_dir, ignore_errors=True)
    if summary is not None:
        summary["images_per_s"] = images_per_second(summary)
    return summary


def images_per_second(summary: dict) -> Dict[str, Optional[float]]:
    """Per reward: images scored / seconds in that reward's model, over the finished shards."""
    out = {}
    for k, v in summary["counts"].get("rewards", {}).items():
        sec = summary["timing"].get("rewards", {}).get(k, 0.0)
        out[k] = round(v["images"] / sec, 3) if sec > 0 else None
    return out
