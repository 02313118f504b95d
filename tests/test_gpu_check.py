"""benchmarks/gpu_check.sh (the one-call GPU check) and benchmarks/bench_sample.py, on a CPU.

The script's GPU path needs a lent GPU; here it must notice there is none, say so and exit 0 with
its summary written, and its list of steps must name files that exist.
"""
import json
import os
import re
import subprocess
import sys
import tarfile

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["wheels", "facts", "cuda_tests", "train_bf16", "bench_train", "kernels_bench", "bench_score",
         "bench_sample", "bench_sample_graphs", "bench_train_compile", "kernels_bench_large"]


def run_script(tmp_path, **env):
    (tmp_path / "tmp").mkdir(exist_ok=True)
    # CUDA_VISIBLE_DEVICES="" hides a GPU too, so the no-GPU path is what runs on any machine.
    env = {**os.environ, "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path / "tmp"), "PYTHON": sys.executable,
           "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_without_a_gpu_it_says_so_writes_its_summary_and_exits_0(tmp_path):
    proc = run_script(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPU here" in proc.stdout and "NO GPU" in proc.stdout

    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["facts.json", "gpu_check.tar.gz", "summary.json", "summary.txt"]
    assert (out / "summary.txt").read_text().startswith("gpu_check: NO GPU: ")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gpu"] is False and summary["reason"] and summary["passed"] is None
    assert [s["name"] for s in summary["steps"]] == ["facts"]  # nothing else ran
    assert summary["steps"][0]["status"] == "PASS"
    facts = json.loads((out / "facts.json").read_text())
    assert facts["cuda_available"] is False and facts["packages"]["torch"]
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        assert {"results/steps.tsv", "results/logs/facts.log", "results/facts/facts.json"} <= set(tar.getnames())
    assert not list((tmp_path / "tmp").iterdir())  # its scratch folder is gone


def test_its_steps_name_files_that_exist_and_flags_that_parse(tmp_path):
    proc = run_script(tmp_path, GPU_CHECK_LIST="1")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert [r[0] for r in rows] == STEPS
    assert all(int(r[1]) > 0 for r in rows)
    assert sum(int(r[1]) for r in rows if r[0] in ("wheels", "facts", "cuda_tests")) < 540
    commands = {name: command for name, _, command in rows}
    for command in commands.values():
        for path in re.findall(r"(?<![\w/.])((?:tests|launchers|benchmarks|preprocessing|configs)/[\w./-]+)", command):
            assert (ROOT / path).exists(), f"{path} (in: {command})"
    assert not (tmp_path / "out").exists()  # a listing runs nothing and writes nothing

    from kernels.bench import parse_args

    for name in ("kernels_bench", "kernels_bench_large"):
        argv = commands[name].split("-m kernels.bench ", 1)[1].split()
        parse_args(argv)  # exits on a flag kernels.bench does not have


def test_bench_sample_needs_a_gpu_and_has_a_cpu_smoke_mode(tmp_path):
    bench = [sys.executable, "benchmarks/bench_sample.py"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(bench, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr
    proc = subprocess.run(bench + ["--config", "configs/tiny_cpu.json", "--device", "cpu", "--batch-sizes", "2",
                                   "--steps", "2", "--repeats", "1", "--variants", "reference", "triton",
                                   "--out-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "sample_cpu.json").read_text())
    assert [(r["variant"], r["batch_size"]) for r in report["results"]] == [("reference", 2), ("triton", 2)]
    assert report["guidance_scale"] > 0  # tiny_cpu samples with CFG: both branches in each forward
    for r in report["results"]:
        assert r["images_per_s"] > 0 and r["forwards_per_image"] == 2 * 2 and 0 < r["mfu"] < 1
    assert "img/s" in proc.stdout and "triton" in proc.stdout
