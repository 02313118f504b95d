"""Dispatch of kernels/ outside the interpreter: which path runs, the triton-less fallback, the
no-GPU benchmark exit, and that the package never looks like Hugging Face's `kernels`.

Each check that depends on environment variables or on triton's absence runs in a fresh
interpreter, so it holds whatever this pytest process imported before.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code, **env_overrides):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_overrides)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_package_defines_no_version():
    import kernels

    assert not hasattr(kernels, "__version__")


def test_cpu_tensors_run_the_reference_without_the_interpreter():
    proc = run_python(
        """
        import torch, kernels
        assert not kernels.runs_triton(torch.empty(1))
        x, w = torch.randn(4, 96, dtype=torch.bfloat16), torch.randn(96)
        assert torch.equal(kernels.rms_norm(x, w, 1e-6), kernels.rms_norm_reference(x, w, 1e-6))
        g = torch.randn(3, 2 * 64)
        assert torch.equal(kernels.swiglu_packed(g), kernels.swiglu_packed_reference(g))
        print("ok")
        """
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_interpreter_flag_is_read_at_import():
    proc = run_python(
        """
        import torch, kernels
        assert kernels.runs_triton(torch.empty(1))
        print("ok")
        """,
        TRITON_INTERPRET="1",
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_without_triton_everything_runs_the_reference():
    proc = run_python(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch, kernels
        from kernels import _triton_support
        assert not _triton_support.HAS_TRITON and not kernels.runs_triton(torch.empty(1))
        q = torch.randn(2, 3, 32)
        out = kernels.qk_norm(q, q, torch.ones(32), torch.ones(32), 1e-6, kind="layer")
        ref = kernels.qk_norm_reference(q, q, torch.ones(32), torch.ones(32), 1e-6, kind="layer")
        assert torch.equal(out[0], ref[0])
        print("ok")
        """,
        TRITON_INTERPRET="1",
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_bench_says_it_needs_a_gpu_and_fails_on_cpu():
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.bench"],
        cwd=ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "no CUDA GPU" in proc.stderr
