"""QK-norm: normalise queries and keys over the head dim, per head, with per-head-dim weights.

`kind` is "rms" (RMSNorm) or "layer" (LayerNorm with bias; the released TextRIN checkpoints use
nn.LayerNorm here). The fused kernel normalises q and k in ONE launch: programs [0, q_tiles) take
q rows, the rest take k rows.

Layouts: any q, k whose last dim is the head dim D and is contiguous (stride 1); the leading dims
may be strided (see kernels._triton_support.strided_rows), so these run without a copy:
  - [B, L, H, D] contiguous,
  - [B, H, L, D], contiguous or as a transpose of [B, L, H, D],
  - q and k as views of the packed projection output, qkv.view(B, L, 3, H, D)[:, :, 0] / [:, :, 1]
    (non-contiguous), optionally transposed to [B, H, L, D].
q and k may have different leading shapes (e.g. cross-attention keys) but share D. Outputs are
contiguous in the input's shape. The backward recomputes mean/rstd from the saved inputs and
reduces dW/dB from per-program partial sums (no atomics, bit-reproducible).
"""
from typing import Optional, Tuple

import torch

from kernels._triton_support import reduction_programs, row_tile, strided_rows, tl, triton


def _norm_reference(x, weight, bias, eps, kind):
    xf = x.float()
    if kind == "layer":
        xf = xf - xf.mean(-1, keepdim=True)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def qk_norm_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float = 1e-6,
    q_bias: Optional[torch.Tensor] = None,
    k_bias: Optional[torch.Tensor] = None,
    kind: str = "rms",
) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_kind(kind)
    return _norm_reference(q, q_weight, q_bias, eps, kind), _norm_reference(k, k_weight, k_bias, eps, kind)


def _check_kind(kind: str) -> None:
    if kind not in ("rms", "layer"):
        raise ValueError(f"qk_norm kind must be 'rms' or 'layer', got {kind!r}")


@triton.jit
def _row_offsets(rows, size1, size2, stride0, stride1, stride2):
    rows = rows.to(tl.int64)
    outer = rows // size2
    return (outer // size1) * stride0 + (outer % size1) * stride1 + (rows % size2) * stride2


@triton.jit
def _centred_and_rstd(x, mask, n_cols, eps, IS_LAYER: tl.constexpr):
    if IS_LAYER:
        mean = tl.sum(x, axis=1) / n_cols
        x = tl.where(mask, x - mean[:, None], 0.0)  # padded columns must not count as -mean
    return x, tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)


@triton.jit
def _norm_fwd_tile(
    x_ptr, w_ptr, b_ptr, y_ptr, tile,
    n_rows, n_cols, size1, size2, stride0, stride1, stride2, eps,
    IS_LAYER: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    rows = tile * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    x_offsets = _row_offsets(rows, size1, size2, stride0, stride1, stride2)[:, None] + cols[None, :]
    x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    x, rstd = _centred_and_rstd(x, mask, n_cols, eps, IS_LAYER)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y_offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_fwd_kernel(
    q_ptr, q_w_ptr, q_b_ptr, q_out_ptr, q_rows, q_size1, q_size2, q_stride0, q_stride1, q_stride2,
    k_ptr, k_w_ptr, k_b_ptr, k_out_ptr, k_rows, k_size1, k_size2, k_stride0, k_stride1, k_stride2,
    n_cols, eps,
    IS_LAYER: tl.constexpr, Q_HAS_BIAS: tl.constexpr, K_HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    q_tiles = tl.cdiv(q_rows, ROWS)
    if pid < q_tiles:
        _norm_fwd_tile(q_ptr, q_w_ptr, q_b_ptr, q_out_ptr, pid,
                       q_rows, n_cols, q_size1, q_size2, q_stride0, q_stride1, q_stride2, eps,
                       IS_LAYER, Q_HAS_BIAS, BLOCK_N, ROWS)
    else:
        _norm_fwd_tile(k_ptr, k_w_ptr, k_b_ptr, k_out_ptr, pid - q_tiles,
                       k_rows, n_cols, k_size1, k_size2, k_stride0, k_stride1, k_stride2, eps,
                       IS_LAYER, K_HAS_BIAS, BLOCK_N, ROWS)


@triton.jit
def _norm_bwd_tiles(
    dy_ptr, x_ptr, w_ptr, dx_ptr, partial_ptr, program, n_programs,
    n_rows, n_cols, size1, size2, x_stride0, x_stride1, x_stride2, dy_stride0, dy_stride1, dy_stride2,
    eps, IS_LAYER: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    """Program `program` of `n_programs` walks its row tiles, writes dx, and stores its (dW, dB)
    partial sums as two rows of partial_ptr."""
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)

    for tile in range(program, tl.cdiv(n_rows, ROWS), n_programs):
        rows = tile * ROWS + tl.arange(0, ROWS)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        x_offsets = _row_offsets(rows, size1, size2, x_stride0, x_stride1, x_stride2)[:, None] + cols[None, :]
        dy_offsets = _row_offsets(rows, size1, size2, dy_stride0, dy_stride1, dy_stride2)[:, None] + cols[None, :]
        x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(tl.float32)

        x, rstd = _centred_and_rstd(x, mask, n_cols, eps, IS_LAYER)
        x_hat = x * rstd[:, None]
        dx_hat = dy * w[None, :]
        proj = tl.sum(dx_hat * x_hat, axis=1) / n_cols
        if IS_LAYER:  # the mean subtraction projects out the constant direction as well
            dx = (dx_hat - tl.sum(dx_hat, axis=1)[:, None] / n_cols - x_hat * proj[:, None]) * rstd[:, None]
        else:
            dx = (dx_hat - x_hat * proj[:, None]) * rstd[:, None]
        dx_offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * x_hat, axis=0)
        db_acc += tl.sum(dy, axis=0)

    tl.store(partial_ptr + (2 * program) * n_cols + cols, dw_acc, mask=col_mask)
    tl.store(partial_ptr + (2 * program + 1) * n_cols + cols, db_acc, mask=col_mask)


@triton.jit
def _qk_norm_bwd_kernel(
    dq_out_ptr, q_ptr, q_w_ptr, dq_ptr, q_rows, q_size1, q_size2,
    q_stride0, q_stride1, q_stride2, dq_out_stride0, dq_out_stride1, dq_out_stride2,
    dk_out_ptr, k_ptr, k_w_ptr, dk_ptr, k_rows, k_size1, k_size2,
    k_stride0, k_stride1, k_stride2, dk_out_stride0, dk_out_stride1, dk_out_stride2,
    partial_ptr, q_programs, n_cols, eps,
    IS_LAYER: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < q_programs:
        _norm_bwd_tiles(dq_out_ptr, q_ptr, q_w_ptr, dq_ptr, partial_ptr, pid, q_programs,
                        q_rows, n_cols, q_size1, q_size2, q_stride0, q_stride1, q_stride2,
                        dq_out_stride0, dq_out_stride1, dq_out_stride2, eps, IS_LAYER, BLOCK_N, ROWS)
    else:
        # k programs index their partials after the q programs' ones
        _norm_bwd_tiles(dk_out_ptr, k_ptr, k_w_ptr, dk_ptr, partial_ptr + 2 * q_programs * n_cols,
                        pid - q_programs, tl.num_programs(0) - q_programs,
                        k_rows, n_cols, k_size1, k_size2, k_stride0, k_stride1, k_stride2,
                        dk_out_stride0, dk_out_stride1, dk_out_stride2, eps, IS_LAYER, BLOCK_N, ROWS)


def _check_inputs(q, k, q_weight, k_weight, kind):
    _check_kind(kind)
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or q_weight.shape != (head_dim,) or k_weight.shape != (head_dim,):
        raise ValueError(
            f"qk_norm needs q, k with the same head dim and weights of shape ({head_dim},); got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, weights {tuple(q_weight.shape)}, {tuple(k_weight.shape)}"
        )


def _qk_norm_forward(q, k, q_weight, k_weight, eps, q_bias, k_bias, kind):
    _check_inputs(q, k, q_weight, k_weight, kind)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    q_rows, k_rows = q.numel() // max(q.shape[-1], 1), k.numel() // max(k.shape[-1], 1)
    if q_out.numel() + k_out.numel() == 0:
        return q_out, k_out
    (q,), (q_size1, q_size2), (q_strides,) = strided_rows(q)
    (k,), (k_size1, k_size2), (k_strides,) = strided_rows(k)
    n_cols = q.shape[-1]
    block_n, tile_rows, num_warps = row_tile(n_cols)
    grid = (triton.cdiv(q_rows, tile_rows) + triton.cdiv(k_rows, tile_rows),)
    q_weight, k_weight = q_weight.contiguous(), k_weight.contiguous()
    _qk_norm_fwd_kernel[grid](
        q, q_weight, q_weight if q_bias is None else q_bias.contiguous(), q_out, q_rows, q_size1, q_size2, *q_strides,
        k, k_weight, k_weight if k_bias is None else k_bias.contiguous(), k_out, k_rows, k_size1, k_size2, *k_strides,
        n_cols, eps,
        IS_LAYER=kind == "layer", Q_HAS_BIAS=q_bias is not None, K_HAS_BIAS=k_bias is not None,
        BLOCK_N=block_n, ROWS=tile_rows, num_warps=num_warps,
    )
    return q_out, k_out


def _qk_norm_backward(dq_out, dk_out, q, k, q_weight, k_weight, eps, kind):
    _check_inputs(q, k, q_weight, k_weight, kind)
    n_cols = q.shape[-1]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    q_rows, k_rows = q.numel() // max(n_cols, 1), k.numel() // max(n_cols, 1)
    block_n, tile_rows, num_warps = row_tile(n_cols)

    def programs(n_rows):
        return reduction_programs(q.device, triton.cdiv(n_rows, tile_rows), num_warps) if n_rows else 0

    q_programs, k_programs = programs(q_rows), programs(k_rows)
    # rows [2p, 2p + 1] hold program p's (dW, dB); q programs first, then k programs
    partial = torch.empty((q_programs + k_programs, 2, n_cols), dtype=torch.float32, device=q.device)
    if q_programs + k_programs:
        (q, dq_out), (q_size1, q_size2), (q_strides, dq_out_strides) = strided_rows(q, dq_out)
        (k, dk_out), (k_size1, k_size2), (k_strides, dk_out_strides) = strided_rows(k, dk_out)
        _qk_norm_bwd_kernel[(q_programs + k_programs,)](
            dq_out, q, q_weight.contiguous(), dq, q_rows, q_size1, q_size2, *q_strides, *dq_out_strides,
            dk_out, k, k_weight.contiguous(), dk, k_rows, k_size1, k_size2, *k_strides, *dk_out_strides,
            partial, q_programs, n_cols, eps,
            IS_LAYER=kind == "layer", BLOCK_N=block_n, ROWS=tile_rows, num_warps=num_warps,
        )
    # four separate sums: views of one result would alias each other, which custom ops forbid
    q_partial, k_partial = partial[:q_programs], partial[q_programs:]
    return (
        dq, dk,
        q_partial[:, 0].sum(0).to(q_weight.dtype), k_partial[:, 0].sum(0).to(k_weight.dtype),
        q_partial[:, 1].sum(0).to(q_weight.dtype), k_partial[:, 1].sum(0).to(k_weight.dtype),
    )


@torch.library.custom_op("miro_kernels::qk_norm", mutates_args=())
def qk_norm_op(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    q_bias: Optional[torch.Tensor],
    k_bias: Optional[torch.Tensor],
    kind: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _qk_norm_forward(q, k, q_weight, k_weight, eps, q_bias, k_bias, kind)


@qk_norm_op.register_fake
def _(q, k, q_weight, k_weight, eps, q_bias, k_bias, kind):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("miro_kernels::qk_norm_backward", mutates_args=())
def qk_norm_backward_op(
    dq_out: torch.Tensor,
    dk_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    kind: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dq_weight, dk_weight, dq_bias, dk_bias); the bias grads come in the weights' dtype."""
    return _qk_norm_backward(dq_out, dk_out, q, k, q_weight, k_weight, eps, kind)


@qk_norm_backward_op.register_fake
def _(dq_out, dk_out, q, k, q_weight, k_weight, eps, kind):
    return (
        q.new_empty(q.shape), k.new_empty(k.shape),
        q_weight.new_empty(q_weight.shape), k_weight.new_empty(k_weight.shape),
        q_weight.new_empty(q_weight.shape), k_weight.new_empty(k_weight.shape),
    )


class QKNormFunction(torch.autograd.Function):
    """The autograd formula of miro_kernels::qk_norm (registered below);
    `.apply(q, k, q_weight, k_weight, eps, q_bias, k_bias, kind)` is the Liger-style entry point."""

    @staticmethod
    def forward(q, k, q_weight, k_weight, eps, q_bias, k_bias, kind):
        return qk_norm_op(q, k, q_weight, k_weight, eps, q_bias, k_bias, kind)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, q_weight, k_weight, eps, q_bias, k_bias, kind = inputs
        ctx.save_for_backward(q, k, q_weight, k_weight)
        ctx.eps, ctx.kind = eps, kind
        ctx.bias_dtypes = (None if q_bias is None else q_bias.dtype, None if k_bias is None else k_bias.dtype)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        q, k, q_weight, k_weight = ctx.saved_tensors
        # an output that did not reach the loss arrives as None
        dq_out = torch.zeros_like(q) if dq_out is None else dq_out
        dk_out = torch.zeros_like(k) if dk_out is None else dk_out
        dq, dk, dq_weight, dk_weight, dq_bias, dk_bias = qk_norm_backward_op(
            dq_out, dk_out, q, k, q_weight, k_weight, ctx.eps, ctx.kind
        )
        q_bias_dtype, k_bias_dtype = ctx.bias_dtypes
        return (
            dq, dk, dq_weight, dk_weight, None,
            None if q_bias_dtype is None else dq_bias.to(q_bias_dtype),
            None if k_bias_dtype is None else dk_bias.to(k_bias_dtype),
            None,
        )


qk_norm_op.register_autograd(QKNormFunction.backward, setup_context=QKNormFunction.setup_context)
