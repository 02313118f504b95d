"""The evaluation library's numbers: rank correlation, best-of-n, GenEval-style categories,
convergence speed-up, percentiles, and the claim checks built on them."""
import math

import numpy as np
import pytest
import torch

from miro_scale.evaluation import claims
from miro_scale.evaluation.metrics import (best_of_n, category_summary, controllability, paired_difference,
                                           percentile, spearman, speedup, steps_to_reach)


def test_spearman_matches_pearson_of_ranks_with_ties():
    x = [1, 2, 2, 3, 5, 8]
    y = [2, 1, 4, 4, 9, 7]
    rx = np.array([0, 1.5, 1.5, 3, 4, 5])
    ry = np.array([1, 0, 2.5, 2.5, 5, 4])
    assert spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1, float("nan")], [1, 2]))


def test_paired_difference_averages_per_prompt_and_errs_over_prompts():
    a = torch.tensor([[1.0, 3.0], [2.0, float("nan")], [0.0, 0.0], [float("nan"), float("nan")]])
    b = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.5, 0.5]])
    out = paired_difference(a, b)
    # per prompt: 2 - 0, 2 - 1, 0 - 1; the last prompt has no score of a and is left out
    assert out["prompts"] == 3
    assert out["difference"] == pytest.approx(2 / 3)
    assert out["stderr"] == pytest.approx(np.std([2.0, 1.0, -1.0], ddof=1) / math.sqrt(3))
    with pytest.raises(ValueError, match="one shape"):
        paired_difference(torch.zeros(3, 2), torch.zeros(3, 4))


def test_best_of_n_rises_with_n_and_reports_the_selected_images_other_rewards():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(50, 8, generator=g)
    b = -a  # anti-correlated: selecting on a lowers b
    curves = best_of_n({"a": a, "b": b}, "a", [1, 2, 4, 8])
    assert curves["a"] == sorted(curves["a"])
    assert curves["b"] == sorted(curves["b"], reverse=True)
    assert curves["a"][-1] == pytest.approx(float(a.max(1).values.mean()))
    assert curves["a"][0] == pytest.approx(float(a.mean()), abs=0.03)
    with pytest.raises(ValueError):
        best_of_n({"a": a}, "a", [16])


def test_category_summary_counts_images_at_or_above_the_threshold():
    scores = {"align": torch.tensor([[1.0, 0.5], [0.95, 0.9], [0.2, float("nan")]])}
    out = category_summary(scores, ["colors", "colors", "position"], "align", 0.9)
    assert out["colors"] == {"accuracy": 0.75, "mean": pytest.approx(0.8375), "count": 4}
    assert out["position"]["accuracy"] == 0.0 and out["position"]["count"] == 1
    assert out["overall"]["count"] == 5


def test_speedup_interpolates_the_first_step_at_the_baselines_final_value():
    assert steps_to_reach([100, 200, 300], [0.1, 0.3, 0.5], 0.4) == pytest.approx(250)
    assert steps_to_reach([100, 200], [0.1, 0.2], 0.9) is None
    assert speedup([100, 200, 400], [0.1, 0.2, 0.4], [100, 200, 400], [0.2, 0.4, 0.6]) == pytest.approx(2.0)
    assert speedup([100, 200], [0.1, 0.5], [100, 200], [0.1, 0.2]) is None


def test_percentile_of_a_reference_distribution():
    ref = np.arange(100, dtype=float)
    assert percentile([-1, 49.5, 1000], ref).tolist() == [0.0, 0.5, 1.0]
    assert percentile(10, ref)[0] == pytest.approx(0.105)


def test_controllability_spearman_of_level_against_each_image():
    levels = [0.0, 0.5, 1.0]
    per_level = [{"r": torch.full((4, 2), float(v)) + 0.01 * torch.arange(8.0).view(4, 2),
                  "other": torch.rand(4, 2, generator=torch.Generator().manual_seed(i))}
                 for i, v in enumerate(levels)]
    out = controllability(levels, per_level)
    assert out["r"]["spearman"] > 0.9
    assert out["r"]["means"][0] < out["r"]["means"][-1]
    assert abs(out["other"]["spearman"]) < 0.6


def test_claim_checks_state_their_numbers_and_verdicts():
    keys = ["a", "b"]
    curves = {"baseline": {"step": [10, 20, 40], "a": [0.1, 0.2, 0.3], "b": [0.1, 0.1, 0.2], "agg": [0.1, 0.15, 0.25]},
              "miro": {"step": [10, 20, 40], "a": [0.3, 0.4, 0.5], "b": [0.2, 0.3, 0.4], "agg": [0.25, 0.35, 0.45]}}
    conv = claims.convergence(curves, keys, aggregate="agg")
    assert conv["reproduces"] and conv["speedup"]["agg"] == pytest.approx(4.0)
    assert "4.0x sooner" in conv["summary"]
    means = {"baseline": {"a": 0.5, "b": 0.5}, "miro": {"a": 0.7, "b": 0.6}, "specialist": {"a": 0.2, "b": 0.9}}
    spec = claims.specialist(means, keys, "b")
    assert spec["reproduces"] and spec["specialist_loses"] == ["a"]
    bon = {"baseline": {"a": [0.1, 0.2, 0.3]}, "miro": {"a": [0.35, 0.4, 0.5]}}
    tts = claims.sample_scaling(bon, [1, 2, 4], ["a"])
    assert tts["reproduces"] and tts["fewest_samples"] == {"a": 1}
    iso = {"a": {"a": {"means_pct": [0.2, 0.8], "spearman": 0.7}, "b": {"means_pct": [0.5, 0.55], "spearman": 0.1}},
           "b": {"a": {"means_pct": [0.5, 0.5], "spearman": 0.0}, "b": {"means_pct": [0.5, 0.5], "spearman": 0.05}}}
    ctrl = claims.controllability(iso, keys)
    assert ctrl["rising"] == ["a"] and not ctrl["reproduces"]
