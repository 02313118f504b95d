import json
import subprocess
import sys

from tests.conftest import ROOT


def test_bench_train_needs_a_gpu_and_has_a_cpu_smoke_mode(tmp_path):
    proc = subprocess.run([sys.executable, "launchers/bench_train.py"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr
    proc = subprocess.run([sys.executable, "launchers/bench_train.py", "--config", "configs/tiny_cpu.json", "--device",
                           "cpu", "--micro-batch", "2", "--text-len", "8", "--steps", "1", "--warmup", "1",
                           "--variants", "reference", "triton", "--out-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "train_step_cpu.json").read_text())
    assert [r["variant"] for r in report["results"]] == ["reference", "triton"]
    assert all(r["images_per_s"] > 0 and 0 < r["mfu"] < 1 for r in report["results"])
    assert (tmp_path / "train_step_cpu.png").exists()
