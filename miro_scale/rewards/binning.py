"""Calibration (bin edges from a sample of raw scores) and binning (raw -> bin index -> value).

Strategies (B = --num-bins):
  quantile  B equal-population bins: inner edges at the k/B quantiles (k = 1..B-1) of up to
            `calibration_size` finite raw scores drawn uniformly at random (seeded) from all shards.
            As MIRO's released code did, the quantiles are those of the *unique* values of that
            sample (`unique_values=False`, bin.py --population-quantiles, takes them over the whole
            sample; the two differ on tied or fp16-rounded scores, docs/fidelity.md). The draw
            streams over the shards' score tables (a bounded reservoir: memory does not grow with
            the dataset).
  refined   MIRO's "refined quantile" ablation, as its released code builds it: the first B - r
            quantile bins, then the top r/B of the population split into r * f equal-population bins
            (defaults r = 8, f = 2: 56 + 16 = 72 bins in all).
  uniform   B equal-width bins between the calibration min and max.
The value fed to the model is bin / (num_bins - 1) in [0, 1].

Defined behaviour
  * Assignment: bin = the number of inner edges strictly below the raw score, i.e. bins
    (e_{k-1}, e_k], as the release's torch.bucketize did. Unlike the release, the outer edges are
    not overwritten with 0 and 1, so a score above 1 never gets bin B (value 64/63) and bins stay in
    [0, B-1] for every reward.
  * Ties: a raw score equal to several (duplicated) edges gets the middle of the bins those edges
    bound, bin = floor((#edges < x + #edges <= x) / 2); with one edge or none this is the rule
    above. Duplicated edges arise with population quantiles of tied scores (a value shared by many
    samples then lands in the middle of its run of bins, not at an end).
  * Constant reward (all calibration values equal): every edge equals the constant, so the tie rule
    puts it in bin floor((B-1)/2) (value ~0.5); bins.json marks it "constant": true. Smaller / larger
    raw values go to bin 0 / B-1.
  * Values outside the calibration range go to the first / last bin.
  * Missing rewards (NaN: the scorer could not compute it, status != ok) follow `missing`:
      drop    (default) the row is left out of the sidecar: loaders skip the sample
      median  the bin of the calibration median (value ~0.5 for quantile bins); "<key>.imputed" is true
      nan     bin -1 and value NaN are written; the loader decides
  * A reward with no finite calibration value is marked "empty": its rows are all missing.
  * Columns `<key>@<source>` (the same reward scored on another caption source) share the bins of
    `<key>`: calibration pools the values of all its columns.
bins.json records, per reward, the edges, the model id and checkpoint digest the scores came from
(read from the scored shards' metadata), counts, and a SHA-256 of the edges.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from miro_scale.atomic import write_bytes_atomic

STRATEGIES = ("quantile", "refined", "uniform")
MISSING_POLICIES = ("drop", "median", "nan")
BINS_VERSION = 1


@dataclass
class RewardBins:
    key: str
    strategy: str
    num_bins: int
    edges: List[float]                  # num_bins - 1 inner edges, non-decreasing
    lo: float = float("nan")
    hi: float = float("nan")
    median: float = float("nan")
    constant: bool = False
    empty: bool = False
    n_calibration: int = 0
    n_total: int = 0
    n_missing: int = 0
    model_id: str = ""
    checkpoint_digest: str = ""
    columns: List[str] = field(default_factory=list)

    def assign(self, raw: np.ndarray) -> np.ndarray:
        """Bin indices (int64); -1 where raw is NaN or the reward is empty."""
        raw = np.asarray(raw, dtype=np.float64)
        out = np.full(raw.shape, -1, dtype=np.int64)
        ok = np.isfinite(raw)
        if self.empty or not ok.any():
            return out
        e = np.asarray(self.edges, dtype=np.float64)
        left = np.searchsorted(e, raw[ok], side="left")
        right = np.searchsorted(e, raw[ok], side="right")
        out[ok] = (left + right) // 2
        return out

    def value(self, bins: np.ndarray) -> np.ndarray:
        b = np.asarray(bins)
        v = b.astype(np.float64) / max(self.num_bins - 1, 1)
        return np.where(b < 0, np.nan, v)

    @property
    def median_bin(self) -> int:
        if self.empty:
            return (self.num_bins - 1) // 2
        return int(self.assign(np.array([self.median]))[0])


def compute_edges(sample: np.ndarray, num_bins: int, strategy: str, refine_last: int = 8,
                  refine_factor: int = 2, unique_values: bool = True) -> np.ndarray:
    """Inner bin edges (len = total bins - 1) from finite calibration values."""
    x = np.asarray(sample, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise ValueError("no finite calibration values")
    if unique_values:  # MIRO's released code took quantiles of the unique values
        x = np.unique(x)
    if strategy == "uniform":
        lo, hi = float(x.min()), float(x.max())
        return lo + (hi - lo) * np.arange(1, num_bins) / num_bins
    if strategy == "quantile":
        q = np.arange(1, num_bins) / num_bins
    elif strategy == "refined":
        if not 0 < refine_last < num_bins or refine_factor < 1:
            raise ValueError(f"refined: need 0 < refine_last ({refine_last}) < bins ({num_bins}) and factor >= 1")
        base = np.arange(1, num_bins - refine_last + 1) / num_bins
        start = (num_bins - refine_last) / num_bins
        n_fine = refine_last * refine_factor
        fine = start + (1.0 - start) * np.arange(1, n_fine) / n_fine
        q = np.concatenate([base, fine])
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return np.quantile(x, q)


def total_bins(num_bins: int, strategy: str, refine_last: int = 8, refine_factor: int = 2) -> int:
    if strategy == "refined":
        return num_bins - refine_last + refine_last * refine_factor
    return num_bins


def base_key(column: str) -> str:
    return column.split("@", 1)[0]


def reward_columns_of(names: Sequence[str]) -> Dict[str, List[str]]:
    """Group a scores table's reward columns by reward key."""
    groups: Dict[str, List[str]] = {}
    for n in names:
        if n in ("key", "status", "error", "shard"):
            continue
        groups.setdefault(base_key(n), []).append(n)
    return groups


class _Reservoir:
    """A uniform random sample without replacement of at most ``size`` values from a stream: every
    value gets a random priority and the ``size`` smallest priorities are kept (memory O(size))."""

    def __init__(self, size: int, seed: int, key: str):
        self.size, self.seed, self.key = int(size), int(seed), key
        self.values = np.zeros(0, np.float64)
        self.priority = np.zeros(0, np.float64)
        self.n_total = self.n_missing = 0
        self.columns: List[str] = []

    def add(self, vals: np.ndarray, part: int) -> None:
        finite = vals[np.isfinite(vals)]
        self.n_total += int(vals.size)
        self.n_missing += int(vals.size - finite.size)
        salt = int.from_bytes(hashlib.sha256(self.key.encode()).digest()[:4], "little")
        prio = np.random.default_rng([self.seed, part, salt]).random(finite.size)
        values = np.concatenate([self.values, finite])
        priority = np.concatenate([self.priority, prio])
        if values.size > self.size:
            keep = np.argpartition(priority, self.size - 1)[: self.size]
            values, priority = values[keep], priority[keep]
        self.values, self.priority = values, priority

    def sample(self) -> np.ndarray:
        return np.sort(self.values)


def fit_bins(tables, num_bins: int = 64, strategy: str = "quantile", calibration_size: int = 100_000,
             seed: int = 0, refine_last: int = 8, refine_factor: int = 2, unique_values: bool = True,
             rewards: Optional[Sequence[str]] = None, reward_meta: Optional[dict] = None) -> Dict[str, RewardBins]:
    """Fit bins per reward from pyarrow score tables: one table, or an iterable of them (e.g. one per
    shard, read one at a time: memory stays bounded by one table plus the calibration sample)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if num_bins < 2:
        raise ValueError(f"bins must be >= 2, got {num_bins}")
    if hasattr(tables, "column_names"):
        tables = [tables]
    reservoirs: Dict[str, _Reservoir] = {}
    for part, table in enumerate(tables):
        for key, cols in reward_columns_of(table.column_names).items():
            if rewards is not None and key not in rewards:
                continue
            r = reservoirs.setdefault(key, _Reservoir(calibration_size, seed, key))
            r.columns += [c for c in cols if c not in r.columns]
            r.add(np.concatenate([table.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                                  for c in cols]), part)
    if rewards is not None:
        missing = [r for r in rewards if r not in reservoirs]
        if missing:
            raise KeyError(f"rewards {missing} are not in the scores (have {sorted(reservoirs)})")
    reward_meta = reward_meta or {}
    nb = total_bins(num_bins, strategy, refine_last, refine_factor)
    out: Dict[str, RewardBins] = {}
    for key in sorted(reservoirs):
        res = reservoirs[key]
        sample = res.sample()
        meta = reward_meta.get(key, {})
        rb = RewardBins(key=key, strategy=strategy, num_bins=nb, edges=[], n_total=res.n_total,
                        n_missing=res.n_missing, n_calibration=int(sample.size),
                        model_id=str(meta.get("model_id", "")), checkpoint_digest=str(meta.get("checkpoint_digest", "")),
                        columns=list(res.columns))
        if sample.size == 0:
            rb.empty = True
            rb.edges = [float("nan")] * (nb - 1)
        else:
            edges = compute_edges(sample, num_bins, strategy, refine_last, refine_factor, unique_values)
            rb.edges = [float(e) for e in edges]
            rb.lo, rb.hi = float(sample[0]), float(sample[-1])
            rb.median = float(np.median(sample))
            rb.constant = bool(rb.lo == rb.hi)
        out[key] = rb
    return out


def edges_digest(bins: Dict[str, RewardBins]) -> str:
    h = hashlib.sha256()
    for k in sorted(bins):
        h.update(k.encode())
        h.update(np.asarray(bins[k].edges, dtype=np.float64).tobytes())
    return h.hexdigest()


def save_bins(path: str, bins: Dict[str, RewardBins], **info) -> dict:
    """Write bins.json atomically and return its content."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    doc = {"version": BINS_VERSION, **info, "edges_sha256": edges_digest(bins),
           "rewards": {k: {f: clean(v) for f, v in asdict(b).items()} for k, b in bins.items()}}
    for k, b in bins.items():
        doc["rewards"][k]["median_bin"] = b.median_bin
    write_bytes_atomic(path, json.dumps(doc, indent=1, sort_keys=True).encode())
    return doc


def load_bins(path: str) -> tuple:
    doc = json.loads(Path(path).read_text())
    if doc.get("version") != BINS_VERSION:
        raise ValueError(f"{path}: bins.json version {doc.get('version')} (expected {BINS_VERSION})")
    fields = set(RewardBins.__dataclass_fields__)
    bins = {}
    for k, d in doc["rewards"].items():
        d = {f: (float("nan") if v is None and f in ("lo", "hi", "median") else v) for f, v in d.items() if f in fields}
        d["edges"] = [float("nan") if e is None else e for e in d["edges"]]
        bins[k] = RewardBins(**d)
    return bins, doc


def apply_bins(table, bins: Dict[str, RewardBins], missing: str = "drop"):
    """Bin a scores table. Returns a pyarrow table: key, then per reward column c: c.raw (float32),
    c.bin (int16), c.value (float32), and for missing='median' c.imputed (bool)."""
    import pyarrow as pa
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    groups = reward_columns_of(table.column_names)
    unknown = [k for k in groups if k not in bins]
    if unknown:
        raise KeyError(f"scores have rewards {unknown} that bins.json does not define (has {sorted(bins)})")
    n = table.num_rows
    keep = np.ones(n, dtype=bool)
    cols = {"key": table.column("key")}
    for key, names in groups.items():
        rb = bins[key]
        for c in names:
            raw = table.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
            b = rb.assign(raw)
            miss = b < 0
            imputed = np.zeros(n, dtype=bool)
            if missing == "drop":
                keep &= ~miss
            elif missing == "median":
                b = np.where(miss, rb.median_bin, b)
                imputed = miss
            cols[f"{c}.raw"] = pa.array(raw.astype(np.float32), pa.float32())
            cols[f"{c}.bin"] = pa.array(b.astype(np.int16), pa.int16())
            cols[f"{c}.value"] = pa.array(rb.value(b).astype(np.float32), pa.float32())
            if missing == "median":
                cols[f"{c}.imputed"] = pa.array(imputed, pa.bool_())
    t = pa.table(cols)
    if missing == "drop":
        t = t.filter(pa.array(keep))
    return t


def rewards_by_key(table_binned) -> dict:
    """A binned table (:func:`apply_bins`, with the bin stage's ``miro_bins`` metadata giving each
    reward's number of bins) as ``{key: {column: {"raw", "bin", "value"}}}``, the layout of the shard
    format's json rewards, with value = bin / (num_bins - 1) exactly. A missing reward (policy
    ``nan``) has ``bin`` and ``value`` None (loaders skip the sample as ``missing_reward``); a
    non-finite raw score is None; an imputed one (policy ``median``) carries ``"imputed": true``."""
    num_bins = json.loads((table_binned.schema.metadata or {}).get(b"miro_bins", b"{}")).get("num_bins", {})
    cols = table_binned.column_names
    rewards = [c[: -len(".bin")] for c in cols if c.endswith(".bin")]
    missing = sorted({base_key(r) for r in rewards} - set(num_bins))
    if missing:
        raise ValueError(f"binned table has no num_bins for {missing} in its miro_bins metadata")
    data = {c: table_binned.column(c).to_numpy(zero_copy_only=False) for c in cols if c != "key"}
    out = {}
    for i, k in enumerate(table_binned.column("key").to_pylist()):
        ent = {}
        for r in rewards:
            raw, b = float(data[f"{r}.raw"][i]), int(data[f"{r}.bin"][i])
            e = {"raw": raw if math.isfinite(raw) else None, "bin": None, "value": None}
            if b >= 0:
                e["bin"], e["value"] = b, b / (num_bins[base_key(r)] - 1)
            if f"{r}.imputed" in data and bool(data[f"{r}.imputed"][i]):
                e["imputed"] = True
            ent[r] = e
        out[k] = ent
    return out
