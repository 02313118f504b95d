"""Per-reward scoring precision: the policy, the bin-change measure, and bench_precision.py."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from miro_scale.rewards import precision as prec
from miro_scale.rewards import units

ROOT = Path(__file__).resolve().parents[1]


def test_resolve_auto_explicit_and_per_key():
    keys = ["aesthetic", "vqa_score"]
    policy = {"aesthetic_score": "fp16", "vqa_score": "bf16"}
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert prec.resolve("auto", keys, cpu, policy) == {"aesthetic_score": "fp32", "vqa_score": "fp32"}
    assert prec.resolve("auto", keys, cuda, policy) == {"aesthetic_score": "fp16", "vqa_score": "bf16"}
    assert prec.resolve("auto", keys, cuda, {}) == {"aesthetic_score": "fp32", "vqa_score": "fp32"}
    assert prec.resolve("bf16", keys, cpu, policy) == {"aesthetic_score": "bf16", "vqa_score": "bf16"}
    assert prec.resolve("vqa=fp16", keys, cuda, policy) == {"aesthetic_score": "fp16", "vqa_score": "fp16"}
    with pytest.raises(ValueError, match="key=precision"):
        prec.resolve("vqa=fp8", keys, cpu, policy)
    with pytest.raises(ValueError, match="not one of the rewards being scored"):
        prec.resolve("hpsv2=bf16", keys, cpu, policy)


def test_project_policy_is_valid_and_names_every_model_reward():
    pol = prec.load_policy()
    assert set(pol) == {"aesthetic_score", "hpsv2_score", "pick_a_score_score", "sciscore_score",
                        "image_reward_score", "clip_score", "vqa_score"}


def test_policy_file_errors_name_the_field(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"rewards": {"aesthetic": {"precision": "int8"}}}))
    with pytest.raises(ValueError, match=r"rewards.aesthetic.precision"):
        prec.load_policy(bad)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        prec.load_policy(tmp_path / "nope.json")


def test_bin_changes_counts_moves_relative_to_fp32_bins():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=6400)
    same = prec.bin_changes(ref, ref.copy())
    assert same["moved_over_one_bin"] == 0 and same["moved_any_bin"] == 0 and same["max_bin_shift"] == 0
    # a shift of ~3 bin widths at the centre (bins are ~0.04 std wide there) moves most samples > 1 bin
    far = prec.bin_changes(ref, ref + 0.12 * ref.std())
    assert far["moved_over_one_bin"] > 0.5 and far["max_bin_shift"] >= 2
    # rounding to bf16's 8 significant bits moves few samples, and never by more than one bin
    bf = torch.tensor(ref).to(torch.bfloat16).double().numpy()
    small = prec.bin_changes(ref, bf)
    assert 0 < small["moved_any_bin"] < 0.2 and small["moved_over_one_bin"] < 0.005
    lost = ref.copy()
    lost[:64] = np.nan
    assert prec.bin_changes(ref, lost)["non_finite"] == 64
    assert prec.bin_changes(ref, lost)["moved_over_one_bin"] == pytest.approx(0.01)
    assert prec.choose({"bf16": far, "fp16": small}) == "fp16"
    assert prec.choose({"bf16": small, "fp16": small}) == "bf16"
    assert prec.choose({"bf16": far, "fp16": far}) == "fp32"


def test_units_release_and_paper():
    assert units.from_raw("aesthetic_score", 6.5, "release") == pytest.approx(0.65)
    assert units.from_raw("image_reward_score@long", 1.0, "release") == pytest.approx(0.75)
    assert units.from_raw("clip_score", 31.0, "release") == pytest.approx(0.31)
    assert units.from_raw("hpsv2_score", 0.28, "release") == pytest.approx(0.28)
    assert units.from_raw("pick_a_score_score", 22.1, "paper") == pytest.approx(0.221)
    assert units.from_raw("aesthetic_score", 6.5, "paper") == pytest.approx(6.5)
    assert units.to_raw("image_reward_score", units.from_raw("image_reward_score", -1.3, "release"),
                        "release") == pytest.approx(-1.3)
    with pytest.raises(ValueError, match="scale"):
        units.from_raw("aesthetic_score", 1.0, "percent")


def test_bench_precision_runs_and_refuses_policy_from_random_weights(tmp_path):
    bench = str(ROOT / "preprocessing" / "bench_precision.py")
    r = subprocess.run([sys.executable, bench, "--variant", "tiny", "--rewards", "hpsv2,sharpness",
                        "--num-samples", "24", "--batch-size", "8", "--device", "cpu", "--as-released",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "bench_precision.json").read_text())
    h = doc["rewards"]["hpsv2_score"]
    assert h["samples"] == 24 and set(h["worst"]) == {"bf16", "fp16"} and h["precision"] in prec.DTYPES
    assert doc["rewards"]["sharpness_score"]["worst"]["bf16"]["moved_any_bin"] == 0  # no model: no change
    assert "hpsv2_score" in r.stdout and "choice" in r.stdout
    r = subprocess.run([sys.executable, bench, "--variant", "tiny", "--write-policy", str(tmp_path / "p.json")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "pretrained" in r.stderr


def test_merge_policy_keeps_other_rewards(tmp_path):
    sys.path.insert(0, str(ROOT / "preprocessing"))
    import bench_precision

    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"rewards": {"vqa_score": {"precision": "bf16", "measured": None}}}))
    worst = {"bf16": {"moved_over_one_bin": 0.02}, "fp16": {"moved_over_one_bin": 0.001}}
    bench_precision.merge_policy(path, {"aesthetic_score": {"precision": "fp16", "samples": 10, "worst": worst}},
                                 {"date": "d", "device": "H100", "data": "x"})
    assert prec.load_policy(path) == {"vqa_score": "bf16", "aesthetic_score": "fp16"}


def test_evaluation_report_in_paper_units():
    raw = {"summary": {"overall": {"pick_a_score_score": {"mean": 22.0, "std": 1.0, "count": 2},
                                   "aesthetic_score": {"mean": 6.0, "std": 0.5, "count": 2}},
                       "by_category": {"Animals": {"pick_a_score_score": {"mean": 21.0, "std": 0.0, "count": 1}}}},
           "rows": [{"index": 0, "scores": {"pick_a_score_score": 21.0, "aesthetic_score": 5.5}}]}
    paper = units.convert_evaluation(raw, "paper")
    assert paper["summary"]["overall"]["pick_a_score_score"] == {"mean": pytest.approx(0.22),
                                                                 "std": pytest.approx(0.01), "count": 2}
    assert paper["summary"]["overall"]["aesthetic_score"]["mean"] == 6.0
    assert paper["summary"]["by_category"]["Animals"]["pick_a_score_score"]["mean"] == pytest.approx(0.21)
    assert paper["rows"][0]["scores"]["pick_a_score_score"] == pytest.approx(0.21) and paper["scale"] == "paper"
    assert raw["rows"][0]["scores"]["pick_a_score_score"] == 21.0  # the input is left alone
