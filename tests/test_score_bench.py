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
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, BENCH, "--allow-cpu", "--variant", "tiny", "--rewards",
                        "sharpness,image_reward,clip", "--batch-size", "2", "--steps", "1", "--warmup", "1",
                        "--weights-dtype", "fp32", "--decode", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    by = {x["key"]: x for x in doc["rewards"]}
    assert by["image_reward_score"]["image_per_s"] > 0 and by["image_reward_score"]["pair_per_s"] > 0
    assert "error" in by["clip_score"]  # reported, not fatal
    assert doc["all_rewards_images_per_s"] > 0
    assert doc["decode_per_core"]["view_clip224"] > 0
