"""Triton kernels vs torch references, forward and backward.

Runs where the kernels really run: in the TRITON_INTERPRET=1 child process that
tests/test_kernels_interpreter.py starts from a plain `pytest tests` (CPU tensors, interpreted
kernels), and, on a CUDA machine, in the plain process too (CUDA tensors, compiled kernels).

Tolerance (flash-attention's rule): |triton - fp64 reference| <= 2 * |naive same-dtype torch -
fp64 reference| + atol, where "naive" evaluates the same formula with torch entirely in the input
dtype. Interpreted bf16 gets one bf16 ulp more (eps * |reference|): the interpreter converts fp32
to bf16 by truncation (the GPU rounds to nearest even, and so does torch), so an interpreted bf16
output can sit a whole ulp from the exact value where the naive reference happens to round onto it.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels
from tests.kernel_devices import device, skip_unless_kernels_run  # noqa: F401 (autouse fixture)
from kernels.qk_norm import QKNormFunction
from kernels.rms_norm import RMSNormFunction
from kernels.swiglu import SwiGLUFunction, SwiGLUPackedFunction

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HIDDEN_SIZES = [64, 96, 192, 1000, 1024, 4096, 5120]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
EPS = 1e-6
# Interpreted kernels take CPU tensors; compiled ones need CUDA tensors.
skip_unless_kernels_run()


def test_tensors_take_the_triton_path_here():
    assert kernels.runs_triton(torch.empty(1)), "this process must run the Triton kernels"


def assert_within_rule(actual, exact, naive, dtype, what=""):
    """The tolerance rule above; NaN must come out exactly where the fp64 reference has NaN."""
    actual, exact, naive = actual.double(), exact.double(), naive.double()
    assert actual.shape == exact.shape, what
    nan = exact.isnan()
    assert torch.equal(actual.isnan(), nan), f"{what}: NaN pattern differs"
    err = (actual - exact).abs()[~nan]
    bound = 2 * (naive - exact).abs() + ATOL[dtype]
    if dtype == torch.bfloat16 and actual.device.type == "cpu":  # interpreted: truncating bf16 stores
        bound = bound + torch.finfo(dtype).eps * exact.abs()
    bound = bound[~nan]
    worst = (err - bound).argmax() if err.numel() else None
    assert (err <= bound).all(), f"{what}: error {err[worst]:.3g} exceeds bound {bound[worst]:.3g}"


def test_tolerance_rule_rejects_a_one_percent_error():
    exact = torch.randn(100, dtype=torch.float64)
    naive = exact.to(torch.bfloat16)
    assert_within_rule(naive, exact, naive, torch.bfloat16)
    with pytest.raises(AssertionError, match="exceeds bound"):
        assert_within_rule(exact * 1.01, exact, exact, torch.float32)


def grads(outputs, inputs, douts):
    return torch.autograd.grad(outputs, inputs, douts, allow_unused=True)


def leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).requires_grad_()


def check_against_references(triton_fn, naive_fn, inputs, dtype, douts=None):
    """Run triton_fn on `inputs`, naive_fn in `dtype` and in fp64; compare outputs and grads."""
    outs = triton_fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    douts = douts or [torch.randn_like(o) for o in outs]
    assert all(o.dtype == dtype for o in outs)
    got_grads = grads(outs, inputs, douts)

    results = {}
    for ref_dtype in (dtype, torch.float64):
        ref_inputs = [leaf(t, ref_dtype) for t in inputs]
        ref_outs = naive_fn(*ref_inputs)
        ref_outs = ref_outs if isinstance(ref_outs, tuple) else (ref_outs,)
        results[ref_dtype] = ref_outs, grads(ref_outs, ref_inputs, [d.to(ref_dtype) for d in douts])
    (naive_outs, naive_grads), (exact_outs, exact_grads) = results[dtype], results[torch.float64]
    for i, (o, e, n) in enumerate(zip(outs, exact_outs, naive_outs)):
        assert_within_rule(o, e, n, dtype, f"output {i}")
    for i, (g, e, n) in enumerate(zip(got_grads, exact_grads, naive_grads)):
        assert_within_rule(g, e, n, dtype, f"grad {i}")


# ---- RMSNorm -----------------------------------------------------------------------------------

def naive_rms_norm(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def make_rms_inputs(rows, hidden, dtype):
    x = torch.randn(rows, hidden).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    return leaf(x), leaf(w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
def test_rms_norm_matches_reference(hidden, dtype):
    rows = 37 if hidden <= 1024 else 9  # several tiles and several backward programs
    check_against_references(
        lambda x, w: kernels.rms_norm(x, w, EPS), naive_rms_norm, make_rms_inputs(rows, hidden, dtype), dtype
    )


@pytest.mark.parametrize("rows", [1, 2, 300])
def test_rms_norm_row_counts(rows):
    check_against_references(
        lambda x, w: kernels.rms_norm(x, w, EPS), naive_rms_norm, make_rms_inputs(rows, 192, torch.bfloat16),
        torch.bfloat16,
    )


@pytest.mark.parametrize("layout", ["column_slice", "transposed", "batched_3d"])
def test_rms_norm_non_contiguous(layout):
    hidden = 96
    if layout == "column_slice":  # rows of a wider buffer: a strided view, no copy
        x = torch.randn(20, 3 * hidden, dtype=torch.bfloat16)[:, hidden : 2 * hidden]
    elif layout == "transposed":  # hidden is not the contiguous dim: copied first
        x = torch.randn(hidden, 20, dtype=torch.bfloat16).t()
    else:
        x = torch.randn(4, 6, hidden, dtype=torch.bfloat16).transpose(0, 1)
    w = (1 + 0.1 * torch.randn(hidden)).to(torch.bfloat16)
    douts = [torch.randn(x.shape, dtype=torch.bfloat16).transpose(0, -1).contiguous().transpose(0, -1)]
    check_against_references(
        lambda x, w: kernels.rms_norm(x, w, EPS), naive_rms_norm, [leaf(x), leaf(w)], torch.bfloat16, douts
    )


def test_rms_norm_mixed_dtypes_as_under_autocast():
    x, w = leaf(torch.randn(10, 96, dtype=torch.bfloat16)), leaf(torch.randn(96))
    y = kernels.rms_norm(x, w, EPS)
    dx, dw = grads(y, (x, w), torch.ones_like(y))
    assert (y.dtype, dx.dtype, dw.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    torch.testing.assert_close(y, kernels.rms_norm_reference(x, w, EPS), atol=1e-2, rtol=1e-2)


def test_rms_norm_empty_batch():
    x, w = leaf(torch.randn(0, 4, 128)), leaf(torch.randn(128))
    y = kernels.rms_norm(x, w, EPS)
    dx, dw = grads(y, (x, w), torch.ones_like(y))
    assert y.shape == dx.shape == (0, 4, 128) and torch.equal(dw, torch.zeros(128))


def test_rms_norm_nan_propagates_to_its_row_only():
    x, w = make_rms_inputs(6, 64, torch.float32)
    with torch.no_grad():
        x[2, 5] = float("nan")
    y = kernels.rms_norm(x, w, EPS)
    assert y[2].isnan().all() and not y[[0, 1, 3, 4, 5]].isnan().any()
    dx, dw = grads(y, (x, w), torch.ones_like(y))
    assert dx[2].isnan().all() and not dx[[0, 1, 3, 4, 5]].isnan().any() and dw.isnan().all()


def test_rms_norm_backward_is_bitwise_deterministic():
    x, w = make_rms_inputs(300, 192, torch.bfloat16)
    dy = torch.randn(300, 192, dtype=torch.bfloat16)
    first, second = (grads(kernels.rms_norm(x, w, EPS), (x, w), dy) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_rms_norm_function_apply_matches_op():
    x, w = make_rms_inputs(5, 64, torch.float32)
    assert torch.equal(RMSNormFunction.apply(x, w, EPS), kernels.rms_norm(x, w, EPS))


# ---- QK-norm -----------------------------------------------------------------------------------

def naive_qk_norm(kind):
    def norm(x, w, b):
        if kind == "layer":
            x = x - x.mean(-1, keepdim=True)
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w
        return y if b is None else y + b

    def fn(q, k, qw, kw, qb=None, kb=None):
        return norm(q, qw, qb), norm(k, kw, kb)

    return fn


def packed_qk(layout, B, L, H, D, dtype):
    """q and k in the layouts the model produces."""
    qkv = torch.randn(B, L, 3, H, D).to(dtype)
    q, k = qkv[:, :, 0], qkv[:, :, 1]  # views of the packed projection: strided, no copy
    if layout == "blhd":
        return q.contiguous(), k.contiguous()
    if layout == "bhld":
        return q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
    if layout == "bhld_transposed_view":
        return q.contiguous().transpose(1, 2), k.contiguous().transpose(1, 2)
    if layout == "packed_view":
        return q, k
    if layout == "packed_view_bhld":
        return q.transpose(1, 2), k.transpose(1, 2)
    raise ValueError(layout)


QK_LAYOUTS = ["blhd", "bhld", "bhld_transposed_view", "packed_view", "packed_view_bhld"]


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("layout", QK_LAYOUTS)
def test_qk_norm_matches_reference(layout, head_dim, dtype, kind):
    q, k = packed_qk(layout, 2, 7, 3, head_dim, dtype)
    weights = [(1 + 0.1 * torch.randn(head_dim)).to(dtype) for _ in range(2)]
    biases = [(0.1 * torch.randn(head_dim)).to(dtype) for _ in range(2)] if kind == "layer" else []
    inputs = [leaf(t) for t in (q, k, *weights, *biases)]

    def fused(q, k, qw, kw, qb=None, kb=None):
        return kernels.qk_norm(q, k, qw, kw, EPS, qb, kb, kind=kind)

    check_against_references(fused, naive_qk_norm(kind), inputs, dtype)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_qk_norm_cross_attention_shapes_and_one_bias(kind):
    """k with other leading dims than q (text keys), a bias on q only, and rms with a bias."""
    q = torch.randn(2, 5, 4, 64, dtype=torch.bfloat16)
    k = torch.randn(2, 4, 11, 64, dtype=torch.bfloat16).transpose(1, 2)
    qw, kw, qb = (torch.randn(64, dtype=torch.bfloat16) for _ in range(3))
    inputs = [leaf(t) for t in (q, k, qw, kw, qb)]

    def fused(q, k, qw, kw, qb):
        return kernels.qk_norm(q, k, qw, kw, EPS, qb, None, kind=kind)

    def naive(q, k, qw, kw, qb):
        return naive_qk_norm(kind)(q, k, qw, kw, qb, None)

    check_against_references(fused, naive, inputs, torch.bfloat16)


def test_qk_norm_unused_output_and_empty():
    q, k = leaf(torch.randn(3, 2, 32)), leaf(torch.randn(3, 2, 32))
    qw, kw = leaf(torch.ones(32)), leaf(torch.ones(32))
    q_out, _ = kernels.qk_norm(q, k, qw, kw, EPS)
    dq, dk, dqw, dkw = grads(q_out.sum(), (q, k, qw, kw), None)
    assert torch.equal(dk, torch.zeros_like(k)) and torch.equal(dkw, torch.zeros_like(kw))

    q, k = leaf(torch.randn(0, 4, 32)), leaf(torch.randn(0, 4, 32))
    q_out, k_out = kernels.qk_norm(q, k, qw, kw, EPS, kind="layer")
    assert q_out.shape == k_out.shape == (0, 4, 32)
    dq, dk, dqw, dkw = grads((q_out, k_out), (q, k, qw, kw), (torch.ones_like(q_out), torch.ones_like(k_out)))
    assert dq.shape == (0, 4, 32) and torch.equal(dqw, torch.zeros(32))


def test_qk_norm_nan_and_determinism():
    q, k = packed_qk("packed_view", 2, 40, 4, 32, torch.bfloat16)
    q, k = leaf(q), leaf(k)
    qw, kw, qb, kb = (leaf(torch.randn(32, dtype=torch.bfloat16)) for _ in range(4))
    douts = (torch.randn(q.shape, dtype=torch.bfloat16), torch.randn(k.shape, dtype=torch.bfloat16))
    runs = [
        grads(kernels.qk_norm(q, k, qw, kw, EPS, qb, kb, kind="layer"), (q, k, qw, kw, qb, kb), douts)
        for _ in range(2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*runs))

    nan_q = q.detach().clone()
    nan_q[1, 3, 2, 7] = float("nan")
    q_out, k_out = kernels.qk_norm(nan_q, k, qw, kw, EPS, kind="layer")
    assert q_out[1, 3, 2].isnan().all() and q_out.isnan().sum() == 32 and not k_out.isnan().any()


def test_qk_norm_rejects_unknown_kind():
    q = torch.randn(2, 32)
    with pytest.raises(ValueError, match="kind"):
        kernels.qk_norm(q, q, torch.ones(32), torch.ones(32), EPS, kind="batch")


def test_qk_norm_function_apply_matches_op():
    q, k = torch.randn(3, 4, 32), torch.randn(3, 4, 32)
    qw, kw = torch.randn(32), torch.randn(32)
    for a, b in zip(QKNormFunction.apply(q, k, qw, kw, EPS, None, None, "rms"), kernels.qk_norm(q, k, qw, kw, EPS)):
        assert torch.equal(a, b)


# ---- SwiGLU ------------------------------------------------------------------------------------

def naive_swiglu(gate, up):
    return F.silu(gate) * up


def naive_swiglu_packed(x):
    up, gate = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
def test_swiglu_matches_reference(hidden, dtype):
    rows = 9 if hidden <= 1024 else 3
    x = leaf(torch.randn(rows, 2 * hidden).to(dtype))
    check_against_references(kernels.swiglu_packed, naive_swiglu_packed, [x], dtype)
    gate, up = (leaf(torch.randn(rows, hidden).to(dtype)) for _ in range(2))
    check_against_references(kernels.swiglu, naive_swiglu, [gate, up], dtype)


@pytest.mark.parametrize("rows", [0, 1, 300])
def test_swiglu_row_counts(rows):
    x = leaf(torch.randn(rows, 2 * 96, dtype=torch.bfloat16))
    if rows:
        check_against_references(kernels.swiglu_packed, naive_swiglu_packed, [x], torch.bfloat16)
    else:
        y = kernels.swiglu_packed(x)
        (dx,) = grads(y, (x,), torch.ones_like(y))
        assert y.shape == (0, 96) and dx.shape == (0, 192)


def test_swiglu_non_contiguous():
    wide = torch.randn(4, 6, 3 * 128, dtype=torch.bfloat16)
    x = leaf(wide[..., 64:320].transpose(0, 1))  # packed input as a strided view
    check_against_references(kernels.swiglu_packed, naive_swiglu_packed, [x], torch.bfloat16)
    gate = leaf(torch.randn(7, 5, 96, dtype=torch.bfloat16).transpose(0, 1))
    up = leaf(torch.randn(5, 7, 2 * 96, dtype=torch.bfloat16)[..., ::2])  # strided last dim: copied
    douts = [torch.randn(7, 5, 96, dtype=torch.bfloat16).transpose(0, 1)]
    check_against_references(kernels.swiglu, naive_swiglu, [gate, up], torch.bfloat16, douts)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's exp overflow inside the interpreter
def test_swiglu_nan_and_extremes():
    gate = torch.tensor([[float("nan"), -1e4, 1e4, 0.0, float("inf"), -float("inf")]])
    up = torch.ones_like(gate)
    check_against_references(kernels.swiglu, naive_swiglu, [leaf(gate[:, :4]), leaf(up[:, :4])], torch.float32)
    out = kernels.swiglu(gate, up)
    assert out[0, 0].isnan() and out[0, 4] == float("inf") and out[0, 5].isnan() == F.silu(gate)[0, 5].isnan()


def test_swiglu_functions_apply_match_ops():
    gate, up = torch.randn(3, 64), torch.randn(3, 64)
    assert torch.equal(SwiGLUFunction.apply(gate, up), kernels.swiglu(gate, up))
    x = torch.randn(3, 128)
    assert torch.equal(SwiGLUPackedFunction.apply(x), kernels.swiglu_packed(x))


def test_reference_only_switches_the_dispatch_to_the_references():
    x, w = torch.randn(8, 96), torch.randn(96)
    assert kernels.runs_triton(x)
    with kernels.reference_only():
        assert not kernels.runs_triton(x)
        assert torch.equal(kernels.rms_norm(x, w), kernels.rms_norm_reference(x, w))
    assert kernels.runs_triton(x)
