"""The paper's four claims as measurements on a model comparison, each with a verdict.

Inputs are plain numbers (from miro_scale.evaluation.generation / metrics): reward curves over
training, final mean rewards, controllability sweeps and best-of-n curves of a reward-conditioned
model ("miro"), an unconditioned baseline and a single-reward specialist. Every claim returns a dict
with its numbers, ``reproduces`` (True / False) and a one-line ``summary`` stating both.

1. convergence      MIRO reaches the baseline's final reward N x sooner (paper: 3.3x to 19x, Fig. 5)
2. specialist       a single-reward specialist wins its reward and loses others; MIRO balances
                    (Fig. 4, Table 1)
3. controllability  the measured reward rises with the requested level; isolating a reward moves
                    mostly that reward (Fig. 9)
4. test-time scaling  MIRO with few samples matches the baseline with many (Fig. 8)
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence

from miro_scale.evaluation.metrics import mean_finite, speedup


def _fmt(x: Optional[float], digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def convergence(curves: Mapping[str, Mapping[str, Sequence[float]]], keys: Sequence[str], model: str = "miro",
                baseline: str = "baseline", aggregate: str = "mean_percentile") -> Dict:
    """curves: {name: {"step": [...], key: [...], aggregate: [...]}}. Speed-up per key and for the
    aggregate; reproduces when the aggregate's speed-up is > 1 (MIRO gets there sooner)."""
    base, ours = curves[baseline], curves[model]
    per_key = {}
    for key in list(keys) + [aggregate]:
        per_key[key] = speedup(base["step"], base[key], ours["step"], ours[key])
    agg = per_key[aggregate]
    finals = {key: (base[key][-1], ours[key][-1]) for key in list(keys) + [aggregate]}
    # reached at the first evaluated checkpoint: the speed-up is at least that, not exactly
    lower_bound = {key: per_key[key] is not None and ours[key][0] >= base[key][-1] for key in per_key}
    reproduces = agg is not None and agg > 1.0
    if agg is None:
        text = (f"MIRO does not reach the baseline's final {aggregate} ({_fmt(finals[aggregate][0])}) within "
                f"{int(ours['step'][-1])} steps (its final: {_fmt(finals[aggregate][1])})")
    else:
        text = (f"MIRO reaches the baseline's final {aggregate} ({_fmt(finals[aggregate][0])} after "
                f"{int(base['step'][-1])} steps) {'at least ' if lower_bound[aggregate] else ''}{agg:.1f}x sooner")
    text += "; per reward: " + ", ".join(
        f"{k.replace('_score', '')} " + ("never" if per_key[k] is None else
                                         f"{'>=' if lower_bound[k] else ''}{per_key[k]:.1f}x") for k in keys)
    return {"speedup": per_key, "lower_bound": lower_bound, "finals": finals, "reproduces": reproduces,
            "summary": text}


def specialist(means: Mapping[str, Mapping[str, float]], keys: Sequence[str], target: str, model: str = "miro",
               special: str = "specialist", baseline: str = "baseline") -> Dict:
    """means: {name: {key: mean on a common scale (percentiles)}}. The specialist hacks when it beats
    MIRO and the baseline on its target and trails MIRO on most other rewards; MIRO balances when it
    is at or above the baseline on most rewards."""
    others = [k for k in keys if k != target]
    wins_target = means[special][target] > max(means[model][target], means[baseline][target])
    loses_others = [k for k in others if means[special][k] < means[model][k]]
    miro_over_base = [k for k in keys if means[model][k] >= means[baseline][k]]
    hacks = wins_target and len(loses_others) * 2 > len(others)
    balances = len(miro_over_base) * 2 > len(keys)
    spread = {name: max(v[k] for k in keys) - min(v[k] for k in keys) for name, v in means.items()}
    text = (f"specialist on {target}: {_fmt(means[special][target])} vs MIRO {_fmt(means[model][target])}, "
            f"below MIRO on {len(loses_others)}/{len(others)} other rewards; MIRO at or above the baseline on "
            f"{len(miro_over_base)}/{len(keys)} rewards (mean {_fmt(mean_finite([means[model][k] for k in keys]))} "
            f"vs {_fmt(mean_finite([means[baseline][k] for k in keys]))})")
    return {"specialist_wins_target": wins_target, "specialist_loses": loses_others,
            "miro_at_or_above_baseline": miro_over_base, "spread": spread,
            "reproduces": hacks and balances, "summary": text}


def controllability(isolated: Mapping[str, Mapping[str, Dict]], keys: Sequence[str],
                    joint: Optional[Mapping[str, Dict]] = None, min_rho: float = 0.2) -> Dict:
    """isolated: {dial: {measured key: {"means_pct": [...], "spearman": rho}}} (means on a common
    percentile scale); joint: the same for all dials moved together. Reproduces when most dials have
    a Spearman rho >= min_rho on their own reward and move it more than the others on average."""
    rho = {k: isolated[k][k]["spearman"] for k in keys if k in isolated}
    own, cross = {}, {}
    for dial in rho:
        moves = {k: abs(v["means_pct"][-1] - v["means_pct"][0]) for k, v in isolated[dial].items()}
        own[dial] = moves[dial]
        cross[dial] = mean_finite([m for k, m in moves.items() if k != dial])
    rising = [k for k, r in rho.items() if r is not None and math.isfinite(r) and r >= min_rho]
    isolating = [k for k in rho if own[k] > cross[k]]
    reproduces = len(rising) * 2 > len(rho) and len(isolating) * 2 > len(rho)
    joint_rho = {k: v["spearman"] for k, v in (joint or {}).items()}
    text = ("Spearman rho (requested level vs measured) per dial: "
            + ", ".join(f"{k.replace('_score', '')} {_fmt(r)}" for k, r in rho.items())
            + f"; {len(isolating)}/{len(rho)} dials move their own reward most")
    return {"spearman": rho, "own_move": own, "cross_move": cross, "rising": rising, "isolating": isolating,
            "joint_spearman": joint_rho, "reproduces": reproduces, "summary": text}


def sample_scaling(curves: Mapping[str, Mapping[str, Sequence[float]]], ns: Sequence[int], keys: Sequence[str],
                      model: str = "miro", baseline: str = "baseline") -> Dict:
    """curves: {name: {key: [best-of-n mean at each n]}}. Per key, the fewest samples with which MIRO
    matches the baseline's best-of-max(n); reproduces when MIRO needs fewer on most keys."""
    fewest = {}
    for key in keys:
        target = curves[baseline][key][-1]
        fewest[key] = next((n for n, v in zip(ns, curves[model][key]) if v >= target), None)
    better = [k for k, n in fewest.items() if n is not None and n < ns[-1]]
    reproduces = len(better) * 2 > len(keys)
    text = (f"MIRO matches the baseline's best-of-{ns[-1]} with "
            + ", ".join(f"{k.replace('_score', '')}: {n if n is not None else f'>{ns[-1]}'}" for k, n in fewest.items())
            + " samples")
    return {"fewest_samples": fewest, "reproduces": reproduces, "summary": text}
