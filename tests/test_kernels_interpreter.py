"""Runs the Triton kernel tests in Triton's CPU interpreter, from a plain `python -m pytest tests`.

TRITON_INTERPRET must be set before triton is imported, and kernels/ reads it once at import; in
one pytest process other test files may import the model (and with it kernels/ and triton) first.
So each interpreter test file runs in its own child `python -m pytest` with TRITON_INTERPRET=1 in
its environment from the start, and those files skip themselves when collected in a process
without it, unless that process has a CUDA GPU: then they run there as well, on CUDA tensors
through the compiled kernels. Running `TRITON_INTERPRET=1 python -m pytest tests/test_kernels_ops.py`
directly works too; then this launcher has no cases, as the files are already collected in the
interpreter.

Every case of the child files is a case here (collected by a child `pytest --collect-only` with
TRITON_INTERPRET=1), so a failure names its case; each file runs once in a child, on its first case,
with a JUnit report that the others read their outcome from.
"""
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
INTERPRETER_TEST_FILES = [
    "test_kernels_ops.py", "test_kernels_compile.py", "test_kernels_textrin.py", "test_kernels_bench.py"
]
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
CHILD_ENV = {**os.environ, "TRITON_INTERPRET": "1"}
COLLECTION_FAILED = "collection-failed"

pytestmark = [pytest.mark.kernel_interpreter, pytest.mark.slow]


def _pytest(*args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env=CHILD_ENV, capture_output=True, text=True, timeout=timeout)


def _collect_cases() -> list:
    """The child files' node ids, as collected under the interpreter."""
    proc = _pytest("--collect-only", "-q", *(str(Path("tests") / f) for f in INTERPRETER_TEST_FILES), timeout=600)
    cases = [line.strip() for line in proc.stdout.splitlines() if "::" in line]
    files_seen = {case.split("::")[0] for case in cases}
    if proc.returncode != 0 or len(files_seen) != len(INTERPRETER_TEST_FILES):
        return [COLLECTION_FAILED]
    return cases


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", [] if INTERPRETING else _collect_cases())


def _junit_key(classname: str, name: str) -> str:
    return f"{classname}::{name}"


def _node_key(case: str) -> str:
    """tests/test_x.py::TestA::test_b[p] -> the JUnit report's tests.test_x.TestA::test_b[p]."""
    path, *parts = case.split("::")
    classname = ".".join([path[: -len(".py")].replace("/", "."), *parts[:-1]])
    return _junit_key(classname, parts[-1])


_RUNS: dict = {}


def _run_file(test_file: str) -> tuple:
    """(child process, {case key: (outcome, message)}) of one file run in the interpreter, once."""
    if test_file not in _RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "junit.xml"
            proc = _pytest("-q", f"--junitxml={report}", test_file, timeout=600)
            outcomes = {}
            if report.exists():
                for tc in ET.parse(report).getroot().iter("testcase"):
                    outcome, message = "passed", ""
                    for child in tc:
                        if child.tag in ("failure", "error", "skipped"):
                            outcome = child.tag
                            message = (child.get("message") or "") + "\n" + (child.text or "")
                            break
                    outcomes[_junit_key(tc.get("classname", ""), tc.get("name", ""))] = (outcome, message)
        _RUNS[test_file] = (proc, outcomes)
    return _RUNS[test_file]


def test_in_triton_interpreter(case):
    if case == COLLECTION_FAILED:
        proc = _pytest("--collect-only", "-q", *(str(Path("tests") / f) for f in INTERPRETER_TEST_FILES), timeout=600)
        pytest.fail(f"collecting the kernel tests under TRITON_INTERPRET=1 failed:\n{proc.stdout[-6000:]}\n"
                    f"{proc.stderr[-3000:]}")
    proc, outcomes = _run_file(case.split("::")[0])
    result = outcomes.get(_node_key(case))
    if result is None:
        pytest.fail(f"{case} did not report in the interpreter child (exit {proc.returncode}):\n"
                    f"{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}")
    outcome, message = result
    # A skipped case (say, the kernels stopped running under the interpreter) is a failure here.
    assert outcome == "passed", f"{case}: {outcome} in the interpreter:\n{message[-8000:]}"
