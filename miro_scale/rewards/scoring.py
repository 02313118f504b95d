"""Distributed, resumable reward scoring of webdataset shards.

One process per device (torchrun); shards are split deterministically: shard i of the expanded list
goes to global rank i % WORLD_SIZE. Each shard's result is `{out}/{stem}.parquet`, written to a temp
file and renamed, so it exists only when complete: a rerun skips finished shards and a killed run
loses at most the shards in flight.

Per sample the image is decoded once; each preprocessing View needed by the active rewards is
computed once and shared. Rewards that need text encode each image batch once and score every
caption source against the same image features. Broken images, captions or reward failures become
rows with a status, never a crash.

Output columns: key, status ("ok" or a ";"-joined list of failure kinds), error (first message or
null), then one float32 column per reward (NaN where it could not be computed). A caption-dependent
reward scored against several caption sources gets `{reward}` for the first source and
`{reward}@{source}` for the others. The parquet schema metadata `miro_scoring` records the rewards'
model ids and checkpoint digests; `{stem}.stats.json` beside it has counts and timings.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from miro_scale.atomic import write_bytes_atomic

from .base import Reward, View
from .scores_io import read_scores, scoring_metadata, write_table_atomic  # noqa: F401
from .registry import build_reward, canonical_key

STATUS_OK = "ok"
SUMMARY_NAME = "summary.json"


@dataclass
class ScoreConfig:
    shards: List[str]
    rewards: List[str]
    out_dir: str
    groups: Optional[List[List[str]]] = None      # passes of rewards; default: one pass with all
    captions: List[str] = field(default_factory=lambda: ["txt"])  # caption sources (see data.format.choose_caption)
    variant: str = "pretrained"
    reward_kwargs: Dict[str, dict] = field(default_factory=dict)
    batch_sizes: Dict[str, int] = field(default_factory=dict)
    chunk_size: int = 256          # samples decoded per step
    num_workers: int = 4           # decode threads
    device: Optional[str] = None   # default: cuda:LOCAL_RANK if available else cpu
    precision: str = "bf16"        # autocast dtype on GPU: bf16 | fp16 | fp32
    weights_dtype: str = "fp32"    # dtype the weights are kept in (bf16 halves memory, e.g. VQAScore's 11B)
    progress: bool = True
    rank: Optional[int] = None
    world_size: Optional[int] = None
    draft_decode: bool = False     # JPEG DCT-domain downscaling to >= the largest view (faster on big
                                   # images; values then differ slightly from full-resolution decoding)
    debug_delay: float = 0.0       # seconds to sleep per chunk (tests of kill/resume)


# ----------------------------------------------------------------------------- shards
def shard_stem(path: str) -> str:
    name = os.path.basename(path)
    return name[:-4] if name.endswith(".tar") else name


def assign_shards(shards: Sequence[str], rank: int, world_size: int) -> List[str]:
    stems = [shard_stem(s) for s in shards]
    dup = {s for s in stems if stems.count(s) > 1}
    if dup:
        raise ValueError(f"shard names collide in the output directory: {sorted(dup)[:5]}")
    return [s for i, s in enumerate(shards) if i % world_size == rank]


def output_path(out_dir: str, shard: str, group: Optional[int] = None) -> Path:
    stem = shard_stem(shard)
    if group is None:
        return Path(out_dir) / f"{stem}.parquet"
    return Path(out_dir) / "_parts" / f"{stem}.g{group}.parquet"


# ----------------------------------------------------------------------------- io helpers
def _rows_to_table(rows: Dict[str, list], reward_cols: List[str], meta: dict):
    import pyarrow as pa
    cols = {"key": pa.array(rows["key"], pa.string()), "status": pa.array(rows["status"], pa.string()),
            "error": pa.array(rows["error"], pa.string())}
    for c in reward_cols:
        cols[c] = pa.array(np.asarray(rows[c], dtype=np.float32), pa.float32())
    t = pa.table(cols)
    return t.replace_schema_metadata({"miro_scoring": json.dumps(meta)})


# ----------------------------------------------------------------------------- sample preparation
@dataclass
class Prepared:
    key: str
    views: Dict[str, object]
    captions: Dict[str, Optional[str]]
    failures: List[str]
    error: Optional[str]


def _prepare(key: str, members: dict, where: str, views: Sequence[View], caption_sources: Sequence[str],
             min_size: int) -> Prepared:
    from miro_scale.data.decode import decode_image
    from miro_scale.data.format import SampleError, choose_caption, image_ext, parse_json
    failures: List[str] = []
    error: Optional[str] = None
    out_views: Dict[str, object] = {}
    caps: Dict[str, Optional[str]] = {s: None for s in caption_sources}
    # captions
    meta: dict = {}
    if "json" in members:
        try:
            meta = parse_json(members["json"], where)
        except SampleError as e:
            meta = {}
            if any(s != "txt" for s in caption_sources) or "txt" not in members:
                failures.append(e.reason)
                error = error or str(e)
    txt = None
    if "txt" in members:
        try:
            txt = members["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            failures.append("bad_txt")
            error = error or f"{where}: txt is not UTF-8 ({e})"
    for s in caption_sources:
        try:
            c = choose_caption(txt, meta, s, where)
            if not c.strip():
                raise SampleError("empty_caption", f"{where}: caption {s!r} is empty")
            caps[s] = c
        except SampleError as e:
            if e.reason not in failures:
                failures.append(e.reason)
            error = error or str(e)
    # image
    ext = image_ext(members)
    if ext is None:
        failures.append("missing_image")
        error = error or f"{where}: no image member (have {sorted(members)})"
        return Prepared(key, {}, caps, failures, error)
    try:
        img = decode_image(members[ext], where, min_size=min_size)
        for v in views:
            out_views[v.name] = v.one(img)
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


def _column(reward: Reward, source: str, first: str) -> str:
    return reward.key if (not reward.needs_text or source == first) else f"{reward.key}@{source}"


def reward_columns(rewards: Sequence[Reward], caption_sources: Sequence[str]) -> List[str]:
    cols = []
    for r in rewards:
        srcs = caption_sources if r.needs_text else caption_sources[:1]
        cols.extend(_column(r, s, caption_sources[0]) for s in srcs)
    return cols


# ----------------------------------------------------------------------------- the scorer
class ShardScorer:
    def __init__(self, rewards: Sequence[Reward], cfg: ScoreConfig, device: torch.device):
        self.rewards = list(rewards)
        self.cfg = cfg
        self.device = device
        views = {}
        for r in self.rewards:
            views.setdefault(r.view.name, r.view)
        self.views = list(views.values())
        self.min_size = (max(v.size for v in self.views) if self.views else 0) if cfg.draft_decode else None
        self.cols = reward_columns(self.rewards, cfg.captions)
        self.pool = ThreadPoolExecutor(max(1, cfg.num_workers)) if cfg.num_workers > 0 else None
        self.prefetch = ThreadPoolExecutor(1) if cfg.num_workers > 0 else None
        if device.type == "cuda" and cfg.precision in ("bf16", "fp16"):
            dt = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
            self.autocast = lambda: torch.autocast("cuda", dtype=dt)
        else:
            self.autocast = nullcontext

    def _bs(self, r: Reward) -> int:
        return int(self.cfg.batch_sizes.get(r.key, r.batch_size))

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _run_reward(self, r: Reward, items: List[Prepared], rows: Dict[str, list], base: int,
                    timing: Dict[str, list]):
        srcs = self.cfg.captions if r.needs_text else self.cfg.captions[:1]
        first = self.cfg.captions[0]
        valid = [i for i, p in enumerate(items) if r.view.name in p.views]
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
                self._score_batch(r, items, idx, srcs, first, rows, base)
            except Exception:  # isolate the failing sample(s) one by one
                for i in idx:
                    try:
                        self._score_batch(r, items, [i], srcs, first, rows, base)
                    except Exception as e1:
                        self._fail(rows, base + i, f"reward_error:{r.key}",
                                   f"{r.key}: {type(e1).__name__}: {e1}")
            self._sync()
            timing[r.key][0] += time.perf_counter() - t0
            timing[r.key][1] += len(idx)

    @torch.no_grad()
    def _score_batch(self, r: Reward, items, idx, srcs, first, rows, base):
        imgs = r.view.collate([items[i].views[r.view.name] for i in idx])
        if isinstance(imgs, torch.Tensor):
            imgs = imgs.to(self.device, non_blocking=True)
        with self.autocast():
            if not r.needs_text:
                vals = r.score(imgs, None).float().cpu().numpy()
                for j, i in enumerate(idx):
                    rows[r.key][base + i] = vals[j]
                return
            if r.shares_image_features:
                feats = r.encode_images(imgs)
            for s in srcs:
                col = _column(r, s, first)
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

    def score_shard(self, shard: str, progress=None) -> tuple:
        from miro_scale.data.tario import iter_samples
        rows: Dict[str, list] = {"key": [], "status": [], "error": []}
        for c in self.cols:
            rows[c] = []
        timing = {r.key: [0.0, 0] for r in self.rewards}
        failures: Dict[str, int] = {}
        t_start = time.perf_counter()
        decode_s = 0.0
        stem = shard_stem(shard)

        def prep(kv):
            key, members = kv
            return _prepare(key, members, f"{stem}:{key}", self.views, self.cfg.captions, self.min_size)

        from miro_scale.data.tario import load_index
        try:
            n_index = len(load_index(shard).keys)
            sample_iter = iter_samples(shard)
        except Exception as e:
            raise RuntimeError(f"{shard}: cannot index the shard ({type(e).__name__}: {e})") from e
        if n_index == 0 and os.path.getsize(shard) > 0:
            import tarfile
            if not tarfile.is_tarfile(shard):
                raise RuntimeError(f"{shard}: not a tar file ({os.path.getsize(shard)} bytes, no readable sample)")
        chunks = _chunks(sample_iter, self.cfg.chunk_size)

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
        for st in rows["status"]:
            if st != STATUS_OK:
                for k in st.split(";"):
                    failures[k] = failures.get(k, 0) + 1
        n = len(rows["key"])
        stats = {
            "shard": shard, "num_samples": n, "num_ok": sum(1 for s in rows["status"] if s == STATUS_OK),
            "failures": failures, "seconds": time.perf_counter() - t_start, "decode_wait_seconds": decode_s,
            "rewards": {k: {"seconds": v[0], "images": v[1]} for k, v in timing.items()},
        }
        return rows, stats


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
def _dist_env(cfg: ScoreConfig):
    rank = cfg.rank if cfg.rank is not None else int(os.environ.get("RANK", 0))
    world = cfg.world_size if cfg.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    return rank, world, local


def _merge_parts(shard: str, out_dir: str, ngroups: int) -> bool:
    import pyarrow.parquet as pq
    import pyarrow as pa
    parts = [output_path(out_dir, shard, g) for g in range(ngroups)]
    if not all(p.exists() for p in parts):
        return False
    tables = [pq.read_table(p) for p in parts]
    keys = tables[0].column("key").to_pylist()
    status = tables[0].column("status").to_pylist()
    error = tables[0].column("error").to_pylist()
    cols = {}
    metas = []
    for p, t in zip(parts, tables):
        if t.column("key").to_pylist() != keys:
            raise RuntimeError(f"{p}: keys differ from {parts[0]} (shard changed between passes?)")
        for i, (s, e) in enumerate(zip(t.column("status").to_pylist(), t.column("error").to_pylist())):
            if s != STATUS_OK:
                kinds = [] if status[i] == STATUS_OK else status[i].split(";")
                for k in s.split(";"):
                    if k not in kinds:
                        kinds.append(k)
                status[i] = ";".join(kinds)
                error[i] = error[i] or e
        for name in t.column_names:
            if name not in ("key", "status", "error"):
                cols[name] = t.column(name)
        metas.append(json.loads(t.schema.metadata[b"miro_scoring"]))
    meta = {"shard": shard, "rewards": {k: v for m in metas for k, v in m["rewards"].items()},
            "captions": metas[0]["captions"]}
    table = pa.table({"key": pa.array(keys, pa.string()), "status": pa.array(status, pa.string()),
                      "error": pa.array(error, pa.string()), **cols})
    table = table.replace_schema_metadata({"miro_scoring": json.dumps(meta)})
    # stats: merge the per-group stats files
    stats = None
    for g in range(ngroups):
        sp = Path(str(parts[g]) + ".stats.json")
        s = json.loads(sp.read_text())
        if stats is None:
            stats = s
            stats["seconds"] = s["seconds"]
        else:
            stats["rewards"].update(s["rewards"])
            stats["seconds"] += s["seconds"]
            stats["decode_wait_seconds"] += s["decode_wait_seconds"]
    fails: Dict[str, int] = {}
    for st in status:
        if st != STATUS_OK:
            for k in st.split(";"):
                fails[k] = fails.get(k, 0) + 1
    stats["failures"] = fails
    stats["num_ok"] = sum(1 for s in status if s == STATUS_OK)
    final = output_path(out_dir, shard)
    write_bytes_atomic(Path(str(final)[: -len(".parquet")] + ".stats.json"), json.dumps(stats).encode())
    write_table_atomic(table, final)
    for p in parts:
        p.unlink(missing_ok=True)
        Path(str(p) + ".stats.json").unlink(missing_ok=True)
    return True


def error_path(out_dir: str, shard: str) -> Path:
    return Path(out_dir) / f"{shard_stem(shard)}.error.json"


def stats_path(out_dir: str, shard: str) -> Path:
    return Path(out_dir) / f"{shard_stem(shard)}.stats.json"


def summarize(out_dir: str, shards: Sequence[str], run_info: dict) -> dict:
    n = ok = 0
    fails: Dict[str, int] = {}
    per_reward: Dict[str, list] = {}
    done, missing, failed = [], [], {}
    wait = 0.0
    for s in shards:
        sp = stats_path(out_dir, s)
        if not output_path(out_dir, s).exists() or not sp.exists():
            missing.append(s)
            ep = error_path(out_dir, s)
            if ep.exists():
                failed[s] = json.loads(ep.read_text())["error"]
            continue
        st = json.loads(sp.read_text())
        done.append(s)
        n += st["num_samples"]
        ok += st["num_ok"]
        for k, v in st["failures"].items():
            fails[k] = fails.get(k, 0) + v
        wait += st.get("decode_wait_seconds", 0.0)
        for k, v in st["rewards"].items():
            a = per_reward.setdefault(k, [0.0, 0])
            a[0] += v["seconds"]
            a[1] += v["images"]
    summary = {
        "num_shards": len(shards), "shards_done": len(done), "shards_missing": missing, "shards_failed": failed,
        "num_samples": n, "num_ok": ok, "num_failed": n - ok, "failures_by_kind": dict(sorted(fails.items())),
        "decode_wait_seconds": round(wait, 3),  # scorer idle, waiting for decoded images (all shards)
        "rewards": {k: {"images": v[1], "seconds": round(v[0], 4),
                        "images_per_s": (v[1] / v[0]) if v[0] > 0 else None} for k, v in per_reward.items()},
        **run_info,
    }
    write_bytes_atomic(Path(out_dir) / SUMMARY_NAME, json.dumps(summary, indent=2).encode())
    return summary


def parse_groups(groups: Optional[str], rewards: Sequence[str]) -> List[List[str]]:
    if not groups:
        return [list(rewards)]
    out = [[canonical_key(k) for k in g.split(",") if k.strip()] for g in groups.split(";") if g.strip()]
    flat = [k for g in out for k in g]
    if sorted(flat) != sorted(rewards) or len(set(flat)) != len(flat):
        raise ValueError(f"--groups must list every reward exactly once: groups {out} vs rewards {list(rewards)}")
    return out


def run_scoring(cfg: ScoreConfig) -> Optional[dict]:
    import torch.distributed as dist
    rank, world, local = _dist_env(cfg)
    cfg.rewards = [canonical_key(k) for k in cfg.rewards]
    if cfg.device:
        device = torch.device(cfg.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    initialized_here = False
    if world > 1 and not dist.is_initialized() and "MASTER_ADDR" in os.environ:
        from datetime import timedelta
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(hours=48))
        initialized_here = True
    groups = [[canonical_key(k) for k in g] for g in (cfg.groups or [cfg.rewards])]
    if sorted(k for g in groups for k in g) != sorted(cfg.rewards):
        raise ValueError(f"groups {groups} must partition the rewards {cfg.rewards}")
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    mine = assign_shards(cfg.shards, rank, world)
    # stale temp files of ours from a killed run
    for p in list(Path(cfg.out_dir).glob(".*.tmp.*")) + list(Path(cfg.out_dir).glob("_parts/.*.tmp.*")):
        if any(p.name.startswith(f".{shard_stem(s)}.") for s in mine):
            p.unlink(missing_ok=True)
    todo = [s for s in mine if not output_path(cfg.out_dir, s).exists()]
    ngroups = len(groups)
    t_run = time.perf_counter()
    images_this_run = 0
    if todo:
        from tqdm import tqdm
        total = None
        try:  # a total only when index files make it cheap (no scan of every tar before starting)
            from miro_scale.data.tario import index_path_for, load_index
            if all(os.path.exists(index_path_for(s)) for s in todo):
                total = sum(len(load_index(s).keys) * sum(1 for g in range(ngroups)
                            if ngroups == 1 or not output_path(cfg.out_dir, s, g).exists()) for s in todo)
        except Exception:
            total = None
        bar = tqdm(total=total, unit="img", desc=f"rank {rank}", position=rank, dynamic_ncols=True,
                   disable=not cfg.progress, file=sys.stderr)
        for g, keys in enumerate(groups):
            pending = [s for s in todo if ngroups == 1 or not output_path(cfg.out_dir, s, g).exists()]
            if not pending:
                continue
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.weights_dtype]
            rewards = []
            for k in keys:
                r = build_reward(k, cfg.variant, device=device, dtype=dtype, **cfg.reward_kwargs.get(k, {}))
                if dtype != torch.float32:
                    for m in r.modules():
                        m.to(dtype=dtype)
                rewards.append(r)
            scorer = ShardScorer(rewards, cfg, device)
            meta_rewards = {r.key: r.info() for r in rewards}
            for shard in pending:
                bar.set_postfix_str(shard_stem(shard))
                try:
                    rows, stats = scorer.score_shard(shard, bar)
                except Exception as e:  # an unreadable shard: recorded, left for a rerun, not fatal
                    msg = f"{shard}: {type(e).__name__}: {e}"
                    print(f"[rank {rank}] shard failed, skipped: {msg}", file=sys.stderr, flush=True)
                    write_bytes_atomic(error_path(cfg.out_dir, shard), json.dumps({"shard": shard, "error": msg}).encode())
                    continue
                error_path(cfg.out_dir, shard).unlink(missing_ok=True)
                images_this_run += stats["num_samples"]
                table = _rows_to_table(rows, scorer.cols, {"shard": shard, "rewards": meta_rewards,
                                                           "captions": cfg.captions})
                target = output_path(cfg.out_dir, shard, None if ngroups == 1 else g)
                sp = Path(str(target) + ".stats.json") if ngroups > 1 else stats_path(cfg.out_dir, shard)
                write_bytes_atomic(sp, json.dumps(stats).encode())
                write_table_atomic(table, target)  # the parquet is the commit marker: written last
            del scorer, rewards
            if device.type == "cuda":
                torch.cuda.empty_cache()
        bar.close()
        if ngroups > 1:
            for s in todo:
                if not error_path(cfg.out_dir, s).exists():
                    _merge_parts(s, cfg.out_dir, ngroups)
    elapsed = time.perf_counter() - t_run
    if dist.is_initialized():
        dist.barrier()
        gathered = [None] * world
        dist.all_gather_object(gathered, {"rank": rank, "images": images_this_run, "seconds": elapsed})
    else:
        gathered = [{"rank": rank, "images": images_this_run, "seconds": elapsed}]
    summary = None
    if rank == 0:
        run_info = {"world_size": world, "rewards_requested": cfg.rewards, "groups": groups,
                    "captions": cfg.captions, "variant": cfg.variant,
                    "this_run": {"images": sum(g["images"] for g in gathered),
                                 "seconds": max(g["seconds"] for g in gathered),
                                 "per_rank": gathered}}
        tr = run_info["this_run"]
        tr["images_per_s"] = tr["images"] / tr["seconds"] if tr["seconds"] > 0 else None
        summary = summarize(cfg.out_dir, cfg.shards, run_info)
    if initialized_here:
        dist.destroy_process_group()
    return summary
