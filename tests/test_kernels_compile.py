"""The kernels as torch.library ops: opcheck, torch.compile without graph breaks, autocast, FSDP2.

Runs in the TRITON_INTERPRET=1 child of tests/test_kernels_interpreter.py (CPU tensors, so the
compiled graphs call the interpreted kernels) and, on a CUDA machine, in the plain process too.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.library import opcheck

import kernels
from tests.kernel_devices import device, skip_unless_kernels_run  # noqa: F401 (autouse fixture)
from kernels.qk_norm import qk_norm_backward_op, qk_norm_op
from kernels.rms_norm import rms_norm_backward_op, rms_norm_op
from kernels.swiglu import swiglu_backward_op, swiglu_op, swiglu_packed_backward_op, swiglu_packed_op

EPS = 1e-6
skip_unless_kernels_run()


def _requiring_grad(*tensors):
    return tuple(t.requires_grad_() for t in tensors)


def _packed_qk():
    qkv = torch.randn(2, 5, 3, 4, 32)
    return qkv[:, :, 0], qkv[:, :, 1].transpose(1, 2)


def _qk_norm_args(kind):
    q, k = _packed_qk()
    biases = _requiring_grad(*torch.randn(2, 32)) if kind == "layer" else (None, None)
    return (*_requiring_grad(q, k, *torch.randn(2, 32)), EPS, *biases, kind)


def _qk_norm_backward_args():
    q, k = _packed_qk()
    return (torch.randn(q.shape), torch.randn(k.shape), q, k, torch.randn(32), torch.randn(32), EPS, "layer")


# name -> (op, inputs); forward ops get inputs that require grad, so opcheck tests their autograd
OP_CASES = {
    "rms_norm": (rms_norm_op, lambda: (*_requiring_grad(torch.randn(3, 5, 96), torch.randn(96)), EPS)),
    "rms_norm_backward": (
        rms_norm_backward_op, lambda: (torch.randn(3, 5, 96), torch.randn(3, 5, 96), torch.randn(96), EPS)
    ),
    "qk_norm_rms": (qk_norm_op, lambda: _qk_norm_args("rms")),
    "qk_norm_layer": (qk_norm_op, lambda: _qk_norm_args("layer")),
    "qk_norm_backward": (qk_norm_backward_op, _qk_norm_backward_args),
    "swiglu": (swiglu_op, lambda: _requiring_grad(torch.randn(4, 3, 96), torch.randn(4, 3, 96))),
    "swiglu_backward": (swiglu_backward_op, lambda: (torch.randn(4, 96), torch.randn(4, 96), torch.randn(4, 96))),
    "swiglu_packed": (swiglu_packed_op, lambda: _requiring_grad(torch.randn(4, 3, 192))),
    "swiglu_packed_backward": (swiglu_packed_backward_op, lambda: (torch.randn(4, 96), torch.randn(4, 192))),
}


@pytest.mark.parametrize("name", OP_CASES)
def test_opcheck(name):
    """Schema, fake impl vs real (shapes, strides, dtypes), autograd registration, AOT dispatch."""
    op, make_args = OP_CASES[name]
    opcheck(op, make_args())


def test_fake_impls_give_output_shapes_without_running_kernels(device):
    with FakeTensorMode(), torch.device(device):
        x = torch.empty(64, 256, 3, 16, 64, dtype=torch.bfloat16)
        q, k = x[:, :, 0], x[:, :, 1]
        assert rms_norm_op(torch.empty(8, 4096), torch.empty(4096), EPS).shape == (8, 4096)
        assert [t.shape for t in qk_norm_op(q, k, torch.empty(64), torch.empty(64), EPS, None, None, "rms")] == [
            (64, 256, 16, 64)
        ] * 2
        assert swiglu_packed_op(torch.empty(8, 2 * 5120)).shape == (8, 5120)
        assert swiglu_op(torch.empty(8, 96), torch.empty(8, 96, dtype=torch.bfloat16)).dtype == torch.bfloat16


def tiny_block(x, norm_w, q_w, k_w, q_b, k_b):
    """rms_norm -> packed qkv -> qk_norm -> swiglu_packed, as the model chains them."""
    h = kernels.rms_norm(x, norm_w, EPS)
    batch, tokens, width = h.shape
    qkv = torch.cat([h, h.flip(-1), h], -1).view(batch, tokens, 3, 3, width // 3)
    q, k = kernels.qk_norm(qkv[:, :, 0], qkv[:, :, 1], q_w, k_w, EPS, q_b, k_b, kind="layer")
    return kernels.swiglu_packed(torch.cat([q, k], -1)).square().mean()


def _block_inputs():
    torch.manual_seed(0)
    return _requiring_grad(torch.randn(2, 8, 96), torch.randn(96), *torch.randn(4, 32))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(backend):
    """fullgraph=True fails on any graph break; the kernels are opaque ops, so only the torch ops
    around them (which inductor may fuse and reorder) can move the result."""
    inputs = _block_inputs()
    eager = torch.autograd.grad(tiny_block(*inputs), inputs)
    torch._dynamo.reset()
    compiled = torch.compile(tiny_block, backend=backend, fullgraph=True)
    got = torch.autograd.grad(compiled(*inputs), inputs)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_autocast_bf16_matches_reference_path(device, monkeypatch):
    """Under autocast the linear hands bf16 activations to fp32-weight norms: mixed dtypes."""
    inputs = _block_inputs()
    proj = torch.nn.Linear(96, 96)

    def run():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = tiny_block(proj(inputs[0]), *inputs[1:])
        return loss, torch.autograd.grad(loss, (*inputs, proj.weight))

    fused_loss, fused_grads = run()
    monkeypatch.setattr(kernels, "runs_triton", lambda t: False)
    ref_loss, ref_grads = run()
    torch.testing.assert_close(fused_loss, ref_loss, rtol=2e-2, atol=2e-2)
    for a, b in zip(fused_grads, ref_grads):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


class TinyBlock(torch.nn.Module):
    """Parameters that FSDP2 shards and unshards around the kernels' ops."""

    def __init__(self):
        super().__init__()
        self.norm_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(96))
        self.qkv = torch.nn.Linear(96, 3 * 96)
        self.q_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(32))
        self.k_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(32))
        self.ffn = torch.nn.Linear(96, 2 * 64)

    def forward(self, x):
        h = kernels.rms_norm(x, self.norm_weight, EPS)
        q, k, v = self.qkv(h).view(*x.shape[:2], 3, 3, 32).unbind(2)
        q, k = kernels.qk_norm(q, k, self.q_weight, self.k_weight, EPS)
        return kernels.swiglu_packed(self.ffn(h)).square().mean() + (q * k * v).mean()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fsdp2_single_rank_grads_match_unsharded(device, compiled, tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        reference, sharded = TinyBlock(), TinyBlock()
        sharded.load_state_dict(reference.state_dict())
        fully_shard(sharded)
        model = torch.compile(sharded, backend="aot_eager") if compiled else sharded
        x = torch.randn(2, 8, 96)
        reference(x).backward()
        model(x).backward()
        for (name, param), ref_param in zip(sharded.named_parameters(), reference.parameters()):
            torch.testing.assert_close(param.grad.full_tensor(), ref_param.grad, msg=lambda m: f"{name}: {m}")
    finally:
        dist.destroy_process_group()
