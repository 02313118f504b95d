"""Numbers the paper's claims are stated in, computed from scored samples (no model calls here).

- spearman(x, y): rank correlation (average ranks for ties), for controllability.
- best_of_n(scores, selector, ns): test-time scaling: draw n images per prompt, keep the one the
  selector reward ranks best, report every reward of the kept image (the paper's Fig. 8).
- category_summary(samples, key, threshold): GenEval-style accuracy per category: the share of
  images whose alignment reward reaches ``threshold``, with the mean score.
- steps_to_reach(steps, values, target): the first (interpolated) step a training curve reaches a
  value, and speedup(...) the baseline-vs-model ratio of the paper's Fig. 5.
- percentile(values, reference): a score as the share of a reference distribution (the training
  data's scores) below it, which puts rewards of any scale on one [0, 1] axis (radar charts).
- paired_difference(a, b): the mean difference of two models' scores on the same prompts and
  noise, with its standard error over prompts (the unit that varies between evaluations).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch


def _ranks(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), np.float64)
    ranks[order] = np.arange(len(a), dtype=np.float64)
    sorted_a = a[order]
    i = 0
    while i < len(a):  # average the ranks of ties
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        if j > i:
            ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of the finite pairs; NaN with fewer than 3 or a constant side."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


Selector = Union[str, Callable[[Dict[str, torch.Tensor]], torch.Tensor]]


def best_of_n(scores: Mapping[str, torch.Tensor], selector: Selector, ns: Sequence[int], repeats: int = 16,
              seed: int = 0) -> Dict[str, list]:
    """Test-time scaling. ``scores``: {key: [P, N]} for N images per prompt; ``selector``: the reward
    key that picks the best image (or a function of the scores dict giving [P, N]). For each n in
    ``ns`` (<= N), n of the N images are drawn at random (``repeats`` times), the selector's best is
    kept, and every reward's mean over prompts and repeats is reported: {key: [mean at each n]}."""
    sel = scores[selector] if isinstance(selector, str) else selector(dict(scores))
    sel = torch.nan_to_num(sel.float(), nan=-math.inf)
    num = sel.shape[1]
    if max(ns) > num:
        raise ValueError(f"best_of_n: n up to {max(ns)} but only {num} images per prompt")
    g = torch.Generator().manual_seed(seed)
    out: Dict[str, list] = {key: [] for key in scores}
    for n in ns:
        picked = {key: [] for key in scores}
        for _ in range(repeats if n < num else 1):
            subset = torch.stack([torch.randperm(num, generator=g)[:n] for _ in range(sel.shape[0])])
            best = subset.gather(1, sel.gather(1, subset).argmax(1, keepdim=True))
            for key, values in scores.items():
                picked[key].append(values.float().gather(1, best).squeeze(1))
        for key in scores:
            out[key].append(float(torch.stack(picked[key]).nanmean()))
    return out


def category_summary(scores: Mapping[str, torch.Tensor], categories: Sequence[Optional[str]], key: str,
                     threshold: float) -> Dict[str, Dict[str, float]]:
    """Per category (and "overall"): {"accuracy": share of images with scores[key] >= threshold,
    "mean": mean of scores[key], "count": images}. ``scores``: {key: [P, N]}; one category per prompt."""
    values = scores[key].float()
    groups: Dict[str, list] = {}
    for i, category in enumerate(categories):
        groups.setdefault(category or "uncategorised", []).append(i)
    groups["overall"] = list(range(len(categories)))
    summary = {}
    for name, rows in groups.items():
        v = values[rows].ravel()
        v = v[torch.isfinite(v)]
        summary[name] = {"accuracy": float((v >= threshold).float().mean()) if len(v) else float("nan"),
                         "mean": float(v.mean()) if len(v) else float("nan"), "count": int(len(v))}
    return summary


def steps_to_reach(steps: Sequence[float], values: Sequence[float], target: float) -> Optional[float]:
    """The first step at which the curve reaches ``target`` (linear between points); None if never."""
    for i, (step, value) in enumerate(zip(steps, values)):
        if value >= target:
            if i == 0:
                return float(step)
            s0, v0 = steps[i - 1], values[i - 1]
            return float(s0 + (step - s0) * (target - v0) / (value - v0)) if value != v0 else float(step)
    return None


def speedup(baseline_steps: Sequence[float], baseline_values: Sequence[float], steps: Sequence[float],
            values: Sequence[float]) -> Optional[float]:
    """How many times sooner a model reaches the baseline's final value: baseline's last step / the
    model's first step at that value (None: the model never reaches it)."""
    reached = steps_to_reach(steps, values, baseline_values[-1])
    if reached is None:
        return None
    return float(baseline_steps[-1]) / max(float(reached), 1e-9)


def percentile(values: Union[float, Sequence[float]], reference: Sequence[float]) -> np.ndarray:
    """The share of the finite reference values below each value (ties count half), in [0, 1]."""
    ref = np.sort(np.asarray(reference, np.float64)[np.isfinite(np.asarray(reference, np.float64))])
    v = np.atleast_1d(np.asarray(values, np.float64))
    if not len(ref):
        return np.full(v.shape, np.nan)
    below = np.searchsorted(ref, v, side="left")
    upto = np.searchsorted(ref, v, side="right")
    return (below + upto) / (2.0 * len(ref))


def controllability(levels: Sequence[float], scores_per_level: Sequence[Mapping[str, torch.Tensor]]) -> Dict:
    """A reward dial swept over ``levels`` (one scores dict {key: [P, N]} per level, same prompts and
    noise): per measured key the mean at each level and Spearman's correlation between the level and
    each image's score. {key: {"means": [...], "spearman": rho}}."""
    out = {}
    for key in scores_per_level[0]:
        xs, ys = [], []
        for level, scores in zip(levels, scores_per_level):
            v = scores[key].float().ravel()
            xs += [float(level)] * len(v)
            ys += v.tolist()
        out[key] = {"means": [float(s[key].float().nanmean()) for s in scores_per_level],
                    "spearman": spearman(xs, ys)}
    return out


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> Dict[str, float]:
    """a, b: [P, N] scores of two settings on the same P prompts (N images each, the same noise).
    Each prompt's mean difference (NaN images left out), then their mean and its standard error
    over prompts: images of one prompt are not independent, prompts are."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"paired_difference: expected two [prompts, images] arrays of one shape, got {a.shape} and {b.shape}")
    with warnings.catch_warnings():  # a prompt whose images all lack a score is left out, silently
        warnings.simplefilter("ignore", RuntimeWarning)
        per_prompt = np.nanmean(a, 1) - np.nanmean(b, 1)
    per_prompt = per_prompt[np.isfinite(per_prompt)]
    n = len(per_prompt)
    mean = float(per_prompt.mean()) if n else float("nan")
    stderr = float(per_prompt.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"difference": mean, "stderr": stderr, "prompts": n}


def summary_table(rows: Mapping[str, Mapping[str, float]], keys: Sequence[str], fmt: str = "{:.3f}",
                  first: str = "model") -> str:
    """A markdown table: one row per name, one column per key."""
    lines = [f"| {first} | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, values in rows.items():
        cells = []
        for key in keys:
            value = values.get(key)
            cells.append("-" if value is None or (isinstance(value, float) and math.isnan(value))
                         else fmt.format(value) if isinstance(value, (int, float)) else str(value))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_finite(values: Sequence[float]) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else float("nan")


def nan_to_none(x: Optional[float]) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


__all__ = ["spearman", "best_of_n", "category_summary", "steps_to_reach", "speedup", "percentile",
           "paired_difference", "controllability", "summary_table", "mean_finite", "nan_to_none"]
