"""Smoke run of kernels.bench's measuring and reporting on CPU, in the Triton interpreter.

The real benchmark needs a GPU (tests/test_kernels_dispatch.py checks that it refuses to run
without one); this drives the same code with the issue's shapes scaled down and a wall-clock timer,
so the table, JSON and plot are exercised without one, and every baseline that can run on a CPU
must produce timings (torch.compile's backward included), not recorded errors. Runs in the
TRITON_INTERPRET=1 child of tests/test_kernels_interpreter.py.
"""
import json
import os
import time

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs in the TRITON_INTERPRET=1 child of test_kernels_interpreter.py", allow_module_level=True)

from kernels import bench


def single_shot_ms(fn):
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def test_bench_reports_every_case_on_scaled_down_shapes(tmp_path, capsys):
    args = bench.parse_args(["--suite", "textrin", "large", "--baselines", "eager", "compile", "--scale", "4096",
                             "--out-dir", str(tmp_path)])
    report = bench.run(args, "cpu", single_shot_ms, "cpu (interpreter smoke run)")

    (json_path,) = tmp_path.glob("kernels_bench_*.json")
    (png_path,) = tmp_path.glob("kernels_bench_*.png")
    assert json.loads(json_path.read_text())["results"] == json.loads(json.dumps(report["results"]))
    assert png_path.stat().st_size > 0
    assert {"device", "torch", "triton", "date", "command", "targets"} <= set(report)

    ops = {(row["op"], row["mode"]) for row in report["results"]}
    assert ops == {(op, mode) for op in ("rms_norm", "qk_norm", "swiglu", "swiglu_packed") for mode in bench.MODES}
    for row in report["results"]:
        assert all(isinstance(row["ms"][impl], float) for impl in ("triton", "eager", "compile")), row
        assert row["pct_copy"]["triton"] > 0 and row["speedup"]["eager"] > 0
    assert "x eager" in capsys.readouterr().out
