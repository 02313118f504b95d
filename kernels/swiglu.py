"""SwiGLU: silu(gate) * up, and the packed form over one projection output [..., 2F].

Packed layout follows the released TextRIN (`linear_packed` then chunk(2)): the first half is the
value ("up"), the second half the gate, so swiglu_packed(x) = x[..., :F] * silu(x[..., F:]).

Both forms share one elementwise kernel over [rows, F] tiles with a row stride per operand: the
packed form passes the two halves of x as views (row stride 2F) instead of splitting it, and its
backward writes d_up and d_gate straight into the halves of one [..., 2F] gradient, so the packed
op reads x once and writes one tensor each way. The backward recomputes silu from gate instead of
saving it.
"""
import torch
import torch.nn.functional as F

from kernels._triton_support import as_rows, num_warps_for, tl, triton

# Elementwise tiles: up to 1024 columns wide and ~4096 elements, 8-16 elements per thread.
_MAX_BLOCK_N = 1024
_TILE_ELEMENTS = 4096


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(up.dtype)


def swiglu_packed_reference(x: torch.Tensor) -> torch.Tensor:
    up, gate = x.chunk(2, dim=-1)
    return swiglu_reference(gate, up)


@triton.jit
def _tile(n_rows, n_cols, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return rows.to(tl.int64)[:, None], cols[None, :], mask


@triton.jit
def _swiglu_fwd_kernel(
    gate_ptr, up_ptr, out_ptr,
    n_rows, n_cols, gate_row_stride, up_row_stride, out_row_stride,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    rows, cols, mask = _tile(n_rows, n_cols, BLOCK_N, ROWS)
    gate = tl.load(gate_ptr + rows * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + rows * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + rows * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr,
    n_rows, n_cols, dout_row_stride, gate_row_stride, up_row_stride, dgate_row_stride, dup_row_stride,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    rows, cols, mask = _tile(n_rows, n_cols, BLOCK_N, ROWS)
    dout = tl.load(dout_ptr + rows * dout_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + rows * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + rows * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    # silu'(g) = sig * (1 + g * (1 - sig))
    dgate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    dup = dout * silu
    tl.store(dgate_ptr + rows * dgate_row_stride + cols, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + rows * dup_row_stride + cols, dup.to(dup_ptr.dtype.element_ty), mask=mask)


def _launch_shape(n_rows: int, n_cols: int):
    block_n = min(triton.next_power_of_2(n_cols), _MAX_BLOCK_N)
    tile_rows = max(1, _TILE_ELEMENTS // block_n)
    grid = (triton.cdiv(n_rows, tile_rows), triton.cdiv(n_cols, block_n))
    return grid, dict(BLOCK_N=block_n, ROWS=tile_rows, num_warps=num_warps_for(block_n * tile_rows))


def _swiglu_rows(gate_rows, up_rows, out_rows):
    """out = silu(gate) * up over [rows, F] operands, each with unit column stride."""
    n_rows, n_cols = out_rows.shape
    if out_rows.numel() == 0:
        return
    grid, meta = _launch_shape(n_rows, n_cols)
    _swiglu_fwd_kernel[grid](
        gate_rows, up_rows, out_rows,
        n_rows, n_cols, gate_rows.stride(0), up_rows.stride(0), out_rows.stride(0), **meta,
    )


def _swiglu_backward_rows(dout_rows, gate_rows, up_rows, dgate_rows, dup_rows):
    n_rows, n_cols = dout_rows.shape
    if dout_rows.numel() == 0:
        return
    grid, meta = _launch_shape(n_rows, n_cols)
    _swiglu_bwd_kernel[grid](
        dout_rows, gate_rows, up_rows, dgate_rows, dup_rows,
        n_rows, n_cols, dout_rows.stride(0), gate_rows.stride(0), up_rows.stride(0),
        dgate_rows.stride(0), dup_rows.stride(0), **meta,
    )


def _check_pair(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"swiglu needs gate and up of one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")


def _check_packed(x: torch.Tensor) -> None:
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"swiglu_packed needs an even last dim [..., 2F], got {tuple(x.shape)}")


@torch.library.custom_op("miro_kernels::swiglu", mutates_args=())
def swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check_pair(gate, up)
    out = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    _swiglu_rows(as_rows(gate), as_rows(up), out.view(-1, out.shape[-1]))
    return out


@swiglu_op.register_fake
def _(gate, up):
    return up.new_empty(up.shape)


@torch.library.custom_op("miro_kernels::swiglu_backward", mutates_args=())
def swiglu_backward_op(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    n_cols = up.shape[-1]
    _swiglu_backward_rows(
        as_rows(dout), as_rows(gate), as_rows(up), dgate.view(-1, n_cols), dup.view(-1, n_cols)
    )
    return dgate, dup


@swiglu_backward_op.register_fake
def _(dout, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


@torch.library.custom_op("miro_kernels::swiglu_packed", mutates_args=())
def swiglu_packed_op(x: torch.Tensor) -> torch.Tensor:
    _check_packed(x)
    half = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], half), dtype=x.dtype, device=x.device)
    x_rows = as_rows(x)
    _swiglu_rows(x_rows[:, half:], x_rows[:, :half], out.view(-1, half))
    return out


@swiglu_packed_op.register_fake
def _(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("miro_kernels::swiglu_packed_backward", mutates_args=())
def swiglu_packed_backward_op(dout: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x_rows, dx_rows = as_rows(x), dx.view(-1, 2 * half)
    _swiglu_backward_rows(
        as_rows(dout), x_rows[:, half:], x_rows[:, :half], dx_rows[:, half:], dx_rows[:, :half]
    )
    return dx


@swiglu_packed_backward_op.register_fake
def _(dout, x):
    return x.new_empty(x.shape)


class SwiGLUFunction(torch.autograd.Function):
    """The autograd formula of miro_kernels::swiglu (registered below); `.apply(gate, up)` is the
    Liger-style entry point."""

    @staticmethod
    def forward(gate, up):
        return swiglu_op(gate, up)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, dout):
        return swiglu_backward_op(dout, *ctx.saved_tensors)


class SwiGLUPackedFunction(torch.autograd.Function):
    """The autograd formula of miro_kernels::swiglu_packed (registered below)."""

    @staticmethod
    def forward(x):
        return swiglu_packed_op(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, dout):
        (x,) = ctx.saved_tensors
        return swiglu_packed_backward_op(dout, x)


swiglu_op.register_autograd(SwiGLUFunction.backward, setup_context=SwiGLUFunction.setup_context)
swiglu_packed_op.register_autograd(SwiGLUPackedFunction.backward, setup_context=SwiGLUPackedFunction.setup_context)
