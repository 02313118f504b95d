"""preprocessing/bench_score.py: refuses to report CPU numbers as GPU ones; smoke-runs with --allow-cpu."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = str(ROOT / "preprocessing" / "bench_score.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_bench_exits_nonzero_without_gpu():
    r = subprocess.run([sys.executable, BENCH], capture_output=True, text=True)
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr


def test_bench_smoke_on_tiny_models(tmp_path):
    r = subprocess.run([sys.executable, BENCH, "--allow-cpu", "--variant", "tiny", "--rewards",
                        "sharpness,image_reward,clip", "--batch-size", "2", "--steps", "1", "--warmup", "1",
                        "--precision", "image_reward=bf16", "--decode", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "bench_score.json").read_text())
    by = {x["key"]: x for x in doc["rewards"]}
    ir = by["image_reward_score"]
    assert ir["image_per_s"] > 0 and ir["pair_per_s"] > 0 and ir["precision"] == "bf16"
    assert ir["parameters"] > 0 and ir["weights_gib"] > 0 and ir["host_rss_gib"] > 0
    assert by["clip_score"]["pair_per_s"] > 0 and by["clip_score"]["precision"] == "fp32"
    assert doc["together"]["rewards"] == 3 and doc["together"]["host_rss_minus_weights_gib"] > 0
    assert doc["all_rewards_images_per_s"] > 0
    assert doc["decode_per_core"]["view_clip224"] > 0
    assert "image_reward_score" in r.stdout and "together" in r.stdout
