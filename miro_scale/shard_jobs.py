"""The runner every per-shard stage uses (caption, encode, score, bin, shard).

A stage is a function ``process(task) -> counts`` that reads one input shard and writes that shard's
outputs to the temporary paths it is handed. The runner does the rest, the same way for every stage:

* shard resolution is the caller's (``miro_scale.data.plan.resolve_shards``); input ``i`` of the list
  goes to global rank ``i % WORLD_SIZE`` (torchrun, or ``RANK``/``WORLD_SIZE`` set by hand for
  independent jobs such as a SLURM array);
* an output is finished when its **done record** ``{out}/{stem}.{stage}.done.json`` exists and
  matches: the input's fingerprint (size and SHA-256 of its first and last 64 KiB, so the outputs
  of another dataset with the same shard names are never taken as done), the digest of the stage's
  parameters, and the size of every output. Finished shards are skipped; anything else is redone;
* outputs are written to hidden temporary names, renamed into place when the whole shard is done,
  and the done record is written last (a kill leaves either no record or a complete shard);
* a shard that fails (unreadable or truncated tar, a model error...) gets ``{stem}.{stage}.error.json``
  with the message and attempt count, is retried ``retries`` times, and again by the next run;
* per-shard counts go into the done record; ``{out}/{stage}.summary.json`` (rank 0, after all ranks
  finish; or each independent job) sums them and lists the shards that are missing or failed, and
  ``{out}/{stage}.job.json`` records the whole input list, so a directory can say what it lacks;
* one tqdm bar per rank (samples), and a log line per shard.

Derived stages (bin reads scores, not tars) pass the source shard's fingerprint on in
``task.source`` so that every sidecar of a source shard names the exact tar it came from, and the
shard stage can refuse to join sidecars made from another file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from miro_scale.atomic import write_bytes_atomic

log = logging.getLogger("miro_scale.jobs")

RECORD_VERSION = 1
_FINGERPRINT_BYTES = 64 * 1024


class ShardError(RuntimeError):
    """The whole shard cannot be processed (the message names the file and the cause)."""


def fingerprint(path: str | os.PathLike) -> dict:
    """``{"name", "size", "sha256"}``: SHA-256 over the size and the first and last 64 KiB. Cheap on
    a rerun over thousands of multi-GB tars, and it tells datasets apart: a tar's first and last
    blocks hold member names (the keys) and data."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
        if size > _FINGERPRINT_BYTES:
            f.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
            h.update(f.read())
    return {"name": path.name, "size": size, "sha256": h.hexdigest()}


def params_digest(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


def shard_stem(path: str) -> str:
    name = os.path.basename(path)
    return name[:-4] if name.endswith(".tar") else name


def done_path(out_dir, stage: str, stem: str) -> Path:
    return Path(out_dir) / f"{stem}.{stage}.done.json"


def error_path(out_dir, stage: str, stem: str) -> Path:
    return Path(out_dir) / f"{stem}.{stage}.error.json"


def read_record(out_dir, stage: str, stem: str) -> Optional[dict]:
    """The done record of ``stem`` for ``stage`` (outputs checked to exist with their recorded
    sizes), or None."""
    p = done_path(out_dir, stage, stem)
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    for name, size in rec.get("outputs", {}).items():
        q = Path(out_dir) / name
        if not q.exists() or q.stat().st_size != size:
            return None
    return rec


@dataclass
class ShardTask:
    """What ``process`` gets for one shard."""

    shard: str
    stem: str
    tmp: Dict[str, Path]            # output name -> temporary path to write it to
    bar: object = None              # the rank's tqdm bar (update it per sample), or None
    source: Optional[dict] = None   # fingerprint of the source tar: the input's, unless a derived
                                    # stage (bin) sets the one its input was made from

    def path(self, template: str) -> Path:
        return self.tmp[template.format(stem=self.stem)]


@dataclass
class ShardJob:
    """A per-shard stage. ``outputs`` are file name templates with ``{stem}``; ``params`` is
    everything besides the input that determines the outputs (a change redoes every shard)."""

    stage: str
    out_dir: str
    outputs: Sequence[str]
    params: dict
    process: Callable[[ShardTask], dict]
    optional_outputs: Sequence[str] = ()  # written only for some shards (a stale one is removed)
    retries: int = 1
    progress: bool = True
    stem_of: Callable[[str], str] = shard_stem  # the name outputs are made from ({stem})

    def output_names(self, stem: str) -> List[str]:
        return [t.format(stem=stem) for t in self.outputs]

    def optional_names(self, stem: str) -> List[str]:
        return [t.format(stem=stem) for t in self.optional_outputs]

    def is_done(self, shard: str) -> tuple:
        """(done, reason): reason says why a shard is not done (for the log)."""
        stem = self.stem_of(shard)
        rec = read_record(self.out_dir, self.stage, stem)
        if rec is None:
            return False, "no complete output"
        if rec.get("params_sha256") != params_digest(self.params):
            return False, "stage parameters changed"
        try:
            fp = fingerprint(shard)
        except OSError as e:
            return False, f"input unreadable ({e})"
        if rec.get("input") != fp:
            return False, f"outputs are of another input file ({rec.get('input')} != {fp})"
        names = set(rec.get("outputs", {}))
        if not set(self.output_names(stem)) <= names <= set(self.output_names(stem) + self.optional_names(stem)):
            return False, "outputs differ"
        return True, ""


def dist_env() -> tuple:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def assign(shards: Sequence[str], rank: int, world: int, stem_of: Callable[[str], str] = shard_stem) -> List[str]:
    stems = [stem_of(s) for s in shards]
    seen, dup = set(), set()
    for s in stems:
        (dup if s in seen else seen).add(s)
    if dup:
        raise ValueError(f"shard names collide in the output directory: {sorted(dup)[:5]}")
    return [s for i, s in enumerate(shards) if i % world == rank]


def _sum_into(acc: dict, d: dict) -> None:
    for k, v in d.items():
        if isinstance(v, dict):
            _sum_into(acc.setdefault(k, {}), v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            acc[k] = acc.get(k, 0) + v


def _clean_stale_temps(out_dir: Path, stems: Sequence[str]) -> None:
    mine = set(stems)
    for p in out_dir.glob(".*.tmp*"):
        stem = p.name[1:].split(".", 1)[0]
        if stem in mine:
            p.unlink(missing_ok=True)


def _run_one(job: ShardJob, shard: str, bar) -> dict:
    stem = job.stem_of(shard)
    out = Path(job.out_dir)
    done_path(out, job.stage, stem).unlink(missing_ok=True)  # outputs are about to change
    names = job.output_names(stem) + job.optional_names(stem)
    tmp = {name: out / f".{name}.tmp{os.getpid()}" for name in names}
    fp = fingerprint(shard)
    task = ShardTask(shard=shard, stem=stem, tmp=tmp, bar=bar, source=fp)
    t0 = time.perf_counter()
    try:
        counts = job.process(task) or {}
        missing = [n for n in job.output_names(stem) if not tmp[n].exists()]
        if missing:
            raise RuntimeError(f"stage {job.stage} wrote no {missing}")
        timing = counts.pop("timing", {})
        sizes = {}
        for name, p in tmp.items():
            if p.exists():
                with open(p, "rb") as f:  # durable before it is renamed into place
                    os.fsync(f.fileno())
                sizes[name] = p.stat().st_size
                os.replace(p, out / name)
            else:
                (out / name).unlink(missing_ok=True)  # an optional output this shard does not have
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    timing["seconds"] = round(time.perf_counter() - t0, 3)
    rec = {"version": RECORD_VERSION, "stage": job.stage, "input": fp, "source": task.source,
           "params_sha256": params_digest(job.params), "outputs": sizes, "counts": counts,
           "timing": timing}
    write_bytes_atomic(done_path(out, job.stage, stem), json.dumps(rec, indent=1, sort_keys=True).encode())
    return rec


def _process_all(job: ShardJob, todo: Sequence[str], bar, rank: int, out: Path, counters: dict) -> None:
    delay = float(os.environ.get("MIRO_SHARD_JOB_DELAY", 0))  # seconds after each shard: kill tests
    for s in todo:
        stem = job.stem_of(s)
        err = error_path(out, job.stage, stem)
        attempts = 0
        prior = 0
        try:
            prior = int(json.loads(err.read_text()).get("attempts", 0))
        except (OSError, ValueError):
            pass
        while True:
            attempts += 1
            try:
                rec = _run_one(job, s, bar)
            except Exception as e:  # a bad shard is recorded and retried, never ends the run
                msg = f"{s}: {type(e).__name__}: {e}"
                write_bytes_atomic(err, json.dumps(
                    {"shard": s, "stage": job.stage, "error": msg, "attempts": prior + attempts,
                     "traceback": traceback.format_exc(limit=8)}, indent=1).encode())
                if attempts <= job.retries and not isinstance(e, ShardError):
                    log.warning("[rank %d] %s failed (attempt %d), retrying: %s", rank, job.stage, attempts, msg)
                    continue
                log.error("[rank %d] %s: shard failed, left for a rerun: %s", rank, job.stage, msg)
                counters["failed"] += 1
                break
            err.unlink(missing_ok=True)
            counters["processed"] += 1
            n = int(rec["counts"].get("samples", 0))
            counters["samples"] += n
            log.info("[rank %d] %s %s: %d samples in %.1fs %s", rank, job.stage, stem, n,
                     rec["timing"]["seconds"], json.dumps(rec["counts"].get("failures", {}), sort_keys=True))
            break
        if delay:
            time.sleep(delay)


def _total_samples(shards: Sequence[str]) -> Optional[int]:
    """Samples in ``shards`` when every one has a DALI index (its first line), else None: no scan of
    every tar before starting."""
    total = 0
    for s in shards:
        idx = s[:-4] + ".idx" if s.endswith(".tar") else None
        try:
            with open(idx) as f:
                total += int(f.readline().split()[1])
        except (TypeError, OSError, ValueError, IndexError):
            return None
    return total


def _distributed(world: int):
    """torch.distributed when several ranks run together or torch is loaded anyway; None keeps a
    one-process stage that does not need torch (bin) free of its import."""
    if world > 1 or "torch" in sys.modules:
        import torch.distributed as dist
        return dist
    return None


def run(job: ShardJob, shards: Sequence[str], rank: Optional[int] = None,
        world: Optional[int] = None) -> Optional[dict]:
    """Process this rank's unfinished shards. Returns the summary on rank 0 (or on every rank of
    independent jobs), else None."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    env_rank, env_world = dist_env()
    rank = env_rank if rank is None else rank
    world = env_world if world is None else world
    dist = _distributed(world)
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mine = assign(shards, rank, world, job.stem_of)
    initialized_here = False
    if dist is not None and not dist.is_initialized() and "MASTER_ADDR" in os.environ:
        from datetime import timedelta
        # gloo carries only the final barrier and stats; ranks may finish hours apart
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(hours=72))
        initialized_here = True
    if rank == 0:
        write_bytes_atomic(out / f"{job.stage}.job.json", json.dumps(
            {"stage": job.stage, "params": job.params, "params_sha256": params_digest(job.params),
             "shards": [os.path.abspath(s) for s in shards]}, indent=1, sort_keys=True, default=str).encode())
    _clean_stale_temps(out, [job.stem_of(s) for s in mine])
    todo = []
    for s in mine:
        done, why = job.is_done(s)
        if not done:
            todo.append(s)
            if why != "no complete output":
                log.warning("%s: %s redone: %s", s, job.stage, why)
    t_run = time.perf_counter()
    counters = {"processed": 0, "failed": 0, "samples": 0}
    bar = tqdm(total=_total_samples(todo), unit="img", desc=f"{job.stage} rank {rank}", position=rank,
               dynamic_ncols=True, disable=not job.progress, file=sys.stderr)
    with logging_redirect_tqdm():  # log lines above the bar, not through it
        _process_all(job, todo, bar, rank, out, counters)
    bar.close()
    mine_info = {"rank": rank, "shards_processed": counters["processed"], "shards_failed": counters["failed"],
                 "samples": counters["samples"], "seconds": round(time.perf_counter() - t_run, 3)}
    if dist is not None and dist.is_initialized():
        dist.barrier()
        gathered = [None] * world
        dist.all_gather_object(gathered, mine_info)
    else:
        gathered = [mine_info]
    summary = None
    if rank == 0 or dist is None or not dist.is_initialized():
        summary = summarize(job, shards, gathered)
    if initialized_here:
        dist.destroy_process_group()
    return summary


def summarize(job: ShardJob, shards: Sequence[str], this_run: list) -> dict:
    """Sum the done records of ``shards`` and list what is missing; written to
    ``{out}/{stage}.summary.json``."""
    out = Path(job.out_dir)
    counts: dict = {}
    timing: dict = {}
    done, missing, failed = [], [], {}
    for s in shards:
        stem = job.stem_of(s)
        rec = read_record(out, job.stage, stem)
        if rec is None or rec.get("params_sha256") != params_digest(job.params):
            missing.append(s)
            try:
                failed[s] = json.loads(error_path(out, job.stage, stem).read_text())["error"]
            except (OSError, ValueError, KeyError):
                pass
            continue
        done.append(s)
        _sum_into(counts, rec["counts"])
        _sum_into(timing, rec["timing"])
    run_samples = sum(g["samples"] for g in this_run)
    run_seconds = max((g["seconds"] for g in this_run), default=0.0)
    summary = {"stage": job.stage, "num_shards": len(shards), "shards_done": len(done),
               "complete": len(done) == len(shards), "shards_missing": missing, "shards_failed": failed,
               "counts": counts, "timing": timing,
               "this_run": {"per_rank": this_run, "samples": run_samples, "seconds": run_seconds,
                            "samples_per_s": round(run_samples / run_seconds, 3) if run_seconds > 0 else None}}
    write_bytes_atomic(out / f"{job.stage}.summary.json", json.dumps(summary, indent=1, sort_keys=True).encode())
    return summary


def finished_inputs(out_dir: str, stage: str) -> Dict[str, dict]:
    """``{stem: done record}`` of every complete shard of ``stage`` in ``out_dir`` (for the next
    stage to read; outputs without a record, from a killed run, are not listed)."""
    recs = {}
    for p in sorted(Path(out_dir).glob(f"*.{stage}.done.json")):
        stem = p.name[: -len(f".{stage}.done.json")]
        rec = read_record(out_dir, stage, stem)
        if rec is not None:
            recs[stem] = rec
    return recs


def setup_logging() -> None:
    """A readable line per shard on stderr for the stage commands."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def report(summary: Optional[dict], extra: Optional[dict] = None) -> int:
    """Print a stage's summary (rank 0) and return the command's exit status: 0 when every shard
    is done, 1 otherwise (the failed shards are named; a rerun retries them)."""
    if summary is None:
        return 0
    short = {k: summary[k] for k in ("stage", "num_shards", "shards_done", "shards_failed", "counts")}
    short["this_run"] = {k: v for k, v in summary["this_run"].items() if k != "per_rank"}
    short.update(extra or {})
    print(json.dumps(short, indent=1, sort_keys=True))
    if not summary["complete"]:
        print(f"{summary['stage']}: {len(summary['shards_missing'])} of {summary['num_shards']} shards are not "
              f"done ({len(summary['shards_failed'])} failed); rerun the same command to retry them",
              file=sys.stderr)
        return 1
    return 0
