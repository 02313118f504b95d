"""Runs the Triton kernel tests in Triton's CPU interpreter, from a plain `python -m pytest tests`.

TRITON_INTERPRET must be set before triton is imported, and kernels/ reads it once at import; in
one pytest process other test files may import the model (and with it kernels/ and triton) first.
So each interpreter test file runs in its own child `python -m pytest` with TRITON_INTERPRET=1 in
its environment from the start, and those files skip themselves when collected in a process
without it, unless that process has a CUDA GPU: then they run there as well, on CUDA tensors
through the compiled kernels. Running `TRITON_INTERPRET=1 python -m pytest tests/test_kernels_ops.py`
directly works too; then this launcher skips, as the files are already collected in the interpreter.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
INTERPRETER_TEST_FILES = [
    "test_kernels_ops.py", "test_kernels_compile.py", "test_kernels_textrin.py", "test_kernels_bench.py"
]


@pytest.mark.parametrize("test_file", INTERPRETER_TEST_FILES)
def test_in_triton_interpreter(test_file):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip(f"already interpreting: {test_file} is collected in this process")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / test_file)],
        cwd=TESTS.parent,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(f"{test_file}: {summary}")
    output = f"{proc.stdout[-12000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"{test_file} failed in the interpreter:\n{output}"
    # A child that skipped everything (say, the kernels stopped running under the interpreter)
    # also exits 0: require that tests ran and none was skipped.
    assert " passed" in summary and "skipped" not in summary, f"{test_file}: {summary}\n{output}"
