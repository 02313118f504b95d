"""The units reward scores are written and reported in.

Three scales, per reward key (a column ``key@source`` takes its key's):

  raw       what the reward model outputs (the scorer's default)
  release   what MIRO's released data preparation fed to binning: clip_score/100, aesthetic/10,
            (image_reward + 2)/4, pick/100, sciscore/100, hpsv2 and vqa as they are. Quantile bins are
            the same either way (the maps are increasing and affine); means are not.
  paper     the units of the paper's Table 1 (PartiPrompts columns): PickScore/100, the others raw.

MIRO also scored each reward on one caption: the short synthetic caption for the 77-token (35 for
ImageReward) models, the long one for jina-clip-v2 (1024 tokens) and VQAScore (RELEASE_CAPTIONS).
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from .binning import base_key

# key -> (a, b): value = a * raw + b
_AFFINE: Dict[str, Dict[str, Tuple[float, float]]] = {
    "raw": {},
    "release": {"clip_score": (0.01, 0.0), "aesthetic_score": (0.1, 0.0), "image_reward_score": (0.25, 0.5),
                "pick_a_score_score": (0.01, 0.0), "sciscore_score": (0.01, 0.0)},
    "paper": {"pick_a_score_score": (0.01, 0.0)},
}
SCALES = tuple(_AFFINE)

RELEASE_CAPTIONS = {"image_reward_score": "short", "pick_a_score_score": "short", "hpsv2_score": "short",
                    "sciscore_score": "short", "clip_score": "long", "vqa_score": "long"}


def _check(scale: str) -> None:
    if scale not in _AFFINE:
        raise ValueError(f"unknown score scale {scale!r}; one of {', '.join(SCALES)}")


def from_raw(column: str, values, scale: str):
    """Raw scores of ``column`` (a reward key or ``key@source``) in ``scale``."""
    _check(scale)
    a, b = _AFFINE[scale].get(base_key(column), (1.0, 0.0))
    return np.multiply(values, a, dtype=np.float64) + b


def to_raw(column: str, values, scale: str):
    """The inverse of from_raw."""
    _check(scale)
    a, b = _AFFINE[scale].get(base_key(column), (1.0, 0.0))
    return (np.asarray(values, dtype=np.float64) - b) / a


def convert_evaluation(result: dict, scale: str) -> dict:
    """An evaluation result (miro_scale.evaluation.rewards.evaluate_rewards: per-image scores and
    mean/std summaries, all raw) with every score in ``scale``."""
    _check(scale)

    def stats(key, s):
        a, _ = _AFFINE[scale].get(base_key(key), (1.0, 0.0))
        return {**s, "mean": float(from_raw(key, s["mean"], scale)), "std": abs(a) * s["std"]}

    summary = {"overall": {k: stats(k, s) for k, s in result["summary"]["overall"].items()}}
    if "by_category" in result["summary"]:
        summary["by_category"] = {c: {k: stats(k, s) for k, s in per.items()}
                                  for c, per in result["summary"]["by_category"].items()}
    rows = [{**r, "scores": {k: float(from_raw(k, v, scale)) for k, v in r["scores"].items()}}
            for r in result["rows"]]
    return {**result, "summary": summary, "rows": rows, "scale": scale}
