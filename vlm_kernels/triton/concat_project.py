"""concat_project, Triton: the projection of a feature-axis concatenation as one GEMM over L source
pointers, forward and backward, with no concatenated buffer.

Shapes: L sources X_l [M, D_l] (M = the leading dims flattened; a row stride each, unit stride along
D_l), weight W [N, K] with K = sum_l D_l, bias [N]. With c_l = D_0 + ... + D_{l-1} (the first weight
column of source l):

    out[M, N]          = sum_l X_l @ W[:, c_l : c_l + D_l]^T + bias           (forward)
    dX_l[M, D_l]       = dY @ W[:, c_l : c_l + D_l]                            (each into its own tensor)
    dW[:, c_l + j]     = dY^T @ X_l[:, j]        dbias = sum_m dY[m, :]         (one [N, K] weight grad)

Kernels (fp32 accumulation, dots on the weight's dtype):
- ``_fwd_kernel``: grid (M / BLOCK_M * N / BLOCK_N,) in grouped order (GROUP_M row tiles share their
  weight tiles in L2). The K loop walks the sources one after another: up to ``MAX_SOURCES`` pointers,
  widths and row strides are kernel arguments, the loop of each present source is unrolled at compile
  time (``SOURCES``), and the weight pointer advances by D_l between them. Bias in the epilogue.
- ``_bwd_features_kernel``: grid (M / BLOCK_M, sum_l ceil(D_l / BLOCK_K)): each program picks its source
  from its K tile (a source's tiles never straddle into the next source), reduces over N and writes its
  [BLOCK_M, BLOCK_K] tile of dX_l straight into that source's gradient.
- ``_bwd_weight_kernel``: grid (N / BLOCK_N, sum_l ceil(D_l / BLOCK_K), splits): the [BLOCK_N, BLOCK_K]
  tile of dW at the source's columns, reduced over one range of the M rows; the programs of the first
  K tile also sum dY over their rows into dbias (a second pass over dY, outside the GEMM loop). One
  range writes dW/dbias in place; several write float32 partials that the host sums in a fixed order.

More than ``MAX_SOURCES`` sources run in chunks of ``MAX_SOURCES``: the forward's chunks accumulate in
a float32 [M, N] buffer (the output itself for float32 weights) that the next chunk loads; the
backward launches once per chunk, each writing its own sources' gradients and its own columns of dW.

Every output element is written by exactly one program of a launch: deterministic, no atomics.
float32 weights: 3xTF32 dots (``_gemm.DOT_PRECISION``). GPU launches autotune over the configs at
the bottom (every one compiled by the compile report for sm_80/sm_90 with zero spills); under
TRITON_INTERPRET=1 a kernel runs the first config of its list, ``force_triton_config(name, i)`` another.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from vlm_kernels._checks import FLOAT_DTYPES
from vlm_kernels.triton._gemm import DOT_PRECISION, gemm_configs, reduction_splits
from vlm_kernels.triton._launch import declare_configs, interpreting, launch
from vlm_kernels.triton.aot import register_aot

MAX_SOURCES = 8  # source pointers one launch takes; more run in chunks of this many

# ---- forward -------------------------------------------------------------------------------------------


@triton.jit
def _project_source(
    acc,
    x_ptr,
    stride_x,
    width,
    w_ptr,
    stride_w,
    rows,
    row_in,
    cols,
    col_in,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``acc + X[rows, :width] @ W[cols, :width]^T``: one source against its weight column block."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_x + offs_k[None, :]
    w_ptrs = w_ptr + cols[None, :] * stride_w + offs_k[:, None]
    for k0 in range(0, width, BLOCK_K):
        k_in = offs_k < width - k0
        x = tl.load(x_ptrs, mask=row_in[:, None] & k_in[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_in[:, None] & col_in[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _fwd_kernel(
    x0_ptr,  # sources [M, D_l], row stride stride_x<l>, unit stride along D_l; unused ones: any
    x1_ptr,
    x2_ptr,
    x3_ptr,
    x4_ptr,
    x5_ptr,
    x6_ptr,
    x7_ptr,
    w_ptr,  # [N, K] at the chunk's first column, row stride stride_w, unit column stride
    bias_ptr,  # [N] (unused without HAS_BIAS)
    acc_ptr,  # [M, N] float32 contiguous: the earlier chunks' sums (unused without LOAD_ACC)
    out_ptr,  # [M, N] contiguous: the output (weight's dtype) or the float32 partial sums
    M,
    N,
    d0,
    d1,
    d2,
    d3,
    d4,
    d5,
    d6,
    d7,
    stride_x0,
    stride_x1,
    stride_x2,
    stride_x3,
    stride_x4,
    stride_x5,
    stride_x6,
    stride_x7,
    stride_w,
    SOURCES: tl.constexpr,  # 1..MAX_SOURCES: sources read by this launch
    HAS_BIAS: tl.constexpr,
    LOAD_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # Grouped order: GROUP_M consecutive row tiles run over the same column tiles (weight in L2).
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_in = rows < M
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_in = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w = w_ptr
    acc = _project_source(
        acc,
        x0_ptr,
        stride_x0,
        d0,
        w,
        stride_w,
        rows,
        row_in,
        cols,
        col_in,
        BLOCK_K,
        INPUT_PRECISION,
    )
    w += d0
    if SOURCES > 1:
        acc = _project_source(
            acc, x1_ptr, stride_x1, d1, w, stride_w, rows, row_in, cols, col_in, BLOCK_K,
            INPUT_PRECISION,
        )  # fmt: skip
        w += d1
    if SOURCES > 2:
        acc = _project_source(
            acc, x2_ptr, stride_x2, d2, w, stride_w, rows, row_in, cols, col_in, BLOCK_K,
            INPUT_PRECISION,
        )  # fmt: skip
        w += d2
    if SOURCES > 3:
        acc = _project_source(
            acc, x3_ptr, stride_x3, d3, w, stride_w, rows, row_in, cols, col_in, BLOCK_K,
            INPUT_PRECISION,
        )  # fmt: skip
        w += d3
    if SOURCES > 4:
        acc = _project_source(
            acc, x4_ptr, stride_x4, d4, w, stride_w, rows, row_in, cols, col_in, BLOCK_K,
            INPUT_PRECISION,
        )  # fmt: skip
        w += d4
    if SOURCES > 5:
        acc = _project_source(
            acc, x5_ptr, stride_x5, d5, w, stride_w, rows, row_in, cols, col_in, BLOCK_K,
            INPUT_PRECISION,
        )  # fmt: skip
        w += d5
    if SOURCES > 6:
        acc = _project_source(
            acc, x6_ptr, stride_x6, d6, w, stride_w, rows, row_in, cols, col_in, BLOCK_K,
            INPUT_PRECISION,
        )  # fmt: skip
        w += d6
    if SOURCES > 7:
        acc = _project_source(
            acc, x7_ptr, stride_x7, d7, w, stride_w, rows, row_in, cols, col_in, BLOCK_K,
            INPUT_PRECISION,
        )  # fmt: skip

    mask = row_in[:, None] & col_in[None, :]
    offs = rows[:, None] * N + cols[None, :]
    if LOAD_ACC:
        acc += tl.load(acc_ptr + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---- backward ------------------------------------------------------------------------------------------


@triton.jit
def _next_source(
    tile,
    start,
    col,
    ptr,
    stride,
    width,
    picked_ptr,
    picked_stride,
    picked_width,
    picked_start,
    picked_col,
    BLOCK_K: tl.constexpr,
):
    """The source (ptr, stride, width) begins at K tile ``start`` and weight column ``col``: it is the
    pick if ``tile`` is at or past its first tile (the sources come in order, so the last such wins).
    Returns the pick, then where the source after it begins."""
    here = tile >= start
    return (
        tl.where(here, ptr, picked_ptr),
        tl.where(here, stride, picked_stride),
        tl.where(here, width, picked_width),
        tl.where(here, start, picked_start),
        tl.where(here, col, picked_col),
        start + tl.cdiv(width, BLOCK_K),
        col + width,
    )


@triton.jit
def _pick_source(
    tile,
    p0,
    p1,
    p2,
    p3,
    p4,
    p5,
    p6,
    p7,
    d0,
    d1,
    d2,
    d3,
    d4,
    d5,
    d6,
    d7,
    s0,
    s1,
    s2,
    s3,
    s4,
    s5,
    s6,
    s7,
    SOURCES: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``(ptr, row stride, width, first weight column, first column of the tile)`` of the source that
    K tile ``tile`` belongs to; source l owns tiles [sum_{j<l} ceil(D_j / BLOCK_K), ...)."""
    ptr, stride, width, start, col = p0, s0, d0, 0, 0
    next_start = tl.cdiv(d0, BLOCK_K)
    next_col = d0
    if SOURCES > 1:
        ptr, stride, width, start, col, next_start, next_col = _next_source(
            tile, next_start, next_col, p1, s1, d1, ptr, stride, width, start, col, BLOCK_K
        )
    if SOURCES > 2:
        ptr, stride, width, start, col, next_start, next_col = _next_source(
            tile, next_start, next_col, p2, s2, d2, ptr, stride, width, start, col, BLOCK_K
        )
    if SOURCES > 3:
        ptr, stride, width, start, col, next_start, next_col = _next_source(
            tile, next_start, next_col, p3, s3, d3, ptr, stride, width, start, col, BLOCK_K
        )
    if SOURCES > 4:
        ptr, stride, width, start, col, next_start, next_col = _next_source(
            tile, next_start, next_col, p4, s4, d4, ptr, stride, width, start, col, BLOCK_K
        )
    if SOURCES > 5:
        ptr, stride, width, start, col, next_start, next_col = _next_source(
            tile, next_start, next_col, p5, s5, d5, ptr, stride, width, start, col, BLOCK_K
        )
    if SOURCES > 6:
        ptr, stride, width, start, col, next_start, next_col = _next_source(
            tile, next_start, next_col, p6, s6, d6, ptr, stride, width, start, col, BLOCK_K
        )
    if SOURCES > 7:
        ptr, stride, width, start, col, next_start, next_col = _next_source(
            tile, next_start, next_col, p7, s7, d7, ptr, stride, width, start, col, BLOCK_K
        )
    return ptr, stride, width, col, (tile - start) * BLOCK_K


@triton.jit
def _bwd_features_kernel(
    grad_ptr,  # dY [M, N], row stride stride_g, unit column stride
    w_ptr,  # [N, K] at the chunk's first column, row stride stride_w, unit column stride
    dx0_ptr,  # gradients of the sources [M, D_l], row stride stride_dx<l>, unit stride along D_l
    dx1_ptr,
    dx2_ptr,
    dx3_ptr,
    dx4_ptr,
    dx5_ptr,
    dx6_ptr,
    dx7_ptr,
    M,
    N,
    d0,
    d1,
    d2,
    d3,
    d4,
    d5,
    d6,
    d7,
    stride_dx0,
    stride_dx1,
    stride_dx2,
    stride_dx3,
    stride_dx4,
    stride_dx5,
    stride_dx6,
    stride_dx7,
    stride_g,
    stride_w,
    SOURCES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # along N (the reduction)
    BLOCK_K: tl.constexpr,  # along D_l (the tile of dX_l)
    INPUT_PRECISION: tl.constexpr,
):
    dx_ptr, stride_dx, width, col, k0 = _pick_source(
        tl.program_id(1),
        dx0_ptr, dx1_ptr, dx2_ptr, dx3_ptr, dx4_ptr, dx5_ptr, dx6_ptr, dx7_ptr,
        d0, d1, d2, d3, d4, d5, d6, d7,
        stride_dx0, stride_dx1, stride_dx2, stride_dx3, stride_dx4, stride_dx5, stride_dx6,
        stride_dx7,
        SOURCES,
        BLOCK_K,
    )  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_in = rows < M
    k = k0 + tl.arange(0, BLOCK_K)
    k_in = k < width
    offs_n = tl.arange(0, BLOCK_N)
    dy_ptrs = grad_ptr + rows[:, None] * stride_g + offs_n[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + (col + k)[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_in = offs_n < N - n0
        dy = tl.load(dy_ptrs, mask=row_in[:, None] & n_in[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_in[:, None] & k_in[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(dy, w, acc, input_precision=INPUT_PRECISION)
        dy_ptrs += BLOCK_N
        w_ptrs += BLOCK_N * stride_w
    tl.store(
        dx_ptr + rows[:, None] * stride_dx + k[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=row_in[:, None] & k_in[None, :],
    )


@triton.jit
def _bwd_weight_kernel(
    grad_ptr,  # dY [M, N], row stride stride_g, unit column stride
    x0_ptr,  # sources [M, D_l], row stride stride_x<l>, unit stride along D_l
    x1_ptr,
    x2_ptr,
    x3_ptr,
    x4_ptr,
    x5_ptr,
    x6_ptr,
    x7_ptr,
    dw_ptr,  # [splits, N, K] at the chunk's first column: float32 partials, or dW itself (1 split)
    dbias_ptr,  # [splits, N] contiguous, dw's dtype (unused without HAS_BIAS)
    M,
    N,
    rows_per_split,  # a multiple of every BLOCK_M
    d0,
    d1,
    d2,
    d3,
    d4,
    d5,
    d6,
    d7,
    stride_x0,
    stride_x1,
    stride_x2,
    stride_x3,
    stride_x4,
    stride_x5,
    stride_x6,
    stride_x7,
    stride_g,
    stride_dw,  # row stride of dW (K)
    stride_dw_split,  # N * K
    SOURCES: tl.constexpr,
    HAS_BIAS: tl.constexpr,  # the programs of K tile 0 also reduce dbias
    BLOCK_M: tl.constexpr,  # rows reduced per step
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(1)
    x_ptr, stride_x, width, col, k0 = _pick_source(
        tile,
        x0_ptr, x1_ptr, x2_ptr, x3_ptr, x4_ptr, x5_ptr, x6_ptr, x7_ptr,
        d0, d1, d2, d3, d4, d5, d6, d7,
        stride_x0, stride_x1, stride_x2, stride_x3, stride_x4, stride_x5, stride_x6, stride_x7,
        SOURCES,
        BLOCK_K,
    )  # fmt: skip
    split = tl.program_id(2)
    cols = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # along N
    col_in = cols < N
    k = k0 + tl.arange(0, BLOCK_K)
    k_in = k < width
    offs_m = tl.arange(0, BLOCK_M)
    start = split.to(tl.int64) * rows_per_split
    end = tl.minimum(start + rows_per_split, M)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + offs_m
        row_in = rows < end
        dy_t = tl.load(  # [BLOCK_N, BLOCK_M]
            grad_ptr + rows[None, :] * stride_g + cols[:, None],
            mask=col_in[:, None] & row_in[None, :],
            other=0.0,
        )
        x = tl.load(
            x_ptr + rows[:, None] * stride_x + k[None, :],
            mask=row_in[:, None] & k_in[None, :],
            other=0.0,
        )
        acc = tl.dot(dy_t, x, acc, input_precision=INPUT_PRECISION)
    out_ty = dw_ptr.dtype.element_ty
    tl.store(
        dw_ptr + split * stride_dw_split + cols[:, None] * stride_dw + (col + k)[None, :],
        acc.to(out_ty),
        mask=col_in[:, None] & k_in[None, :],
    )
    # Nested: HAS_BIAS is resolved at compile time, tile == 0 at run time.
    if HAS_BIAS:  # noqa: SIM102
        if tile == 0:  # a second pass over this range of dY, kept out of the GEMM loop
            dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for m0 in range(start, end, BLOCK_M):
                rows = m0 + offs_m
                dy = tl.load(
                    grad_ptr + rows[:, None] * stride_g + cols[None, :],
                    mask=(rows < end)[:, None] & col_in[None, :],
                    other=0.0,
                )
                dbias += tl.sum(dy.to(tl.float32), 0)
            tl.store(dbias_ptr + split * N + cols, dbias.to(out_ty), mask=col_in)


# ---- configs -------------------------------------------------------------------------------------------

# Per kernel name and input width (2: float16/bfloat16 weights, 4: float32), the config list the
# launcher autotunes over on a GPU (the first runs under the interpreter); every one is compiled by the
# compile report for sm_80 and sm_90 with zero spills.
_CONFIGS = {
    "concat_project_fwd": {
        2: gemm_configs(
            (128, 128, 32, 8, 3), (64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 8, 3)
        ),
        # (32, 64, 32, 4, 2) spilled 4 bytes on sm_80; at one stage it does not.
        4: gemm_configs(
            (64, 64, 16, 4, 2), (64, 32, 32, 4, 2), (32, 64, 32, 4, 1), (64, 64, 32, 8, 2)
        ),
    },
    "concat_project_bwd_features": {  # BLOCK_N: N reduced per step; BLOCK_M x BLOCK_K: the dX tile
        2: gemm_configs((64, 32, 64, 4, 3), (128, 64, 64, 8, 3), (64, 64, 128, 8, 3)),
        # (64, 16, 64, 4, 2) spilled 4 bytes on sm_80; at one stage it does not.
        4: gemm_configs(
            (32, 32, 64, 4, 2), (64, 16, 64, 4, 1), (64, 32, 32, 4, 2), (64, 32, 64, 8, 2)
        ),
    },
    "concat_project_bwd_weight": {  # BLOCK_M: rows reduced per step; BLOCK_N x BLOCK_K: the dW tile
        2: gemm_configs((32, 64, 64, 4, 3), (64, 128, 64, 8, 3), (64, 64, 64, 8, 3)),
        4: gemm_configs((32, 64, 32, 4, 2), (16, 64, 64, 4, 2)),
    },
}
_GROUP_M = 8  # row tiles per group of the forward's program order
_MAX_BLOCK_M = 128  # rows_per_split of the dW kernel is a multiple of this (and of every BLOCK_M)

for _name, _lists in _CONFIGS.items():
    declare_configs(_name, *_lists.values())


# ---- launchers -----------------------------------------------------------------------------------------


def _check_runnable(weight: torch.Tensor) -> None:
    if weight.device.type != "cuda" and not interpreting(_fwd_kernel):
        raise RuntimeError(
            f"concat_project (triton): tensors are on {weight.device}; the Triton kernels need CUDA "
            "tensors, or TRITON_INTERPRET=1 set before triton is imported to run CPU tensors through "
            "the interpreter"
        )
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"concat_project (triton): weight must be float32, bfloat16 or float16, got {weight.dtype}"
        )


def _rows(features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """Each source as [M, D_l] with a unit stride along D_l: a view when its leading dims collapse to
    one row stride (contiguous sources, last-dim slices of a wider tensor), else a copy (reshape)."""
    lead = features[0].shape[:-1]
    rows = lead.numel()
    flat = []
    for f in features:
        f2d = f.reshape(rows, f.shape[-1])
        flat.append(f2d if f2d.shape[1] <= 1 or f2d.stride(1) == 1 else f2d.contiguous())
    return flat, rows


def _chunks(count: int) -> list[range]:
    return [range(i, min(i + MAX_SOURCES, count)) for i in range(0, count, MAX_SOURCES)]


def _source_args(tensors: Sequence[torch.Tensor]) -> tuple[list, list[int], list[int]]:
    """(pointers, widths, row strides), each padded to MAX_SOURCES (the padding is never read)."""
    pad = MAX_SOURCES - len(tensors)
    pointers = [*tensors, *[tensors[0]] * pad]
    widths = [t.shape[1] for t in tensors] + [0] * pad
    strides = [t.stride(0) for t in tensors] + [0] * pad
    return pointers, widths, strides


def _column_offsets(flat: Sequence[torch.Tensor]) -> list[int]:
    offsets, col = [], 0
    for f in flat:
        offsets.append(col)
        col += f.shape[1]
    return offsets


def _launch(name, kernel, width, grid, args, tune_key, **constexprs) -> None:
    launch(name, kernel, _CONFIGS[name][width], grid, args, tune_key=tune_key, **constexprs)


def concat_project_fwd_triton(
    features: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """out [..., N] contiguous in weight's dtype; see the module docstring. The op validates."""
    _check_runnable(weight)
    flat, rows = _rows(features)
    dim = weight.shape[0]
    out = torch.empty((rows, dim), dtype=weight.dtype, device=weight.device)
    shape = (*features[0].shape[:-1], dim)
    if out.numel() == 0:
        return out.reshape(shape)
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    chunks = _chunks(len(flat))
    offsets = _column_offsets(flat)
    partial = out  # float32 running sums between chunks: the output itself if it is float32
    if len(chunks) > 1 and out.dtype != torch.float32:
        partial = torch.empty((rows, dim), dtype=torch.float32, device=out.device)
    width = weight.dtype.itemsize
    for index, chunk in enumerate(chunks):
        pointers, widths, strides = _source_args([flat[i] for i in chunk])
        last = index == len(chunks) - 1
        args = (
            *pointers,
            weight[:, offsets[chunk[0]] :],
            bias if bias is not None else weight,
            partial,
            out if last else partial,
            rows,
            dim,
            *widths,
            *strides,
            weight.stride(0),
        )
        _launch(
            "concat_project_fwd",
            _fwd_kernel,
            width,
            lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(dim, meta["BLOCK_N"]),),
            args,
            ("M", "N", "d0"),
            SOURCES=len(chunk),
            HAS_BIAS=bias is not None and index == 0,
            LOAD_ACC=index > 0,
            GROUP_M=_GROUP_M,
            INPUT_PRECISION=DOT_PRECISION[width],
        )
    return out.reshape(shape)


def _k_tiles(widths: Sequence[int], block_k: int) -> int:
    return sum(triton.cdiv(w, block_k) for w in widths)


def concat_project_bwd_triton(
    grad_out: torch.Tensor,
    features: Sequence[torch.Tensor],
    weight: torch.Tensor,
    splits: int | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(grad of each feature, grad_weight, grad_bias)``, contiguous, in the weight's dtype, for the
    output cotangent ``grad_out [..., N]``. ``splits`` overrides the number of row ranges the weight
    gradient is reduced over (tests)."""
    _check_runnable(weight)
    flat, rows = _rows(features)
    dim, k_total = weight.shape
    device, dtype = weight.device, weight.dtype
    width = dtype.itemsize
    precision = DOT_PRECISION[width]
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    grad = grad_out.to(dtype).reshape(rows, dim)
    if grad.stride(1) != 1:
        grad = grad.contiguous()
    grad_features = [torch.empty(f.shape, dtype=f.dtype, device=device) for f in features]
    if rows == 0 or dim == 0:
        for g in grad_features:
            g.zero_()
        zeros = torch.zeros((dim, k_total), dtype=dtype, device=device)
        return grad_features, zeros, torch.zeros(dim, dtype=dtype, device=device)
    grad_flat = [g.view(rows, g.shape[-1]) for g in grad_features]
    offsets = _column_offsets(flat)
    chunks = _chunks(len(flat))

    for chunk in chunks:
        widths_chunk = [flat[i].shape[1] for i in chunk]
        if sum(widths_chunk) == 0:
            continue
        pointers, widths, strides = _source_args([grad_flat[i] for i in chunk])
        _launch(
            "concat_project_bwd_features",
            _bwd_features_kernel,
            width,
            lambda meta, widths_chunk=widths_chunk: (
                triton.cdiv(rows, meta["BLOCK_M"]),
                _k_tiles(widths_chunk, meta["BLOCK_K"]),
            ),
            (
                grad,
                weight[:, offsets[chunk[0]] :],
                *pointers,
                rows,
                dim,
                *widths,
                *strides,
                grad.stride(0),
                weight.stride(0),
            ),
            ("M", "N", "d0"),
            SOURCES=len(chunk),
            INPUT_PRECISION=precision,
        )

    if splits is None:
        programs = triton.cdiv(dim, 64) * _k_tiles([f.shape[1] for f in flat], 64)
        splits = reduction_splits(programs, rows, 4 * _MAX_BLOCK_M, device)
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), _MAX_BLOCK_M) * _MAX_BLOCK_M
    splits = triton.cdiv(rows, rows_per_split)
    part_dtype = dtype if splits == 1 else torch.float32
    grad_w_parts = torch.empty((splits, dim, k_total), dtype=part_dtype, device=device)
    grad_b_parts = torch.empty((splits, dim), dtype=part_dtype, device=device)
    for index, chunk in enumerate(chunks):
        widths_chunk = [flat[i].shape[1] for i in chunk]
        has_bias = index == 0
        if sum(widths_chunk) == 0 and not has_bias:
            continue
        pointers, widths, strides = _source_args([flat[i] for i in chunk])
        _launch(
            "concat_project_bwd_weight",
            _bwd_weight_kernel,
            width,
            lambda meta, widths_chunk=widths_chunk: (
                triton.cdiv(dim, meta["BLOCK_N"]),
                max(_k_tiles(widths_chunk, meta["BLOCK_K"]), 1),  # a tile 0 for dbias
                splits,
            ),
            (
                grad,
                *pointers,
                grad_w_parts[:, :, offsets[chunk[0]] :],
                grad_b_parts,
                rows,
                dim,
                rows_per_split,
                *widths,
                *strides,
                grad.stride(0),
                k_total,
                dim * k_total,
            ),
            ("M", "N", "d0"),
            SOURCES=len(chunk),
            HAS_BIAS=has_bias,
            INPUT_PRECISION=precision,
        )
    if splits == 1:
        return grad_features, grad_w_parts[0], grad_b_parts[0]
    # A fixed-order sum of the float32 partials: deterministic.
    return grad_features, grad_w_parts.sum(0).to(dtype), grad_b_parts.sum(0).to(dtype)


# ---- ahead-of-time compile report ---------------------------------------------------------------------

# Compiled by `python -m vlm_kernels.tools.gpu_report` for sm_80 and sm_90a. Per kernel and weight type
# (bf16 stands for both 16-bit types): every config with all MAX_SOURCES sources and every epilogue
# term (the longest kernel), and the first config with two sources. The JIT sees what the model shapes
# give it: 16-byte aligned buffers (a weight column block starts at a multiple of 16 columns), int32
# sizes, widths, strides and N multiples of 16 (1280, 1024, 4096), M any.
_AOT_TYPES = {"bf16": 2, "fp32": 4}


def _aot_signature(kernel, pointers: dict[str, str]) -> dict:
    signature = {}
    for name, param in inspect.signature(kernel.fn).parameters.items():
        if "constexpr" in str(param.annotation):
            continue
        if name.endswith("_ptr"):
            signature[name] = f"*{pointers.get(name, pointers['*'])}:16"
        else:
            signature[name] = "i32" if name == "M" else "i32:16"
    return signature


def _register(name: str, kernel, pointers_for, **flags) -> None:
    for dtype, width in _AOT_TYPES.items():
        configs = _CONFIGS[name][width]
        signature = _aot_signature(kernel, pointers_for(dtype))
        for sources, variant_configs in ((MAX_SOURCES, configs), (2, configs[:1])):
            register_aot(
                kernel,
                name=f"{name}[{dtype},sources{sources}]",
                signature=signature,
                configs=variant_configs,
                constexprs={"SOURCES": sources, "INPUT_PRECISION": DOT_PRECISION[width], **flags},
            )


_register(
    "concat_project_fwd",
    _fwd_kernel,
    lambda dtype: {"*": dtype, "acc_ptr": "fp32"},
    HAS_BIAS=True,
    LOAD_ACC=True,
    GROUP_M=_GROUP_M,
)
_register("concat_project_bwd_features", _bwd_features_kernel, lambda dtype: {"*": dtype})
_register(
    "concat_project_bwd_weight",
    _bwd_weight_kernel,
    lambda dtype: {"*": dtype, "dw_ptr": "fp32", "dbias_ptr": "fp32"},
    HAS_BIAS=True,
)
