"""Compile every kernel for an H100 (sm_90) with Triton's own ptxas, no GPU needed.

The interpreter checks what the kernels compute but not that they compile: it accepts code the
GPU compiler rejects, and says nothing of registers or vector widths. Here each kernel is compiled
at the launch configurations of the benchmark shapes (the same heuristics the launchers use), and
the cubin must use no local memory (no register spills) and bf16 rows must load 128 bits at a time.
Runs in the plain pytest process: the kernels must be compiled JIT functions, not interpreted.
"""
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs compiled Triton kernels; this process interprets them", allow_module_level=True)
triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels._triton_support import row_tile  # noqa: E402
from kernels.qk_norm import _qk_norm_bwd_kernel, _qk_norm_fwd_kernel  # noqa: E402
from kernels.rms_norm import _rms_norm_bwd_kernel, _rms_norm_fwd_kernel  # noqa: E402
from kernels.swiglu import _launch_shape, _swiglu_bwd_kernel, _swiglu_fwd_kernel  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
H100 = GPUTarget("cuda", 90, 32)


def compile_for_h100(kernel, args: dict, num_warps: int):
    """Compile as a launch would specialise it: pointers (given as "*bf16" etc.) and ints that are
    multiples of 16 carry the 16-divisibility hint; UPPER_CASE names are constexprs."""
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(kernel.arg_names):
        value = args[name]
        if name.isupper():
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, str):
            signature[name], attrs[(index,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, int):
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=H100, options={"num_warps": num_warps})


def resource_usage(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        out = subprocess.run([str(CUOBJDUMP), "-res-usage", cubin.name], capture_output=True, text=True, check=True)
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|LOCAL):(\d+)", out.stdout)}


def assert_fast_code(compiled, vector_loads: bool):
    usage = resource_usage(compiled)
    assert usage["LOCAL"] == 0 and usage["STACK"] == 0, f"register spills: {usage}"
    if vector_loads:
        assert re.search(r"ld\.global[.\w]*\.v4\.b32", compiled.asm["ptx"]), "no 128-bit loads"


pytestmark = pytest.mark.skipif(not CUOBJDUMP.exists(), reason="triton's CUDA tools are not installed")


@pytest.mark.parametrize("hidden", [512, 1024, 4096, 5120, 8192])
def test_rms_norm_compiles_for_h100(hidden):
    block_n, tile_rows, num_warps = row_tile(hidden)
    common = dict(n_rows=16384, n_cols=hidden, eps=1e-6, BLOCK_N=block_n, ROWS=tile_rows)
    fwd = compile_for_h100(_rms_norm_fwd_kernel, dict(
        x_ptr="*bf16", w_ptr="*fp32", y_ptr="*bf16", x_row_stride=hidden, y_row_stride=hidden, **common), num_warps)
    bwd = compile_for_h100(_rms_norm_bwd_kernel, dict(
        dy_ptr="*bf16", x_ptr="*bf16", w_ptr="*fp32", dx_ptr="*bf16", dw_partial_ptr="*fp32",
        dy_row_stride=hidden, x_row_stride=hidden, dx_row_stride=hidden, **common), num_warps)
    for compiled in (fwd, bwd):
        assert_fast_code(compiled, vector_loads=True)
    # bf16 outputs round to nearest even on the GPU (the interpreter truncates; see test_kernels_ops)
    assert "cvt.rn.bf16x2.f32" in fwd.asm["ptx"]


@pytest.mark.parametrize("heads,head_dim", [(32, 32), (16, 64)])
def test_qk_norm_compiles_for_h100(heads, head_dim):
    """q and k as views of a packed [64, 256, 3, H, D] projection, LayerNorm with bias."""
    block_n, tile_rows, num_warps = row_tile(head_dim)
    rows, width = 64 * 256 * heads, heads * head_dim

    def strided(prefix):  # sizes (tokens, heads) and strides of the packed view
        return {f"{prefix}_rows": rows, f"{prefix}_size1": 64 * 256, f"{prefix}_size2": heads,
                f"{prefix}_stride0": 0, f"{prefix}_stride1": 3 * width, f"{prefix}_stride2": head_dim}

    def fwd_args(p):
        pointers = {f"{p}_ptr": "*bf16", f"{p}_w_ptr": "*bf16", f"{p}_b_ptr": "*bf16", f"{p}_out_ptr": "*bf16"}
        return {**pointers, **strided(p)}

    meta = dict(n_cols=head_dim, eps=1e-6, IS_LAYER=True, BLOCK_N=block_n, ROWS=tile_rows)
    fwd = compile_for_h100(_qk_norm_fwd_kernel, dict(
        **fwd_args("q"), **fwd_args("k"), Q_HAS_BIAS=True, K_HAS_BIAS=True, **meta), num_warps)

    def bwd_args(p):
        grad_strides = {f"d{p}_out_stride0": 0, f"d{p}_out_stride1": width, f"d{p}_out_stride2": head_dim}
        return {f"d{p}_out_ptr": "*bf16", f"{p}_ptr": "*bf16", f"{p}_w_ptr": "*bf16", f"d{p}_ptr": "*bf16",
                **strided(p), **grad_strides}

    bwd = compile_for_h100(_qk_norm_bwd_kernel, dict(
        **bwd_args("q"), **bwd_args("k"), partial_ptr="*fp32", q_programs=528, **meta), num_warps)
    for compiled in (fwd, bwd):
        assert_fast_code(compiled, vector_loads=True)


@pytest.mark.parametrize("hidden", [1536, 2816, 8192])
def test_swiglu_packed_compiles_for_h100(hidden):
    """The packed form: gate and up are the halves of one [rows, 2F] tensor (row stride 2F)."""
    _, meta = _launch_shape(16384, hidden)
    num_warps = meta.pop("num_warps")
    strides = dict(n_rows=16384, n_cols=hidden, gate_row_stride=2 * hidden, up_row_stride=2 * hidden)
    fwd = compile_for_h100(_swiglu_fwd_kernel, dict(
        gate_ptr="*bf16", up_ptr="*bf16", out_ptr="*bf16", out_row_stride=hidden, **strides, **meta), num_warps)
    bwd = compile_for_h100(_swiglu_bwd_kernel, dict(
        dout_ptr="*bf16", gate_ptr="*bf16", up_ptr="*bf16", dgate_ptr="*bf16", dup_ptr="*bf16",
        dout_row_stride=hidden, dgate_row_stride=2 * hidden, dup_row_stride=2 * hidden, **strides, **meta), num_warps)
    for compiled in (fwd, bwd):
        assert_fast_code(compiled, vector_loads=True)
