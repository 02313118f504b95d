#!/usr/bin/env python
r"""How the bin and shard stages scale with the dataset: wall time, samples/s and peak memory of the
real commands at growing sizes (CPU). Cost should grow linearly with the data and peak memory should
stay bounded by one shard; the script prints both ratios against the smallest size.

  python preprocessing/bench_scale.py            # the full run (~8 min on 2 cores; ~48 GB of disk at its peak)
  python preprocessing/bench_scale.py --stages bin --sizes 20k,40k --rows-per-file 5000 \
      --work-dir /tmp/bs --keep-work --out /tmp/bs.json                  # a smoke run

What is measured. Every configuration runs the stage's real command in a subprocess
(`python preprocessing/bin.py ...`, `python preprocessing/shard.py ...`, exactly as recorded in the
JSON) on a fresh output directory. Wall time is measured around the subprocess. Peak memory is the
child's VmHWM from /proc/PID/status (the kernel's high-water mark of its own resident set since its
exec), polled every 20 ms, and the largest RssAnon seen (its own data, without the ~600 MiB of mapped
shared libraries that importing torch brings); the commands start no further processes. os.wait4
gives its user/sys CPU seconds, block I/O and ru_maxrss (recorded, not used: on Linux a child's
ru_maxrss also counts the parent's address space it was forked from; see measure()). A process that
only imports each stage's modules is measured too (the fixed cost). Input preparation runs in its
own subprocess and is not timed.

bin stage (`--sizes`, rows; default 1M,4M,16M)
  Synthetic score shards of `--rows-per-file` rows (default 10k), with the score stage's exact
  layout: key, status, error and one float32 column per reward for the 7 MIRO rewards (clip_score,
  aesthetic_score, image_reward_score, pick_a_score_score, hpsv2_score, vqa_score, sciscore_score),
  parquet metadata `miro_scoring`, and a done record written by the shard-job runner
  (miro_scale/shard_jobs.py) whose source is a tiny dummy file per shard. Value distributions are
  shaped like the real scorers' (ranges, skew, clipping at ImageReward's bounds, fp16-quantised
  HPSv2 / VQAScore / SciScore values, hence many ties); ~0.3% of rows fail (corrupt_image: every
  reward NaN) and ~0.2% miss one reward (reward_error:vqa_score). The rows are generated once for
  the largest size; smaller sizes are directories of symlinks to its first files. Command:
  `bin.py --scores DIR --out OUT --num-bins 64 --no-progress` (quantile, calibration 100k).

shard stage (`--shard-sizes`, samples; default 2k,8k,32k; `--images keep,drop`)
  Source shards are real synthetic-world WebDataset tars (`python -m miro_scale.synthetic.world
  --resolution 256`: JPEG, txt, json). `--unique-shards` of them are generated; the others are copies
  of those with new keys (json "key" updated), which is all the join sees. The sidecars of every
  source shard are written in the exact formats of their stages, each through the shard-job runner
  so the done records (source fingerprint, output sizes) are the runner's own:
    captions/{stem}.captions.parquet  a synthetic `long` caption of ~150 tokens per sample
    scores/{stem}.scores.parquet      the 7 MIRO rewards on txt and long (13 columns), as above
    encoded/{stem}.encoded.tar        --encode synthetic (default): the 16M recipe's byte volume:
                                      latent_mean/std fp16 4x32x32, text_emb fp16 [n_txt, 2048]
                                      (n_txt ~ U(12,28), mean 20) and text_emb_long fp16
                                      [n_long, 2048] (n_long = the long caption's tokens, ~150),
                                      random values; samples with a corrupt_image score are left out
                                      as the encode stage would. --encode real runs
                                      preprocessing/encode.py with a tiny T5 of d_model --text-dim
                                      and a tiny SDXL-style VAE at 256 px (slow on a CPU: ~70 ms per
                                      sample; token counts then come from its word-level tokenizer)
  then the real bin stage (`bin.py --num-bins 64`) makes bins/. The measured command is
  `shard.py --shards <first N/shard-size tars> --captions --encoded --bins --out OUT --images MODE`.
  Each output directory is deleted after it is checked, unless --keep-work.

Checks (recorded per configuration): the command's exit status, bins.json / manifest.json present,
summary complete, and every input row accounted for (written + skipped == rows; the rows the
generator made with a missing reward are exactly the ones dropped / skipped).

Outputs: a table and the ratios on stdout, JSON (--out) with machine facts, versions, date, the exact
commands and all numbers, and a PNG (--plot; default: the JSON's path with .png): time and peak
memory against size, log-log, both stages.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from miro_scale.tools.bench_report import proc_memory_kib  # noqa: E402

MIRO_KEYS = ("clip_score", "aesthetic_score", "image_reward_score", "pick_a_score_score", "hpsv2_score",
             "vqa_score", "sciscore_score")
IMAGE_ONLY = ("aesthetic_score",)  # scored once per image; the others once per caption source
MODEL_IDS = {"clip_score": "jinaai/jina-clip-v2", "aesthetic_score": "laion/improved-aesthetic-predictor",
             "image_reward_score": "THUDM/ImageReward", "pick_a_score_score": "yuvalkirstain/PickScore_v1",
             "hpsv2_score": "xswu/HPSv2", "vqa_score": "zhiqiulin/clip-flant5-xxl",
             "sciscore_score": "Jialuo21/SciScore"}
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "preprocessing_scale_cpu.json"
CORRUPT_RATE = 0.003      # status corrupt_image: every reward NaN (and no latents)
REWARD_ERROR_RATE = 0.002  # status reward_error:vqa_score: that reward NaN
TOKEN_RE = re.compile(r"\w+|[^\w\s]+")  # the tiny T5's pre-tokenizer (Whitespace): one token per match
CAPTION_WORDS = ("a the of and with on in at near its soft warm bright dark shiny matte wooden metal glass red "
                 "blue green yellow orange purple white black grey small large round square tall narrow "
                 "circle triangle star hexagon shape object background gradient texture light shadow "
                 "corner centre left right top bottom edge surface pattern smooth rough flat scene").split()


# ----------------------------------------------------------------------------- helpers
def parse_size(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def parse_sizes(s: str) -> list:
    return sorted({parse_size(x) for x in s.split(",") if x.strip()})


def human(n: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if n >= div:
            v = n / div
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return str(int(n))


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).glob(pattern) if p.is_file())


def versions() -> dict:
    """Package versions from their metadata (importing torch here would make this process big: see
    measure)."""
    from importlib import metadata

    v = {"python": platform.python_version()}
    for dist in ("torch", "pyarrow", "numpy", "webdataset", "matplotlib"):
        try:
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            v[dist] = None
    return v


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "cpus_usable": affinity, "memory_gib": mem,
            "platform": platform.platform(), "host": platform.node(), **versions()}


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def measure(cmd: list, log_path: Path, timeout: float | None = None, poll_s: float = 0.02) -> dict:
    """Run ``cmd`` (cwd: the checkout) with stdout+stderr to ``log_path``: wall time, peak RSS, CPU
    time and block I/O of that child.

    Peak RSS is the child's VmHWM (/proc/PID/status), polled every ``poll_s`` until it exits: the
    high-water mark of its own address space since its exec (a peak in the last poll interval before
    exit could be missed). Peak anonymous RSS is the largest RssAnon seen by the same polling: the
    process's own data (heap, arrays, Python objects) without the mapped shared libraries (~600 MiB
    of torch), which the kernel may evict from RSS under page-cache pressure. os.wait4's ru_maxrss is recorded beside it but is not used as the peak:
    on Linux a child's ru_maxrss also counts the RSS of the parent's address space it was forked
    (vforked) from, so a child of a big parent reports at least the parent's size. This process
    keeps itself small for that reason (input preparation runs in its own subprocess)."""
    import resource

    log_path.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    hwm = anon = 0
    file_at_peak = None
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            st = proc_memory_kib(p.pid)
            hwm = max(hwm, st.get("VmHWM", 0))
            if st.get("RssAnon", -1) > anon:
                anon, file_at_peak = st["RssAnon"], st.get("RssFile")
            if timeout is not None and time.perf_counter() - t0 > timeout:
                p.kill()
                _, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(poll_s)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": p.returncode, "wall_s": round(wall, 3), "peak_rss_mib": round(hwm / 1024, 1),
            "peak_rss_anon_mib": round(anon / 1024, 1),
            "rss_file_at_anon_peak_mib": None if file_at_peak is None else round(file_at_peak / 1024, 1),
            "ru_maxrss_mib": round(ru.ru_maxrss / 1024, 1),
            "parent_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "user_s": round(ru.ru_utime, 2), "sys_s": round(ru.ru_stime, 2),
            "block_in_mib": round(ru.ru_inblock * 512 / 2**20, 1), "block_out_mib": round(ru.ru_oublock * 512 / 2**20, 1),
            "loadavg_1min_before": round(load_before, 2), "loadavg_1min_after": round(os.getloadavg()[0], 2)}


IMPORTS = {  # what each stage's command imports before it reads any data
    "bin": "import numpy, pyarrow.parquet, tqdm, miro_scale.shard_jobs, miro_scale.rewards.binning, "
           "miro_scale.rewards.scores_io, miro_scale.rewards.registry",  # no torch since shard_jobs 3bffb8a
    "shard": "import numpy, pyarrow.parquet, tqdm, torch.distributed, miro_scale.shard_jobs, miro_scale.data.join, "
             "miro_scale.data.plan, miro_scale.rewards.binning",
}


def import_baseline(stage: str, work: Path) -> dict:
    """Wall time and peak RSS of a process that only imports what the stage's command imports."""
    cmd = [sys.executable, "-c", IMPORTS[stage]]
    m = measure(cmd, work / f"{stage}_imports.log")
    return {"command": _cmd_str(cmd), **{k: m[k] for k in ("returncode", "wall_s", "peak_rss_mib", "peak_rss_anon_mib")}}


def run_prepare(a, stage: str, work: Path) -> float:
    """Prepare a stage's inputs in a subprocess (this process stays small: see measure)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *a.argv, "--work-dir", str(work), "--prepare", stage]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=child_env())
    if r.returncode:
        raise SystemExit(f"preparing the {stage} stage's inputs failed (exit status {r.returncode})")
    return round(time.perf_counter() - t0, 1)


def log_tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- synthetic scores
def reward_values(key: str, rng: "np.random.Generator", n: int) -> "np.ndarray":
    """float32 scores shaped like the real scorer's (range, skew, clipping, quantisation -> ties)."""
    import numpy as np

    if key == "clip_score":          # jina-clip cosine similarity
        x = rng.normal(0.33, 0.05, n)
    elif key == "aesthetic_score":   # LAION aesthetic predictor, AVA 1-10
        x = np.clip(rng.normal(5.4, 0.8, n), 1, 10)
    elif key == "image_reward_score":  # ImageReward, clipped at its observed bounds: ties there
        x = np.clip(rng.normal(0.1, 1.1, n), -2.28, 2.0)
    elif key == "pick_a_score_score":  # PickScore logits
        x = rng.normal(21.0, 1.3, n)
    elif key == "hpsv2_score":       # HPSv2, computed in fp16: quantised
        x = rng.normal(0.27, 0.02, n).astype(np.float16)
    elif key == "vqa_score":         # P(yes), skewed to 1 and saturating in fp16
        x = rng.beta(5.0, 1.4, n).astype(np.float16)
    elif key == "sciscore_score":    # CLIP-style logits in fp16
        x = rng.normal(20.0, 2.5, n).astype(np.float16)
    else:
        x = rng.normal(0.0, 1.0, n)
    return x.astype(np.float32)


def score_table(keys: list, rng: "np.random.Generator", caption_sources=("txt",), shard: str = ""):
    """(pyarrow table in the score stage's layout, rows with a missing reward, corrupt_image rows)."""
    import numpy as np
    import pyarrow as pa

    n = len(keys)
    u = rng.random(n)
    corrupt = u < CORRUPT_RATE
    reward_error = (u >= CORRUPT_RATE) & (u < CORRUPT_RATE + REWARD_ERROR_RATE)
    status = np.where(corrupt, "corrupt_image", np.where(reward_error, "reward_error:vqa_score", "ok"))
    error = [None if s == "ok" else ("x.jpg: cannot identify image file" if s == "corrupt_image"
                                     else "vqa_score: CUDA error: device-side assert") for s in status]
    cols = {"key": pa.array(keys, pa.string()), "status": pa.array(status.tolist(), pa.string()),
            "error": pa.array(error, pa.string())}
    for k in MIRO_KEYS:
        base = reward_values(k, rng, n)
        srcs = caption_sources[:1] if k in IMAGE_ONLY else caption_sources
        for j, src in enumerate(srcs):
            v = base if j == 0 else (base + rng.normal(0, 0.3 * float(np.std(base)) + 1e-6, n)).astype(np.float32)
            v = v.copy()
            v[corrupt] = np.nan
            if k == "vqa_score":
                v[reward_error] = np.nan
            cols[k if j == 0 else f"{k}@{src}"] = pa.array(v, pa.float32())
    meta = {"shard": shard, "captions": list(caption_sources),
            "rewards": {k: {"key": k, "model_id": MODEL_IDS[k], "checkpoint_digest": "synthetic",
                            "needs_text": k not in IMAGE_ONLY, "view": "synthetic"} for k in MIRO_KEYS}}
    t = pa.table(cols).replace_schema_metadata({"miro_scoring": json.dumps(meta, sort_keys=True)})
    return t, corrupt | reward_error, corrupt


def score_counts(status: list) -> dict:
    failures = {}
    for s in status:
        if s != "ok":
            for k in s.split(";"):
                failures[k] = failures.get(k, 0) + 1
    return {"samples": len(status), "ok": sum(s == "ok" for s in status), "failures": failures}


def make_bin_inputs(root: Path, rows: int, rows_per_file: int, seed: int) -> None:
    """Score shards for ``rows`` rows under root/pool, with done records written by the shard-job
    runner (the sources are dummy files under root/sources). Shards already there are kept."""
    import numpy as np

    from miro_scale import shard_jobs
    from miro_scale.atomic import write_parquet_atomic

    src, pool = root / "sources", root / "pool"
    src.mkdir(parents=True, exist_ok=True)
    shards = []
    for i in range(rows // rows_per_file):
        path = src / f"{i:05d}.tar"
        if not path.exists():
            path.write_bytes(f"dummy source shard {i:05d} (seed {seed})\n".encode())
        shards.append(str(path))

    def process(task):
        i = int(task.stem)
        keys = [f"{i * rows_per_file + j:09d}" for j in range(rows_per_file)]
        t, _, _ = score_table(keys, np.random.default_rng([seed, i]), ("txt",), shard=f"{task.stem}.tar")
        write_parquet_atomic(t, task.path("{stem}.scores.parquet"))
        return score_counts(t.column("status").to_pylist())

    job = shard_jobs.ShardJob(stage="score", out_dir=str(pool), outputs=["{stem}.scores.parquet"],
                              params={"synthetic": True, "rows_per_file": rows_per_file, "seed": seed},
                              process=process, progress=False)
    summary = shard_jobs.run(job, shards, 0, 1)
    if not summary["complete"]:
        raise SystemExit(f"preparing score shards failed: {summary['shards_failed']}")


def missing_rows(scores_dir: Path, stems) -> int:
    """Rows of these score shards with a failure status (a missing reward), from their done records."""
    n = 0
    for stem in stems:
        rec = json.loads((Path(scores_dir) / f"{stem}.score.done.json").read_text())
        n += rec["counts"]["samples"] - rec["counts"]["ok"]
    return n


def link_scores(pool: Path, dest: Path, n_files: int) -> None:
    """A score directory of the pool's first n_files shards (symlinks to the parquet files, copies
    of their done records)."""
    dest.mkdir(parents=True)
    for i in range(n_files):
        stem = f"{i:05d}"
        (dest / f"{stem}.scores.parquet").symlink_to((pool / f"{stem}.scores.parquet").resolve())
        shutil.copyfile(pool / f"{stem}.score.done.json", dest / f"{stem}.score.done.json")


# ----------------------------------------------------------------------------- bin stage
def bench_bin(a, work: Path, results: dict) -> None:
    sizes = a.bin_sizes
    for s in sizes:
        if s % a.rows_per_file:
            raise SystemExit(f"--sizes: {s} is not a multiple of --rows-per-file {a.rows_per_file}")
    root = work / "bin"
    print(f"[bin] preparing {human(max(sizes))} score rows in {max(sizes) // a.rows_per_file} files ...", flush=True)
    results["bin"]["prepare_s"] = run_prepare(a, "bin", work)
    results["bin"]["import_baseline"] = base = import_baseline("bin", work) if a.import_baseline else {}
    for rows in sizes:
        n_files = rows // a.rows_per_file
        scores, out = root / f"scores_{rows}", root / f"bins_{rows}"
        for d in (scores, out):
            shutil.rmtree(d, ignore_errors=True)
        link_scores(root / "pool", scores, n_files)
        cmd = [sys.executable, "preprocessing/bin.py", "--scores", str(scores), "--out", str(out),
               "--num-bins", str(a.num_bins), "--calibration-size", str(a.calibration_size), "--no-progress"]
        if a.drop_caches:
            drop_caches()
        print(f"[bin] {human(rows)} rows: {' '.join(cmd[1:])}", flush=True)
        m = measure(cmd, root / f"bin_{rows}.log", a.timeout)
        expected_missing = missing_rows(root / "pool", [f"{i:05d}" for i in range(n_files)])
        summary = _read_json(out / "bin.summary.json")
        counts = (summary or {}).get("counts", {})
        in_bytes = sum((root / "pool" / f"{i:05d}.scores.parquet").stat().st_size for i in range(n_files))
        out_bytes = dir_bytes(out, "*.rewards.parquet")
        checks = {"returncode_0": m["returncode"] == 0, "bins_json": (out / "bins.json").exists(),
                  "summary_complete": bool(summary and summary.get("complete")),
                  "rows_read": counts.get("samples") == rows,
                  "rows_accounted": counts.get("written", 0) + counts.get("failures", {}).get("missing_reward", 0) == rows,
                  "dropped_rows_are_the_generated_missing_ones":
                      counts.get("failures", {}).get("missing_reward") == expected_missing,
                  "sidecars": len(list(out.glob("*.rewards.parquet"))) == n_files}
        rec = {"rows": rows, "files": n_files, "rows_per_file": a.rows_per_file, **m,
               "peak_rss_above_imports_mib": _above(m, base),
               "rows_per_s": round(rows / m["wall_s"], 1), "us_per_row": round(m["wall_s"] / rows * 1e6, 3),
               "input_bytes": in_bytes, "output_bytes": out_bytes, "rows_written": counts.get("written"),
               "rows_dropped_missing_reward": counts.get("failures", {}).get("missing_reward"),
               "checks": checks, "ok": all(checks.values()), "command": _cmd_str(cmd)}
        if not rec["ok"]:
            rec["log_tail"] = log_tail(root / f"bin_{rows}.log")
            print(f"[bin] {human(rows)}: CHECK FAILED {checks}\n{rec['log_tail']}", file=sys.stderr, flush=True)
        results["bin"]["configs"].append(rec)
        print(f"[bin] {human(rows)} rows: {m['wall_s']:.1f} s, {rec['rows_per_s']:.0f} rows/s, "
              f"peak RSS {m['peak_rss_mib']:.0f} MiB (anonymous {m['peak_rss_anon_mib']:.0f}), ok={rec['ok']}", flush=True)
        if not a.keep_work:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(scores, ignore_errors=True)
    if not a.keep_work:
        shutil.rmtree(root, ignore_errors=True)


def _above(m: dict, base: dict):
    return round(m["peak_rss_mib"] - base["peak_rss_mib"], 1) if base.get("peak_rss_mib") else None


def _num(v, fmt: str, width: int) -> str:
    return format(v, fmt).rjust(width) if v is not None else "n/a".rjust(width)


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _cmd_str(cmd: list) -> str:
    return " ".join(["python"] + [c if re.fullmatch(r"[\w./,:=@+-]+", c) else repr(c) for c in cmd[1:]])


# ----------------------------------------------------------------------------- shard stage inputs
def long_caption(meta: dict, rng: random.Random, target_tokens: int) -> str:
    """A synthetic long caption of about ``target_tokens`` tokens: the world's own long caption,
    then descriptive filler (one token per word / punctuation run, as the tiny T5 tokenizer counts)."""
    base = (meta.get("captions") or {}).get("long") or meta.get("caption") or "An image."
    words = TOKEN_RE.findall(base)
    out = [base]
    n = len(words)
    while n < target_tokens:
        k = min(rng.randint(6, 14), target_tokens - n)
        sentence = " ".join(rng.choice(CAPTION_WORDS) for _ in range(k))
        out.append(sentence.capitalize() + ("." if n + k < target_tokens else ""))
        n += k + (1 if n + k < target_tokens else 0)
    return " ".join(out)


def make_sources(a, work: Path, n_shards: int) -> list:
    """Source tars work/src/{00000..}.tar: `--unique-shards` generated by the synthetic world at
    --resolution, the rest re-keyed copies of those."""
    from miro_scale.data.sidecars import iter_members, open_source_shard
    from miro_scale.data.tario import write_index_file
    from miro_scale.data.writer import TarSampleWriter

    src, uniq = work / "src", work / "unique"
    src.mkdir(parents=True, exist_ok=True)
    k, u = a.samples_per_shard, min(a.unique_shards, n_shards)
    paths = [src / f"{i:05d}.tar" for i in range(n_shards)]
    if all(p.exists() for p in paths):
        return [str(p) for p in paths]
    cmd = [sys.executable, "-m", "miro_scale.synthetic.world", "--out", str(uniq), "--num-samples", str(u * k),
           "--shard-size", str(k), "--resolution", str(a.resolution), "--seed", str(a.seed),
           "--workers", str(max(1, min(4, os.cpu_count() or 1)))]
    print(f"[shard] generating {u * k} source samples: {_cmd_str(cmd)}", flush=True)
    r = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"synthetic_world failed:\n{r.stderr[-3000:]}")
    for i, p in enumerate(paths):
        if p.exists():
            continue
        if i < u:
            shutil.copyfile(uniq / f"{i:05d}.tar", p)
            shutil.copyfile(uniq / f"{i:05d}.idx", p.with_suffix(".idx"))
            continue
        orig = str(uniq / f"{i % u:05d}.tar")
        tmp = p.with_name(f".{p.name}.tmp")
        with open(tmp, "wb") as f:
            w = TarSampleWriter(f)
            for j, (_, members) in enumerate(iter_members(orig, open_source_shard(orig))):
                key = f"{i * k + j:09d}"
                if "json" in members:
                    meta = json.loads(members["json"])
                    meta["key"] = key
                    members["json"] = meta
                w.write(key, members)
            w.close()
        write_index_file(str(p.with_suffix(".idx")), w.keys, w.members)
        os.replace(tmp, p)
    return [str(p) for p in paths]


def make_sidecars(a, work: Path, shards: list) -> None:
    """captions/, scores/, encoded/ for every source shard (each through the shard-job runner, so
    the done records are the runner's), then the real bin stage into bins/."""
    import numpy as np
    import pyarrow as pa

    from miro_scale import shard_jobs
    from miro_scale.atomic import write_parquet_atomic
    from miro_scale.data.loader import text_emb_ext
    from miro_scale.data.sidecars import iter_members, open_source_shard
    from miro_scale.data.writer import TarSampleWriter

    pool_rng = np.random.default_rng(a.seed)
    pool = pool_rng.standard_normal(16 * 2**20).astype(np.float16)  # 32 MiB of values to slice from
    c, hw = a.latent_shape[0], a.latent_shape[1:]
    latent_n = c * hw[0] * hw[1]

    def tokens_of(cap: str) -> int:
        return min(len(TOKEN_RE.findall(cap)), a.max_text_len)

    def samples(shard):
        idx = open_source_shard(shard)
        return [(key, json.loads(m["json"]) if "json" in m else {}) for key, m in iter_members(shard, idx)]

    def caption_process(task):
        rows = samples(task.shard)
        keys = [k for k, _ in rows]
        caps = [long_caption(meta, random.Random(f"{a.seed}:{k}"), random.Random(f"n:{a.seed}:{k}").randint(
            a.long_tokens - 30, a.long_tokens + 30)) for k, meta in rows]
        t = pa.table({"key": pa.array(keys, pa.string()), "status": pa.array(["ok"] * len(keys), pa.string()),
                      "error": pa.array([None] * len(keys), pa.string()), "caption_long": pa.array(caps, pa.string())})
        t = t.replace_schema_metadata({"miro_captions": json.dumps({"model": "synthetic", "kinds": ["long"]})})
        write_parquet_atomic(t, task.path("{stem}.captions.parquet"))
        return {"samples": len(keys), "failures": {}, "skipped_keys": {}}

    def score_process(task):
        keys = [k for k, _ in samples(task.shard)]
        t, _, _ = score_table(keys, np.random.default_rng([a.seed, 7, int(task.stem)]), ("txt", "long"),
                              shard=f"{task.stem}.tar")
        write_parquet_atomic(t, task.path("{stem}.scores.parquet"))
        return {**score_counts(t.column("status").to_pylist()), "skipped_keys": {}}

    def encode_process(task):
        import pyarrow.parquet as pq

        caps = pq.read_table(work / "captions" / f"{task.stem}.captions.parquet").to_pydict()
        caps = dict(zip(caps["key"], caps["caption_long"]))
        st = pq.read_table(work / "scores" / f"{task.stem}.scores.parquet", columns=["key", "status"]).to_pydict()
        corrupt = {k for k, v in zip(st["key"], st["status"]) if "corrupt_image" in v}
        rng = np.random.default_rng([a.seed, 11, int(task.stem)])

        def arr(count, shape):  # random fp16 values: a slice of the pool
            o = int(rng.integers(0, pool.size - count))
            return pool[o:o + count].reshape(shape)
        n = written = 0
        left_out = {}
        with open(task.path("{stem}.encoded.tar"), "wb") as f:
            w = TarSampleWriter(f)
            for key, _ in samples(task.shard):
                n += 1
                if key in corrupt:
                    left_out.setdefault("corrupt_image", []).append(key)
                    continue
                n_txt = int(rng.integers(a.txt_tokens - 8, a.txt_tokens + 9))
                n_long = tokens_of(caps[key])
                w.write(key, {"latent_mean.npy": arr(latent_n, (c, *hw)),
                              "latent_std.npy": np.abs(arr(latent_n, (c, *hw))),
                              text_emb_ext("txt"): arr(n_txt * a.text_dim, (n_txt, a.text_dim)),
                              text_emb_ext("long"): arr(n_long * a.text_dim, (n_long, a.text_dim))})
                written += 1
            w.close()
        return {"samples": n, "written": written, "failures": {r: len(v) for r, v in left_out.items()},
                "skipped_keys": left_out}

    jobs = [("caption", "captions", "{stem}.captions.parquet", caption_process),
            ("score", "scores", "{stem}.scores.parquet", score_process)]
    if a.encode == "synthetic":
        jobs.append(("encode", "encoded", "{stem}.encoded.tar", encode_process))
    for stage, d, out, fn in jobs:
        t0 = time.perf_counter()
        job = shard_jobs.ShardJob(stage=stage, out_dir=str(work / d), outputs=[out], process=fn, progress=False,
                                  params={"synthetic": True, "seed": a.seed, "long_tokens": a.long_tokens,
                                          "txt_tokens": a.txt_tokens, "text_dim": a.text_dim,
                                          "latent_shape": a.latent_shape, "max_text_len": a.max_text_len})
        summary = shard_jobs.run(job, shards, 0, 1)
        if not summary["complete"]:
            raise SystemExit(f"preparing {d} failed: {summary['shards_failed']}")
        print(f"[shard] {d}/ ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    if a.encode == "real":
        encode_real(a, work, shards)
    # always run: a no-op when bins/ is complete for these scores, a refit when score shards were added
    cmd = [sys.executable, "preprocessing/bin.py", "--scores", str(work / "scores"), "--out", str(work / "bins"),
           "--num-bins", str(a.num_bins), "--no-progress"]
    r = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"bin stage (input preparation) failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    print("[shard] bins/ ready", flush=True)


def encode_real(a, work: Path, shards: list) -> None:
    """The encode stage itself, with a tiny T5 (d_model = --text-dim) and a tiny SDXL-style VAE."""
    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    sys.path.insert(0, str(ROOT / "tests"))
    from encoders import save_tiny_t5, save_tiny_vae

    models = work / "models"
    if not (models / "t5" / "config.json").exists():
        save_tiny_t5(str(models / "t5"), d_model=a.text_dim)
    if not (models / "vae" / "config.json").exists():
        save_tiny_vae(str(models / "vae"))
    from conftest import tiny_config_dict
    cfg = tiny_config_dict(
        model={"latent_size": a.latent_shape[1], "patch_size": 2, "text_dim": a.text_dim},
        data={"source": "shards", "shards": str(work / "unused"), "mode": "latent", "precomputed_text": True,
              "caption_source": {"txt": 0.5, "long": 0.5}, "max_text_len": a.max_text_len, "num_workers": 0},
        text_encoder={"kind": "t5", "name_or_path": str(models / "t5"), "max_length": a.max_text_len},
        autoencoder={"kind": "sdxl_vae", "name_or_path": str(models / "vae"), "image_size": a.resolution})
    (work / "encode_config.json").write_text(json.dumps(cfg))
    cmd = [sys.executable, "preprocessing/encode.py", "--shards", *shards, "--captions", str(work / "captions"),
           "--config", str(work / "encode_config.json"), "--out", str(work / "encoded"), "--precision", "fp32",
           "--num-workers", str(os.cpu_count() or 1), "--no-progress"]
    print(f"[shard] encode (real): {_cmd_str(cmd[:4])} ... ", flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"encode stage failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    print(f"[shard] encoded/ ready ({time.perf_counter() - t0:.0f} s)", flush=True)


def prepare_shard(a, work_root: Path) -> None:
    """Source tars and every sidecar of the shard stage (run with --prepare shard, in its own process)."""
    work = work_root / "shard"
    shards = make_sources(a, work, max(a.shard_sizes) // a.samples_per_shard)
    make_sidecars(a, work, shards)
    (work / "prepared.json").write_text(json.dumps({
        "shards": shards,
        "bytes_per_sample_by_member": member_bytes(shards[0], str(work / "encoded" / "00000.encoded.tar"))}))


def member_bytes(shard: str, encoded: str) -> dict:
    """Mean bytes per sample of each member kind (source tar + encoded sidecar), with tar headers."""
    from miro_scale.data.tario import load_index, scan_tar

    per: dict = {}
    n = 0
    for path, idx in ((shard, load_index(shard)), (encoded, scan_tar(encoded))):
        for j in range(len(idx)):
            for ext, (_, size, _) in idx.member_dict(j).items():
                per[ext] = per.get(ext, 0) + size
        if path == shard:
            n = len(idx)
    return {k: round(v / max(n, 1)) for k, v in sorted(per.items())}


# ----------------------------------------------------------------------------- shard stage
def bench_shard(a, work_root: Path, results: dict) -> None:
    sizes = a.shard_sizes
    k = a.samples_per_shard
    for s in sizes:
        if s % k:
            raise SystemExit(f"--shard-sizes: {s} is not a multiple of --samples-per-shard {k}")
    work = work_root / "shard"
    res = results["shard"]
    res["prepare_s"] = run_prepare(a, "shard", work_root)
    res["import_baseline"] = base = import_baseline("shard", work) if a.import_baseline else {}
    prep = json.loads((work / "prepared.json").read_text())
    shards = prep["shards"]
    res["bytes_per_sample_by_member"] = prep["bytes_per_sample_by_member"]
    res["bytes_per_sample_by_member_note"] = (
        "mean over source shard 00000 and its encoded sidecar; the 16M recipe: latent_mean/std 8,320 each "
        "(fp16 4x32x32 + npy header), text_emb ~20 x 2048 x 2 + 128 = 82,048, text_emb_long ~150 x 2048 x 2 + 128 "
        "= 614,528, plus the image (~12-20 kB JPEG at 256 px), txt and json")
    res["encode_mode"] = a.encode
    for n in sizes:
        m_shards = n // k
        subset = shards[:m_shards]
        stems = [Path(s).stem for s in subset]
        spec = str(work / "src" / (f"{{00000..{m_shards - 1:05d}}}.tar" if m_shards > 1 else "00000.tar"))
        in_bytes = {"source_tars": sum(os.path.getsize(s) for s in subset),
                    "encoded": sum((work / "encoded" / f"{t}.encoded.tar").stat().st_size for t in stems),
                    "captions": sum((work / "captions" / f"{t}.captions.parquet").stat().st_size for t in stems),
                    "rewards": sum((work / "bins" / f"{t}.rewards.parquet").stat().st_size for t in stems)}
        expected_skip = missing_rows(work / "scores", stems)
        for mode in a.images:
            out = work / f"train_{n}_{mode}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "preprocessing/shard.py", "--shards", spec, "--captions", str(work / "captions"),
                   "--encoded", str(work / "encoded"), "--bins", str(work / "bins"), "--out", str(out),
                   "--images", mode, "--no-progress"]
            if a.drop_caches:
                drop_caches()
            print(f"[shard] {human(n)} samples, images {mode}: {_cmd_str(cmd)}", flush=True)
            log = work / f"shard_{n}_{mode}.log"
            m = measure(cmd, log, a.timeout)
            summary = _read_json(out / "shard.summary.json") or {}
            manifest = _read_json(out / "manifest.json") or {}
            counts = summary.get("counts", {})
            skipped = sum(counts.get("failures", {}).values())
            out_bytes = dir_bytes(out, "*.tar")
            checks = {"returncode_0": m["returncode"] == 0, "manifest_json": bool(manifest),
                      "summary_complete": bool(summary.get("complete")),
                      "rows_read": counts.get("samples") == n,
                      "rows_accounted": counts.get("written", 0) + skipped == n,
                      "manifest_samples": manifest.get("num_samples") == counts.get("written"),
                      "skipped_are_the_missing_reward_rows": skipped == expected_skip,
                      "shards": len(list(out.glob("*.tar"))) == m_shards}
            total_in = sum(in_bytes.values()) - (in_bytes["source_tars"] if mode == "drop" else 0)
            rec = {"samples": n, "shards": m_shards, "samples_per_shard": k, "images": mode, **m,
                   "peak_rss_above_imports_mib": _above(m, base),
                   "samples_per_s": round(n / m["wall_s"], 1), "ms_per_sample": round(m["wall_s"] / n * 1e3, 4),
                   "input_bytes": in_bytes, "output_bytes": out_bytes,
                   "output_bytes_per_sample": round(out_bytes / n),
                   "mib_per_s_written": round(out_bytes / 2**20 / m["wall_s"], 1),
                   "mib_per_s_read": round(total_in / 2**20 / m["wall_s"], 1),
                   "written": counts.get("written"), "skipped": counts.get("failures", {}),
                   "checks": checks, "ok": all(checks.values()), "command": _cmd_str(cmd)}
            if not rec["ok"]:
                rec["log_tail"] = log_tail(log)
                print(f"[shard] {human(n)} {mode}: CHECK FAILED {checks}\n{rec['log_tail']}", file=sys.stderr, flush=True)
            res["configs"].append(rec)
            print(f"[shard] {human(n)} samples, images {mode}: {m['wall_s']:.1f} s, {rec['samples_per_s']:.0f} samples/s, "
                  f"{rec['mib_per_s_written']:.0f} MiB/s written, peak RSS {m['peak_rss_mib']:.0f} MiB "
                  f"(anonymous {m['peak_rss_anon_mib']:.0f}), ok={rec['ok']}",
                  flush=True)
            if not a.keep_work:
                shutil.rmtree(out, ignore_errors=True)
    if not a.keep_work:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- report
def ratios(configs: list, size_key: str, per_key: str, group_key: str | None = None) -> tuple:
    """Per configuration, against the smallest size of its group: size, time, time per unit and peak
    RSS ratios, peak RSS growth (MiB, and bytes per added unit), and the marginal time per unit
    between consecutive sizes (the fixed start-up cost drops out). Per group: a least-squares line
    wall = fixed + per_unit * size."""
    rows, fits = [], {}
    groups: dict = {}
    for c in configs:
        groups.setdefault(c.get(group_key) if group_key else "all", []).append(c)
    for g, cs in groups.items():
        cs = sorted(cs, key=lambda c: c[size_key])
        base, prev, first_marginal = cs[0], None, None
        for c in cs:
            r = {"group": g, size_key: c[size_key], "size_x": round(c[size_key] / base[size_key], 3),
                 "time_x": round(c["wall_s"] / base["wall_s"], 3),
                 "time_per_unit_x": round(c[per_key] / base[per_key], 3),
                 "peak_rss_x": round(c["peak_rss_mib"] / base["peak_rss_mib"], 3),
                 "peak_rss_growth_mib": round(c["peak_rss_mib"] - base["peak_rss_mib"], 1),
                 "peak_anon_x": round(c["peak_rss_anon_mib"] / base["peak_rss_anon_mib"], 3),
                 "peak_anon_growth_mib": round(c["peak_rss_anon_mib"] - base["peak_rss_anon_mib"], 1)}
            if c is not base:
                r["peak_rss_growth_bytes_per_added_unit"] = round(
                    (c["peak_rss_mib"] - base["peak_rss_mib"]) * 2**20 / (c[size_key] - base[size_key]), 2)
            if prev is not None:
                marginal = (c["wall_s"] - prev["wall_s"]) / (c[size_key] - prev[size_key])
                first_marginal = first_marginal or marginal
                r["marginal_us_per_unit"] = round(marginal * 1e6, 3)
                r["marginal_x"] = round(marginal / first_marginal, 3) if first_marginal > 0 else None
            rows.append(r)
            prev = c
        if len(cs) >= 2:
            x = [c[size_key] for c in cs]
            y = [c["wall_s"] for c in cs]
            mx, my = sum(x) / len(x), sum(y) / len(y)
            sxx = sum((xi - mx) ** 2 for xi in x)
            slope = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y)) / sxx
            icpt = my - slope * mx
            fits[str(g)] = {"fixed_s": round(icpt, 3), "us_per_unit": round(slope * 1e6, 3),
                            "max_rel_residual": round(max(abs(yi - (icpt + slope * xi)) / yi for xi, yi in zip(x, y)), 3)}
    return rows, fits


def verdict(rat: list, time_tol: float, mem_growth_mib: float) -> dict:
    """linear_time: at the largest size, the marginal time per unit (3+ sizes) or else the time per
    unit is <= time_tol x that at the smallest; bounded_memory: peak RSS grew by <= mem_growth_mib."""
    if not rat:
        return {}
    largest = {}
    for r in rat:
        if r["group"] not in largest or r["size_x"] > largest[r["group"]]["size_x"]:
            largest[r["group"]] = r

    def lin(r):
        m = r.get("marginal_x")
        return (m if m is not None and sum(1 for q in rat if q["group"] == r["group"]) >= 3
                else r["time_per_unit_x"]) <= time_tol
    return {"linear_time": all(lin(r) for r in largest.values()),
            "bounded_memory": all(r["peak_rss_growth_mib"] <= mem_growth_mib and r["peak_anon_growth_mib"] <= mem_growth_mib
                                  for r in largest.values()),
            "time_tolerance": time_tol, "memory_growth_tolerance_mib": mem_growth_mib,
            "largest": {str(g): {k: r.get(k) for k in ("size_x", "time_per_unit_x", "marginal_x", "peak_rss_x",
                                                        "peak_rss_growth_mib", "peak_rss_growth_bytes_per_added_unit",
                                                        "peak_anon_x", "peak_anon_growth_mib")}
                        for g, r in largest.items()}}


def _ratio_line(r: dict, size_key: str, unit: str) -> str:
    s = (f"  {human(r[size_key])}{'' if r['group'] == 'all' else ' ' + r['group']}: size x{r['size_x']:g}, "
         f"time x{r['time_x']:g}, time/{unit} x{r['time_per_unit_x']:g}")
    if "marginal_x" in r:
        mx = "n/a (the first step's was <= 0: timing noise)" if r["marginal_x"] is None else f"x{r['marginal_x']:g}"
        s += f", marginal {r['marginal_us_per_unit']:g} us/{unit} ({mx} the first step's)"
    s += f", peak RSS x{r['peak_rss_x']:g} ({r['peak_rss_growth_mib']:+.0f} MiB"
    if "peak_rss_growth_bytes_per_added_unit" in r:
        s += f", {r['peak_rss_growth_bytes_per_added_unit']:+.2f} B per added {unit}"
    return s + f"), anonymous x{r['peak_anon_x']:g} ({r['peak_anon_growth_mib']:+.0f} MiB)"


def print_report(results: dict) -> None:
    b, s = results.get("bin", {}), results.get("shard", {})
    if b.get("configs"):
        print("\nbin stage (preprocessing/bin.py, 7 rewards, quantile 64 bins, calibration "
              f"{results['settings']['calibration_size']})")
        ib = b.get("import_baseline") or {}
        if ib:
            print(f"(a process that only imports the same modules: {ib['wall_s']:.1f} s, {ib['peak_rss_mib']:.0f} MiB, "
                  f"anonymous {ib['peak_rss_anon_mib']:.0f} MiB)")
        print(f"{'rows':>8} {'files':>6} {'wall s':>8} {'rows/s':>10} {'us/row':>7} {'peak MiB':>9} {'-imports':>9} "
              f"{'anon MiB':>9} {'in MB':>8} {'out MB':>8} {'ok':>4}")
        for c in b["configs"]:
            print(f"{human(c['rows']):>8} {c['files']:>6} {c['wall_s']:>8.1f} {c['rows_per_s']:>10.0f} "
                  f"{c['us_per_row']:>7.2f} {c['peak_rss_mib']:>9.0f} {_num(c['peak_rss_above_imports_mib'], '.0f', 9)} "
                  f"{c['peak_rss_anon_mib']:>9.0f} {c['input_bytes'] / 1e6:>8.1f} {c['output_bytes'] / 1e6:>8.1f} {str(c['ok']):>4}")
        print("ratios vs the smallest size:")
        for r in b["ratios"]:
            print(_ratio_line(r, "rows", "row"))
        for g, f in b.get("fit", {}).items():
            print(f"  fit: wall = {f['fixed_s']:.2f} s + {f['us_per_unit']:.3f} us/row x rows "
                  f"(max residual {f['max_rel_residual'] * 100:.1f}%)")
        v = b.get("verdict", {})
        print(f"bin: linear time: {v.get('linear_time')}, bounded memory: {v.get('bounded_memory')}")
    if s.get("configs"):
        print(f"\nshard stage (preprocessing/shard.py; {s.get('encode_mode')} encoded sidecars, "
              f"bytes/sample by member: {s.get('bytes_per_sample_by_member')})")
        ib = s.get("import_baseline") or {}
        if ib:
            print(f"(a process that only imports the same modules: {ib['wall_s']:.1f} s, {ib['peak_rss_mib']:.0f} MiB, "
                  f"anonymous {ib['peak_rss_anon_mib']:.0f} MiB)")
        print(f"{'samples':>8} {'images':>6} {'shards':>6} {'wall s':>8} {'samples/s':>10} {'ms/sample':>9} "
              f"{'MiB/s out':>9} {'peak MiB':>9} {'-imports':>9} {'anon MiB':>9} {'in GB':>7} {'out GB':>7} {'ok':>4}")
        for c in s["configs"]:
            tin = sum(c["input_bytes"].values())
            print(f"{human(c['samples']):>8} {c['images']:>6} {c['shards']:>6} {c['wall_s']:>8.1f} "
                  f"{c['samples_per_s']:>10.0f} {c['ms_per_sample']:>9.3f} {c['mib_per_s_written']:>9.0f} "
                  f"{c['peak_rss_mib']:>9.0f} {_num(c['peak_rss_above_imports_mib'], '.0f', 9)} "
                  f"{c['peak_rss_anon_mib']:>9.0f} {tin / 1e9:>7.2f} "
                  f"{c['output_bytes'] / 1e9:>7.2f} {str(c['ok']):>4}")
        print("ratios vs the smallest size:")
        for r in s["ratios"]:
            print(_ratio_line(r, "samples", "sample"))
        for g, f in s.get("fit", {}).items():
            print(f"  fit, images {g}: wall = {f['fixed_s']:.2f} s + {f['us_per_unit'] / 1e3:.3f} ms/sample x samples "
                  f"(max residual {f['max_rel_residual'] * 100:.1f}%)")
        v = s.get("verdict", {})
        print(f"shard: linear time: {v.get('linear_time')}, bounded memory: {v.get('bounded_memory')}")


def plot(results: dict, path: Path) -> bool:
    """2 x 2 log-log panels: per stage, wall time (with the fitted fixed + per-unit line) and peak
    RSS (with the import-only baseline) against size."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    panels = []
    b, s = results.get("bin", {}), results.get("shard", {})
    if b.get("configs"):
        panels.append(("bin stage", "score rows", b, [("bin.py", "all", b["configs"], "rows")]))
    if s.get("configs"):
        panels.append(("shard stage", "samples", s, [(f"shard.py --images {m}", m,
                                                      [c for c in s["configs"] if c["images"] == m], "samples")
                                                     for m in ("keep", "drop")
                                                     if any(c["images"] == m for c in s["configs"])]))
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 4.3 * len(panels)), squeeze=False)
    for row, (title, xlabel, res, series) in enumerate(panels):
        ax_t, ax_m = axes[row]
        peaks = []
        sizes = sorted({c[key] for _, _, cs, key in series for c in cs})
        for label, group, cs, key in series:
            cs = sorted(cs, key=lambda c: c[key])
            x = [c[key] for c in cs]
            line, = ax_t.loglog(x, [c["wall_s"] for c in cs], "o-", label=label)
            fit = res.get("fit", {}).get(group)
            if fit and len(x) > 1:
                xs = [x[0] * (x[-1] / x[0]) ** (i / 40) for i in range(41)]
                ax_t.loglog(xs, [fit["fixed_s"] + fit["us_per_unit"] * 1e-6 * xi for xi in xs], "--",
                            color=line.get_color(), alpha=0.6,
                            label=f"fit {fit['fixed_s']:.1f} s + " + (f"{fit['us_per_unit'] / 1e3:.3g} ms x n" if
                                                                       fit["us_per_unit"] >= 1e3 else
                                                                       f"{fit['us_per_unit']:.3g} us x n"))
            ax_m.loglog(x, [c["peak_rss_mib"] for c in cs], "o-", color=line.get_color(), label=f"{label}: peak RSS")
            ax_m.loglog(x, [c["peak_rss_anon_mib"] for c in cs], "s--", color=line.get_color(), alpha=0.7,
                        label=f"{label}: peak anonymous RSS")
            peaks += [c["peak_rss_mib"] for c in cs] + [c["peak_rss_anon_mib"] for c in cs]
        base = res.get("import_baseline", {}).get("peak_rss_mib")
        if base:
            ax_m.axhline(base, color="grey", ls=":", label=f"imports only: peak RSS ({base:.0f} MiB)")
            anon = res["import_baseline"].get("peak_rss_anon_mib")
            ax_m.axhline(anon, color="grey", ls="-.", label=f"imports only: anonymous ({anon:.0f} MiB)")
            peaks += [base, anon]
        ax_m.set_ylim(max(min(peaks) / 4, 1), max(peaks) * 4)
        ax_t.set_title(f"{title}: wall time")
        ax_m.set_title(f"{title}: peak memory of the command")
        ax_t.set_ylabel("seconds")
        ax_m.set_ylabel("MiB")
        for ax in (ax_t, ax_m):
            ax.set_xlabel(xlabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            fmt = FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(fmt)
            ax.yaxis.set_minor_formatter(fmt)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(sizes, [human(v) for v in sizes])
    m = results["machine"]
    fig.suptitle(f"preprocessing stages at scale: {m['cpu']} x{m['cpu_count']}, {results['created'][:10]}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="bin,shard", help="comma-separated: bin, shard")
    p.add_argument("--sizes", "--bin-sizes", dest="bin_sizes", type=parse_sizes, default=parse_sizes("1M,4M,16M"),
                   help="bin stage: score rows per configuration (k/M suffixes)")
    p.add_argument("--rows-per-file", type=parse_size, default=10_000, help="bin stage: rows per score shard")
    p.add_argument("--num-bins", type=int, default=64)
    p.add_argument("--calibration-size", type=parse_size, default=100_000, help="bin stage: --calibration-size")
    p.add_argument("--shard-sizes", type=parse_sizes, default=parse_sizes("2k,8k,32k"),
                   help="shard stage: samples per configuration (multiples of --samples-per-shard)")
    p.add_argument("--samples-per-shard", "--shard-size", dest="samples_per_shard", type=parse_size, default=1000,
                   help="shard stage: samples per source shard")
    p.add_argument("--images", default="keep,drop", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   help="shard stage: --images modes to run (keep, drop)")
    p.add_argument("--unique-shards", type=int, default=4,
                   help="source shards generated by the synthetic world; the others are re-keyed copies")
    p.add_argument("--resolution", type=int, default=256, help="synthetic world image side (JPEG)")
    p.add_argument("--encode", default="synthetic", choices=["synthetic", "real"],
                   help="encoded sidecars: synthetic (16M-recipe shapes, random values) or the real encode.py "
                        "with tiny models (slow)")
    p.add_argument("--text-dim", type=int, default=2048, help="text embedding width (FLAN-T5-XL: 2048)")
    p.add_argument("--latent-shape", type=lambda s: [int(x) for x in s.split(",")], default=[4, 32, 32],
                   help="latent C,h,w (SDXL VAE at 256 px: 4,32,32)")
    p.add_argument("--txt-tokens", type=int, default=20, help="mean tokens of the txt caption (synthetic encode)")
    p.add_argument("--long-tokens", type=int, default=150, help="mean tokens of the synthetic long caption")
    p.add_argument("--max-text-len", type=int, default=256, help="data.max_text_len: embeddings are cut here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="inputs and outputs (default: a temporary directory); "
                   "an existing one is reused (inputs already there are not made again)")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory and every output directory")
    p.add_argument("--drop-caches", action="store_true",
                   help="sync and drop the page cache before each measured command (root; cold-cache numbers)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per measured command (killed after)")
    p.add_argument("--time-tolerance", type=float, default=1.5,
                   help="'linear' when the marginal time per row/sample at the largest step (or, with two sizes, "
                        "the time per row/sample at the largest size) <= this x the smallest's")
    p.add_argument("--memory-growth-mib", type=float, default=64,
                   help="'bounded' when peak RSS and peak anonymous RSS at the largest size exceed the smallest's "
                        "by <= this many MiB")
    p.add_argument("--no-import-baseline", dest="import_baseline", action="store_false",
                   help="skip measuring a process that only imports each stage's modules (saves ~4 s a stage)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results")
    p.add_argument("--plot", default=None, help="PNG plot (default: --out with .png; 'none' for no plot)")
    p.add_argument("--prepare", default=None, choices=["bin", "shard"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.argv = sys.argv[1:] if argv is None else list(argv)
    if a.prepare:  # a subprocess of the benchmark: make the inputs of one stage in --work-dir
        if a.prepare == "bin":
            make_bin_inputs(Path(a.work_dir) / "bin", max(a.bin_sizes), a.rows_per_file, a.seed)
        else:
            prepare_shard(a, Path(a.work_dir))
        return 0
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in ("bin", "shard")] + [m for m in a.images if m not in ("keep", "drop")]
    if bad:
        p.error(f"unknown stage / images mode: {bad}")
    if len(a.latent_shape) != 3:
        p.error("--latent-shape: C,h,w")

    tmp_made = a.work_dir is None
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="bench_scale_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = {
        "benchmark": "preprocessing_scale", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python preprocessing/bench_scale.py " + " ".join(a.argv),
        "machine": machine(),
        "settings": {k: v for k, v in vars(a).items() if k not in ("out", "plot", "argv", "prepare")}
        | {"work_dir": str(work)},
        "method": {
            "timing": "wall time around the subprocess running the real stage command; inputs prepared "
                      "beforehand and not timed",
            "peak_memory": "peak_rss_mib: VmHWM of the child (/proc/PID/status, the high-water mark of its own "
                           "resident set since exec), polled every 20 ms until it exits; the commands start no "
                           "other processes. ru_maxrss_mib (os.wait4) is kept beside it: Linux also counts in a "
                           "child's ru_maxrss the parent's address space it was vforked from, so it is at least "
                           "parent_maxrss_mib (this orchestrator is kept small; inputs are prepared in a "
                           "separate process). peak_rss_anon_mib: the largest RssAnon seen by the same polling "
                           "(the process's own data without mapped shared libraries, ~600 MiB of them torch's, "
                           "which the kernel can drop from RSS under page-cache pressure)",
            "page_cache": "dropped before each command" if a.drop_caches else
                          "not dropped: inputs written just before may be read from the page cache",
            "bin_inputs": "synthetic score shards in the score stage's layout (7 MIRO rewards, realistic "
                          "distributions with fp16-quantised / clipped values -> ties, 0.3% corrupt_image rows "
                          "all-NaN, 0.2% rows with vqa_score NaN), done records written by the shard-job runner "
                          "with a dummy file per shard as the source",
            "shard_inputs": "synthetic-world source tars (real JPEG at --resolution; --unique-shards generated, "
                            "the rest re-keyed copies); captions/scores sidecars synthetic in the stages' formats "
                            "through the runner; encoded sidecars per --encode; bins by the real bin.py",
        },
        "bin": {"configs": []}, "shard": {"configs": []},
    }
    print(f"work dir: {work}", flush=True)
    t_all = time.perf_counter()
    try:
        if "bin" in stages:
            bench_bin(a, work, results)
            results["bin"]["ratios"], results["bin"]["fit"] = ratios(results["bin"]["configs"], "rows", "us_per_row")
            results["bin"]["verdict"] = verdict(results["bin"]["ratios"], a.time_tolerance, a.memory_growth_mib)
        if "shard" in stages:
            bench_shard(a, work, results)
            results["shard"]["ratios"], results["shard"]["fit"] = ratios(results["shard"]["configs"], "samples",
                                                                         "ms_per_sample", "images")
            results["shard"]["verdict"] = verdict(results["shard"]["ratios"], a.time_tolerance, a.memory_growth_mib)
    finally:
        results["total_s"] = round(time.perf_counter() - t_all, 1)
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        png = None if (a.plot or "").lower() == "none" else Path(a.plot or out.with_suffix(".png"))
        if png is not None and plot(results, png):
            results["plot"] = str(png)
        out.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
        if tmp_made and not a.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    print_report(results)
    print(f"\nwrote {out}" + (f" and {results['plot']}" if results.get("plot") else "") +
          f" ({results['total_s']:.0f} s in all)")
    ok = all(c["ok"] for st in ("bin", "shard") for c in results[st]["configs"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
