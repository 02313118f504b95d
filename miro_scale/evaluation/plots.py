"""Figures of a model comparison (matplotlib, Agg backend; each function writes one PNG and returns its path).

- training_curves: a reward against the training step, one line per model (the paper's Fig. 5)
- radar: models' mean rewards on a common [0, 1] axis (the paper's Fig. 4)
- controllability_curves: measured reward against the requested level, one panel per dial (Fig. 9)
- best_of_n_curves: a reward of the best of n images against n, one line per model (Fig. 8)
- category_bars: a reward's mean per prompt category, one bar per model (GenEval categories)
- image_grid: rows of images with row labels (sample grids)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def training_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], keys: Sequence[str], path: Path,
                    title: str = "reward during training") -> Path:
    """curves: {model: {"step": [...], key: [...]}}; one panel per key."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.3 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for model, curve in curves.items():
            if key in curve:
                ax.plot(curve["step"], curve[key], marker="o", markersize=3, label=model)
        ax.set_title(key.replace("_score", ""), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def radar(values: Mapping[str, Mapping[str, float]], keys: Sequence[str], path: Path,
          title: str = "mean reward (percentile of the training data)") -> Path:
    """values: {model: {key: value in [0, 1]}}."""
    plt = _plt()
    angles = np.linspace(0, 2 * math.pi, len(keys), endpoint=False).tolist()
    fig = plt.figure(figsize=(4.6, 4.6))
    ax = fig.add_subplot(111, polar=True)
    for model, v in values.items():
        r = [v.get(k, float("nan")) for k in keys]
        ax.plot(angles + angles[:1], r + r[:1], marker="o", markersize=3, label=model)
        ax.fill(angles + angles[:1], r + r[:1], alpha=0.08)
    ax.set_xticks(angles)
    ax.set_xticklabels([k.replace("_score", "") for k in keys], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.25, -0.1))
    return _save(fig, path)


def controllability_curves(sweeps: Mapping[str, Mapping[str, Dict]], levels: Sequence[float], path: Path,
                           title: str = "measured reward vs requested level") -> Path:
    """sweeps: {dial key: {measured key: {"means": [...], "spearman": rho}}}; one panel per dial,
    the dialled reward bold, the others thin (what isolating one reward moves)."""
    plt = _plt()
    dials = list(sweeps)
    fig, axes = plt.subplots(1, len(dials), figsize=(3.4 * len(dials), 3.0), squeeze=False)
    for ax, dial in zip(axes[0], dials):
        for key, result in sweeps[dial].items():
            means = np.asarray(result["means"], np.float64)
            # each measured reward relative to its own value at the lowest level, so all fit one axis
            ref = np.nanmax(np.abs(means)) or 1.0
            rel = (means - means[0]) / ref
            own = key == dial
            ax.plot(levels, rel, marker="o", markersize=3, linewidth=2.2 if own else 0.9,
                    label=f"{key.replace('_score', '')} (rho={result['spearman']:+.2f})" if own
                    else key.replace("_score", ""))
        ax.set_title(f"dial: {dial.replace('_score', '')}", fontsize=9)
        ax.set_xlabel("requested level")
        ax.set_ylabel("change / max |mean|", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def best_of_n_curves(curves: Mapping[str, Mapping[str, Sequence[float]]],
                     ns: Union[Sequence[int], Mapping[str, Sequence[int]]], key: str, path: Path,
                     title: Optional[str] = None) -> Path:
    """curves: {model: {key: [mean at each n]}}; ns: the n of every model, or {model: its ns}; x on a
    log2 axis."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.4, 3.2))
    per_model = ns if isinstance(ns, Mapping) else {model: ns for model in curves}
    for model, curve in curves.items():
        ax.plot(per_model[model], curve[key], marker="o", markersize=3, label=model)
    ticks = sorted({n for model in curves for n in per_model[model]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(n) for n in ticks])
    ax.set_xlabel("samples per prompt (best kept)")
    ax.set_ylabel(key.replace("_score", ""))
    ax.set_title(title or f"best-of-n: {key.replace('_score', '')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def category_bars(values: Mapping[str, Mapping[str, float]], path: Path, ylabel: str,
                  title: str = "per category") -> Path:
    """values: {model: {category: value}}; groups of bars per category (those of the first model, in order)."""
    plt = _plt()
    categories = list(next(iter(values.values())))
    width = 0.8 / len(values)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(categories) * max(1, len(values)) ** 0.5 + 1.5), 3.2))
    x = np.arange(len(categories))
    for i, (model, v) in enumerate(values.items()):
        ax.bar(x + (i - (len(values) - 1) / 2) * width, [v.get(c, float("nan")) for c in categories], width,
               label=model)
    ax.set_xticks(x, categories, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _save(fig, path)


def image_grid(rows: Mapping[str, torch.Tensor], path: Path, column_labels: Optional[List[str]] = None,
               scale: int = 2) -> Path:
    """rows: {label: [K, 3, H, W] in [0, 1]}: one row of K images per label, upscaled by ``scale``
    (nearest) so small images stay readable."""
    plt = _plt()
    labels = list(rows)
    k = max(r.shape[0] for r in rows.values())
    h, w = next(iter(rows.values())).shape[-2:]
    fig, axes = plt.subplots(len(labels), k, figsize=(k * w * scale / 64 + 1.6, len(labels) * h * scale / 64 + 0.5),
                             squeeze=False)
    for i, label in enumerate(labels):
        for j in range(k):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if j < rows[label].shape[0]:
                ax.imshow(rows[label][j].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            if j == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
            if i == 0 and column_labels and j < len(column_labels):
                ax.set_title(column_labels[j], fontsize=6)
    return _save(fig, path)
