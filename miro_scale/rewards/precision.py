"""Which precision each reward model is scored in, and how that choice is measured.

A reward scored in ``bf16`` or ``fp16`` keeps its weights in that dtype (half the memory: VQAScore's
11B parameters are 44 GB in fp32) and runs under autocast to it (norms and softmax stay fp32).

The policy (``configs/score_precision.json``) maps each reward to the cheapest precision that moves
fewer than 0.5% of a fixed sample set by more than one of 64 quantile bins relative to fp32
(``bin_changes``; ``preprocessing/bench_precision.py`` measures it and writes the file). A reward the
file does not list, or lists as unmeasured, is scored in fp32: the only precision known to pass
before it is measured with the released weights. On a CPU ``auto`` means fp32.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from .binning import RewardBins, compute_edges
from .registry import canonical_key

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHEAPEST_FIRST = ("bf16", "fp16", "fp32")  # bf16 first at equal cost: fp16 can overflow (T5)
POLICY_FILE = Path(__file__).resolve().parents[2] / "configs" / "score_precision.json"
MAX_MOVED = 0.005   # fraction of samples allowed to move by more than one bin
NUM_BINS = 64


def load_policy(path: Optional[str | Path] = None) -> Dict[str, str]:
    """{reward key: precision} from a policy file (default: the project's)."""
    path = Path(path) if path else POLICY_FILE
    if not path.exists():
        if path == POLICY_FILE:
            return {}
        raise FileNotFoundError(f"precision policy {path} does not exist")
    doc = json.loads(path.read_text())
    out = {}
    for key, entry in doc.get("rewards", {}).items():
        p = entry.get("precision") if isinstance(entry, dict) else entry
        if p not in DTYPES:
            raise ValueError(f"{path}: rewards.{key}.precision must be one of {', '.join(DTYPES)}, got {p!r}")
        out[canonical_key(key)] = p
    return out


def resolve(spec: str, keys: Sequence[str], device: torch.device, policy: Optional[Mapping[str, str]] = None
            ) -> Dict[str, str]:
    """Precision per reward from ``spec``: ``auto`` (the policy on CUDA, fp32 elsewhere), one of
    fp32/bf16/fp16 for every reward, or ``key=p,key=p`` (others auto)."""
    keys = [canonical_key(k) for k in keys]
    auto = dict.fromkeys(keys, "fp32")
    if torch.device(device).type == "cuda":
        pol = load_policy() if policy is None else dict(policy)
        auto.update({k: pol[k] for k in keys if k in pol})
    spec = (spec or "auto").strip()
    if spec == "auto":
        return auto
    if spec in DTYPES:
        return dict.fromkeys(keys, spec)
    out = dict(auto)
    for part in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, p = part.partition("=")
        if not sep or p not in DTYPES:
            raise ValueError(f"--precision: expected auto, {'/'.join(DTYPES)} or key=precision pairs, got {part!r}")
        k = canonical_key(key)
        if k not in out:
            raise ValueError(f"--precision: {key!r} is not one of the rewards being scored ({', '.join(keys)})")
        out[k] = p
    return out


def bin_changes(reference: np.ndarray, other: np.ndarray, num_bins: int = NUM_BINS) -> dict:
    """How far ``other`` moves samples from their bins, with quantile bins calibrated on ``reference``
    (the scores of the same samples in fp32) as the bin stage calibrates them."""
    ref = np.asarray(reference, np.float64)
    oth = np.asarray(other, np.float64)
    ok = np.isfinite(ref)
    bins = RewardBins("_", "quantile", num_bins, list(compute_edges(ref[ok], num_bins, "quantile")))
    a, b = bins.assign(ref[ok]), bins.assign(oth[ok])
    shift = np.abs(a - b)
    lost = ~np.isfinite(oth[ok])  # NaN/inf where fp32 had a value: the worst move
    spread = float(np.std(ref[ok])) or 1.0
    diff = np.abs(oth[ok] - ref[ok])
    return {"samples": int(ok.sum()),
            "moved_over_one_bin": float(np.mean((shift > 1) | lost)),
            "moved_any_bin": float(np.mean((shift > 0) | lost)),
            "max_bin_shift": int(shift[~lost].max()) if (~lost).any() else None,
            "non_finite": int(lost.sum()),
            "mean_abs_diff_over_std": float(np.mean(diff[~lost]) / spread) if (~lost).any() else None,
            "max_abs_diff_over_std": float(np.max(diff[~lost]) / spread) if (~lost).any() else None}


def choose(changes: Mapping[str, dict], max_moved: float = MAX_MOVED) -> str:
    """The cheapest precision whose bin_changes move at most ``max_moved`` of the samples by > 1 bin."""
    for p in CHEAPEST_FIRST:
        if p == "fp32" or (p in changes and changes[p]["moved_over_one_bin"] < max_moved):
            return p
    return "fp32"  # pragma: no cover - fp32 is always in CHEAPEST_FIRST
