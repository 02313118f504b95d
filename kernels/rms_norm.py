"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, statistics in fp32.

The torch reference, the fused Triton forward/backward, and the torch.library op with its
autograd formula live here; `kernels.rms_norm` dispatches between them.

Forward: one tile of ROWS x BLOCK_N per program (BLOCK_N = next_power_of_2(N), a whole row; ROWS > 1
only for narrow rows). Backward: a persistent grid; each program walks row tiles, writes dx, and
keeps its own fp32 dW partial, and the partials are summed afterwards. No atomics, so dW has the
same bits every run. rstd is recomputed in the backward rather than saved: x is read there anyway,
so this costs no memory traffic and leaves nothing extra alive between forward and backward.
"""
import torch

from kernels._triton_support import as_rows, reduction_programs, row_tile, tl, triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalise and scale over the last dim in fp32; the output has x's dtype."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr,
    n_rows, n_cols, x_row_stride, y_row_stride, eps,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]  # rows x stride overflows int32 on large or strided inputs

    x = tl.load(x_ptr + rows64 * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + rows64 * y_row_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, dx_ptr, dw_partial_ptr,
    n_rows, n_cols, dy_row_stride, x_row_stride, dx_row_stride, eps,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)

    for tile in range(pid, tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        rows = tile * ROWS + tl.arange(0, ROWS)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows64 * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64 * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)

        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        x_hat = x * rstd[:, None]
        dx_hat = dy * w[None, :]
        # d/dx of x * rstd(x): rstd * (dx_hat - x_hat * mean(dx_hat * x_hat))
        proj = tl.sum(dx_hat * x_hat, axis=1) / n_cols
        dx = (dx_hat - x_hat * proj[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows64 * dx_row_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * x_hat, axis=0)

    tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=col_mask)


def _check_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check_weight(x, weight)
    x_rows = as_rows(x)
    n_rows, n_cols = x_rows.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_n, tile_rows, num_warps = row_tile(n_cols)
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, tile_rows),)](
        x_rows, weight.contiguous(), y,
        n_rows, n_cols, x_rows.stride(0), n_cols, eps,
        BLOCK_N=block_n, ROWS=tile_rows, num_warps=num_warps,
    )
    return y


def _rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float):
    _check_weight(x, weight)
    x_rows, dy_rows = as_rows(x), as_rows(dy)
    n_rows, n_cols = x_rows.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if dx.numel() == 0:
        return dx, torch.zeros_like(weight)
    block_n, tile_rows, num_warps = row_tile(n_cols)
    n_programs = reduction_programs(x.device, triton.cdiv(n_rows, tile_rows), num_warps)
    dw_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(n_programs,)](
        dy_rows, x_rows, weight.contiguous(), dx, dw_partial,
        n_rows, n_cols, dy_rows.stride(0), x_rows.stride(0), n_cols, eps,
        BLOCK_N=block_n, ROWS=tile_rows, num_warps=num_warps,
    )
    return dx, dw_partial.sum(0).to(weight.dtype)


# torch.library ops: opaque to torch.compile (no graph break, fake impls give the shapes) and
# plain tensors in, plain tensors out, so FSDP2's unsharded parameters pass straight through.
@torch.library.custom_op("miro_kernels::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms_norm_forward(x, weight, eps)


@rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("miro_kernels::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_norm_backward(dy, x, weight, eps)


@rms_norm_backward_op.register_fake
def _(dy, x, weight, eps):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


class RMSNormFunction(torch.autograd.Function):
    """The autograd formula of miro_kernels::rms_norm (registered below, so the op differentiates
    under eager, compile and FSDP2); `.apply(x, weight, eps)` is the Liger-style entry point."""

    @staticmethod
    def forward(x, weight, eps):
        return rms_norm_op(x, weight, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, eps = inputs
        ctx.save_for_backward(x, weight)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx, dweight = rms_norm_backward_op(dy, x, weight, ctx.eps)
        return dx, dweight, None


rms_norm_op.register_autograd(RMSNormFunction.backward, setup_context=RMSNormFunction.setup_context)
