import json
import runpy
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


def test_census_counts_launches_bytes_and_syncs_on_meta(tmp_path, monkeypatch):
    bench = runpy.run_path(str(ROOT / "launchers/bench_train.py"))  # in-process: no second torch import
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--census", "--config", str(ROOT / "configs/tiny_cpu.json"),
                                      "--micro-batch", "2", "--variants", "reference", "triton", "reference+compile",
                                      "--out-dir", str(tmp_path)])
    assert bench["main"]() == 0
    report = json.loads((tmp_path / "train_step_census.json").read_text())
    reference, triton = report["results"]  # compile variants are not counted
    assert (reference["variant"], triton["variant"]) == ("reference", "triton")
    assert report["text_len"] == 16  # the config's data.text_len, not a fixed 256
    for r in (reference, triton):
        assert r["matmul_launches"] > 0 and r["kernel_launches"] > r["matmul_launches"] and r["non_matmul_bytes"] > 0
        assert r["host_syncs"] == sum(r["sync_sites"].values())  # each one named
    # the fused kernels launch fewer ops and move fewer bytes for the same matmuls
    assert triton["matmul_launches"] == reference["matmul_launches"]
    assert triton["kernel_launches"] < reference["kernel_launches"]
    assert triton["non_matmul_bytes"] < reference["non_matmul_bytes"]


def test_flops_are_counted_at_the_text_length_batches_are_padded_to():
    from miro_scale.config import load_config
    from miro_scale.models.flops import training_flops_per_sample
    from miro_scale.train.trainer import text_tokens

    for precomputed in ("true", "false"):  # captions encoded on the fly are padded to data.max_text_len too
        cfg = load_config(str(ROOT / "configs/miro_16m.json"), [f"data.precomputed_text={precomputed}"])
        assert text_tokens(cfg) == cfg.data.max_text_len == 256
    assert round(training_flops_per_sample(cfg, 256) / 1e9) == 750  # benchmarks/README.md's figure
    assert round(training_flops_per_sample(cfg, 77) / 1e9) == 694
