"""A tiny TextRIN, forward and backward, through the Triton kernels vs through the references.

Runs in the TRITON_INTERPRET=1 child of tests/test_kernels_interpreter.py (CPU tensors,
interpreted kernels) and, on a CUDA machine, in the plain process too (compiled kernels). Patching
kernels.runs_triton to False switches the same process back to the references, so both runs share
one model, one input and one set of weights.
"""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels._triton_support import INTERPRET

DEVICES = ["cpu"] if INTERPRET else ["cuda"] if torch.cuda.is_available() else []
if not DEVICES:
    pytest.skip("runs in the TRITON_INTERPRET=1 child of test_kernels_interpreter.py, or on a GPU",
                allow_module_level=True)
textrin = pytest.importorskip("miro_scale.models.textrin")
from miro_scale.config import ModelConfig  # noqa: E402


class CountKernelOps(TorchDispatchMode):
    """Counts the miro_kernels:: ops that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, name = func.name().split("::")
        if namespace == "miro_kernels":
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def tiny_config(qk_norm):
    # Head dims 24 and 48 and widths 48/96: none a power of two, so every tile is masked.
    return ModelConfig(
        latent_channels=4, latent_size=8, patch_size=2, data_dim=48, num_latents=8, latents_dim=96,
        num_blocks=2, num_processing_layers=1, read_write_heads=2, compute_heads=4, text_dim=16,
        num_text_registers=2, cond_blocks=1, cond_heads=2,
        reward_keys=["clip_score", "aesthetic_score"], qk_norm=qk_norm,
    )


def forward_backward(net, inputs):
    v, latents = net(*inputs)
    loss = v.square().mean() + latents.square().mean()
    params = [p for p in net.parameters() if p.requires_grad]
    return (v, latents), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qk_norm", ["layer", "rms"])
def test_tiny_textrin_triton_path_matches_reference_path(qk_norm, device, monkeypatch):
    cfg = tiny_config(qk_norm)
    torch.manual_seed(0)
    net = textrin.TextRIN(cfg).to(device)
    g = torch.Generator().manual_seed(1)
    batch, text_len = 2, 5
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[0, 3:] = False
    inputs = tuple(t.to(device) for t in (
        torch.randn(batch, cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=g),
        torch.rand(batch, generator=g),
        torch.randn(batch, text_len, cfg.text_dim, generator=g),
        mask,
        torch.rand(batch, len(cfg.reward_keys), generator=g),
        torch.randn(batch, cfg.num_latents, cfg.latents_dim, generator=g),
    ))

    with CountKernelOps() as counter:
        triton_outs, triton_grads = forward_backward(net, inputs)
    for op in ("rms_norm", "rms_norm_backward", "qk_norm", "qk_norm_backward",
               "swiglu_packed", "swiglu_packed_backward"):
        assert counter.counts[op] > 0, f"{op} never ran: {dict(counter.counts)}"

    monkeypatch.setattr(kernels, "runs_triton", lambda t: False)
    with CountKernelOps() as counter:
        ref_outs, ref_grads = forward_backward(net, inputs)
    assert not counter.counts

    for got, want in zip(triton_outs, ref_outs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    for name, got, want in zip(names, triton_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
