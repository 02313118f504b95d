"""What every kernel file shares: whether Triton can run, and how big a launch should be.

INTERPRET is read once, here, at import: Triton itself decides interpreter-or-compiler when a
kernel is decorated, so a later change of the variable could not switch the kernels anyway.

Launch shapes are fixed heuristics rather than @triton.autotune. Autotune picks a config by
timing, so two processes can pick different configs for the same shape; a different tile or warp
count changes the reduction tree and with it the low bits of the result. Fixed heuristics keep
forward and backward bit-reproducible from run to run, which the training runs rely on.
"""
import functools
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the references run, the kernels below are never launched
    HAS_TRITON = False

    class _Unavailable:
        """Just enough of triton / triton.language for the kernel definitions to be parsed."""

        constexpr = object

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _Unavailable()

# Rows narrower than this share a program, several per tile, up to this many elements: a 32- or
# 64-wide head-dim row alone would leave most of a warp idle. Wider rows get one row per program.
ROW_TILE_ELEMENTS = 1024
# Widest row one program takes. Up to 8192 columns everything stays in registers on sm_90
# (tests/test_kernels_sm90.py checks it); wider rows are still correct but spill: the RMSNorm
# backward from 16K columns, the forward from 32K (cuobjdump -res-usage, bf16 and fp32 alike).
MAX_BLOCK_N = 65536


# Set by kernels.reference_only(): benchmarks time the torch references on the same GPU.
_reference_only = False


def runs_triton(t: torch.Tensor) -> bool:
    """CUDA tensors run the kernels; CPU tensors only in the interpreter (how CI tests them)."""
    return HAS_TRITON and not _reference_only and (t.is_cuda or (INTERPRET and t.device.type == "cpu"))


def num_warps_for(tile_elements: int) -> int:
    """About 8-16 elements per thread: fewer warps starve the SM, more add reduction overhead."""
    if tile_elements < 2048:
        return 4
    if tile_elements < 8192:
        return 8
    if tile_elements < 32768:
        return 16
    return 32


def row_tile(n_cols: int):
    """(BLOCK_N, tile rows, num_warps) of the row-reduction kernels: a whole row per tile; several
    rows per tile only when rows are narrow."""
    block_n = triton.next_power_of_2(max(n_cols, 1))
    if block_n > MAX_BLOCK_N:
        raise ValueError(f"rows of {n_cols} elements exceed the single-tile limit of {MAX_BLOCK_N}")
    tile_rows = max(1, ROW_TILE_ELEMENTS // block_n)
    return block_n, tile_rows, num_warps_for(block_n * tile_rows)


def reduction_programs(device: torch.device, n_tiles: int, num_warps: int) -> int:
    """Programs for a persistent backward that writes one dW partial per program.

    The count depends only on the device and the launch shape, never on timing, so the order of
    the partial sums (and the bits of dW) is the same every run. Under the interpreter programs run
    one after another, so a handful suffices and still exercises the cross-program reduction.
    """
    if device.type == "cuda":
        sm_count, per_sm = _sm_count(device.index), max(2, 16 // num_warps)
    else:
        sm_count, per_sm = 4, 1
    return max(1, min(n_tiles, sm_count * per_sm))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    """A driver query: once per device, not once per launch (a CUDA tensor's device has an index)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] as [rows, N] with unit column stride: a view when the leading dims collapse into
    one row stride (slices of wider rows included), else a contiguous copy."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.numel() == 0 else rows.contiguous()


def strided_rows(*tensors: torch.Tensor):
    """Address same-shape [..., D] tensors as rows without copying: (tensors, (size1, size2),
    per-tensor (stride0, stride1, stride2)).

    Leading dims are collapsed where every tensor allows it and size-1 dims dropped; up to three
    remain, each with its own stride, so row r sits at (r // (size1*size2)) * stride0 +
    (r // size2 % size1) * stride1 + (r % size2) * stride2. That covers [B, L, H, D], its
    transpose [B, H, L, D], and q/k views of a packed [B, L, 3, H, D] projection. Anything needing
    more (or a strided last dim) is copied to contiguous first.
    """
    tensors = [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]
    dims = _collapse_leading_dims(tensors)
    if dims is None:
        tensors = [t.contiguous() for t in tensors]
        dims = _collapse_leading_dims(tensors)
    sizes = [size for size, _ in dims]
    strides = [tuple(dim_strides[i] for _, dim_strides in dims) for i in range(len(tensors))]
    return tensors, (sizes[1], sizes[2]), strides


def _collapse_leading_dims(tensors):
    merged = []  # (size, strides of each tensor), outermost first
    for dim, size in enumerate(tensors[0].shape[:-1]):
        if size == 1:
            continue
        strides = [t.stride(dim) for t in tensors]
        if merged and all(outer == inner * size for outer, inner in zip(merged[-1][1], strides)):
            merged[-1] = (merged[-1][0] * size, strides)
        else:
            merged.append((size, strides))
    if len(merged) > 3:
        return None
    return [(1, [0] * len(tensors))] * (3 - len(merged)) + merged
