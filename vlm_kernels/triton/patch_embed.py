"""patch_embed, Triton: the patch embedding as one implicit GEMM, forward and backward.

Shapes: pixels [B, C, H, W] (float or uint8, any strides), weight [D, C, P, P], bias [D], cls_token [D],
pos_embed [N, D] with N = (H/P)*(W/P) + (1 if cls_token), pixel_mean / pixel_std [C]; out [B, N, D].
With K = C*P*P, Np = (H/P)*(W/P), o = 1 with a CLS token else 0, patch i = r*(W/P) + s and feature
k = (c*P + u)*P + v:

    x[b, i, k]     = pixels[b, c, P*r+u, P*s+v] * scale[c] + shift[c]      (normalization, in the load)
    out[b, o+i, :] = sum_k x[b, i, k] * weight[:, k] + bias + pos[o+i]     (GEMM [B*N, K] x [K, D])
    out[b, 0, :]   = cls + pos[0]                                          (its A row is masked to 0)
scale = 1/(255 std) or 1/std, shift = -mean/std (uint8 or float pixels; 1/255 and 0 without mean/std;
the identity, skipped at compile time, for float pixels without them).

Kernels (fp32 accumulation; the A tile is converted to the weight's dtype for the dot):
- ``_fwd_kernel``: grid (B*N / BLOCK_M, D / BLOCK_N). Rows of the GEMM are output tokens (a CLS row
  reads no pixels), so the output is written row-major in one pass; the patch gather happens in the
  A-tile load (no unfold buffer), bias / CLS / pos_embed in the epilogue.
- ``_bwd_weight_kernel``: dW[D, K] = dY_patches^T [D, B*Np] x X [B*Np, K], grid (D / BLOCK_N,
  K / BLOCK_K, splits); each split reduces its own range of B*Np rows into a float32 partial that the
  host sums in a fixed order (deterministic, no atomics; one split writes the result directly). The
  programs of the first K tile also sum their dY tiles into the bias gradient (column sums).
- ``_bwd_pixels_kernel``: dX[B*Np, K] = dY_patches @ W, grid (B*Np / BLOCK_M, K / BLOCK_K), scaled by
  1/std per channel and scattered back to [B, C, H, W] (stride = kernel: each pixel is written once).
- ``_bwd_pos_kernel``: dpos[N, D] = sum_b dY[b], grid (N / BLOCK_T, D / BLOCK_D); dcls = dpos[0].

K tiles: a K step (a loop step, or a program of the backward grids) is BLOCK_K // PV rows u0.. of one
channel c of every patch, each row padded to PV = the power of 2 >= P lanes (P = 14: 16; the padding
lanes are masked, 12.5% idle MMA work at P = 14, none at 8 and 16): the lanes of a row run along W, so
the pixel loads vectorize, the pointers advance by a scalar per step, and the normalization is one scalar
scale and shift per step. K steps per channel: ceil(P / (BLOCK_K // PV)); BLOCK_K >= PV.

Precision: float16/bfloat16 dots on tensor cores (the A tile and, in the backward, the operands in the
weight's dtype, as a PyTorch user of that dtype gets). float32 weights: 3xTF32 dots ("tf32x3": the high
and low TF32 parts of each operand, three MMAs). One TF32 rounding (10 mantissa bits) leaves ~1e-4 to
1e-3 relative error on dots of this length (5e-4 measured for image_text_attention's Dh = 128 dots),
far over the float32 tolerance; 3xTF32 keeps float32-grade error (~1e-6) at a third of the tensor-core
rate, still above the FMA rate of "ieee", and fits the registers (compile report). The interpreter
computes every dot in float32 whatever the precision, so the tests cannot see this choice: a GPU can. Every output element is written by exactly one
program: the forward and backward are deterministic (no atomics). GPU launches autotune over the configs
registered at the bottom for the compile report (zero spills on sm_80/sm_90); under TRITON_INTERPRET=1 a
kernel runs the first config of its list, ``force_triton_config(name, i)`` another (names: ``_CONFIGS``).
"""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from vlm_kernels.triton._gemm import DOT_PRECISION, gemm_configs, reduction_splits
from vlm_kernels.triton._launch import declare_configs, interpreting, launch
from vlm_kernels.triton.aot import register_aot

# ---- shared tile helpers -------------------------------------------------------------------------------


@triton.jit
def _patch_rows(
    patches, PATCH: tl.constexpr, patches_w, patches_per_image, stride_b, stride_h, stride_w
):
    """Offset (int64) of the top-left pixel of each patch (flat index over B*Np) in the pixels."""
    patches = patches.to(tl.int64)
    image = patches // patches_per_image
    i = patches - image * patches_per_image
    r = i // patches_w
    s = i - r * patches_w
    return image * stride_b + (r * PATCH) * stride_h + (s * PATCH) * stride_w


@triton.jit
def _k_step(step, STEPS: tl.constexpr, ROWS: tl.constexpr, stride_c, stride_h):
    """K step ``step`` covers rows u0 .. u0+ROWS-1 of channel c of every patch:
    ``(c, u0, pixel offset of (c, u0) in a patch)``."""
    c = step // STEPS
    u0 = (step - c * STEPS) * ROWS
    return c, u0, c.to(tl.int64) * stride_c + u0 * stride_h


@triton.jit
def _fwd_kernel(
    pixels_ptr,  # [B, C, H, W], float or uint8, any strides
    weight_ptr,  # [D, C*P*P], row stride stride_wd, unit stride along K
    bias_ptr,  # [D] (unused without HAS_BIAS)
    cls_ptr,  # [D] (unused without HAS_CLS)
    pos_ptr,  # [N, D], row stride stride_pos (unused without HAS_POS)
    scale_ptr,  # float32 [C] (unused without NORMALIZE)
    shift_ptr,  # float32 [C]
    out_ptr,  # [B*N, D] contiguous, weight's dtype
    rows_total,  # B * N
    tokens,  # N
    patches_w,  # W / P
    channels,  # C
    D,
    stride_pb,
    stride_pc,
    stride_ph,
    stride_pw,
    stride_wd,
    stride_pos,
    PATCH: tl.constexpr,
    PATCH_V: tl.constexpr,  # next power of 2 >= PATCH
    HAS_CLS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a multiple of PATCH_V: BLOCK_K // PATCH_V patch rows per step
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for float32 weights
):
    ROWS: tl.constexpr = BLOCK_K // PATCH_V
    STEPS: tl.constexpr = (PATCH + ROWS - 1) // ROWS
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # output tokens over B*N
    row_in = rows < rows_total
    image = rows // tokens
    token = rows - image * tokens
    is_patch = row_in & (token >= HAS_CLS)
    patch = tl.where(is_patch, image * (tokens - HAS_CLS) + token - HAS_CLS, 0)
    row_off = _patch_rows(
        patch, PATCH, patches_w, tokens - HAS_CLS, stride_pb, stride_ph, stride_pw
    )
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in = cols < D
    offs_k = tl.arange(0, BLOCK_K)
    r = offs_k // PATCH_V  # row of the patch inside the step
    v = offs_k % PATCH_V
    a_ptrs = pixels_ptr + row_off[:, None] + (r * stride_ph + v * stride_pw)[None, :]
    w_ptrs = weight_ptr + cols[None, :].to(tl.int64) * stride_wd + (r * PATCH + v)[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, channels * STEPS):
        c, u0, step_off = _k_step(step, STEPS, ROWS, stride_pc, stride_ph)
        k_in = (u0 + r < PATCH) & (v < PATCH)
        x = tl.load(a_ptrs + step_off, mask=is_patch[:, None] & k_in[None, :], other=0).to(
            tl.float32
        )
        if NORMALIZE:  # one channel per step: a scalar scale and shift
            x = tl.where(
                is_patch[:, None], x * tl.load(scale_ptr + c) + tl.load(shift_ptr + c), 0.0
            )
        w = tl.load(
            w_ptrs + (c * PATCH + u0) * PATCH, mask=k_in[:, None] & col_in[None, :], other=0.0
        )  # [BLOCK_K, BLOCK_N]
        acc += tl.dot(x.to(w.dtype), w, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)
        acc += tl.where(is_patch[:, None], bias[None, :], 0.0)
    if HAS_CLS:
        cls = tl.load(cls_ptr + cols, mask=col_in, other=0.0).to(tl.float32)
        acc += tl.where(is_patch[:, None], 0.0, cls[None, :])
    if HAS_POS:
        pos = tl.load(
            pos_ptr + token[:, None] * stride_pos + cols[None, :],
            mask=row_in[:, None] & col_in[None, :],
            other=0.0,
        )
        acc += pos.to(tl.float32)
    tl.store(
        out_ptr + rows[:, None] * D + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_in[:, None] & col_in[None, :],
    )


# ---- backward ------------------------------------------------------------------------------------------


@triton.jit
def _bwd_weight_kernel(
    grad_ptr,  # dY [B, N, D], unit stride along D
    pixels_ptr,  # [B, C, H, W], float or uint8, any strides
    scale_ptr,  # float32 [C]
    shift_ptr,  # float32 [C]
    dw_ptr,  # [splits, D, C*P*P] contiguous: float32 partials, or the weight's dtype (one split)
    dbias_ptr,  # [splits, D] contiguous, same dtype as dw_ptr
    patches_total,  # B * Np
    rows_per_split,  # a multiple of every BLOCK_M
    patches_per_image,  # Np
    patches_w,
    K,  # C * P * P
    D,
    stride_gb,
    stride_gt,
    stride_pb,
    stride_pc,
    stride_ph,
    stride_pw,
    PATCH: tl.constexpr,
    PATCH_V: tl.constexpr,
    HAS_CLS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    ROWS: tl.constexpr = BLOCK_K // PATCH_V
    STEPS: tl.constexpr = (PATCH + ROWS - 1) // ROWS
    pid_n = tl.program_id(0)
    split = tl.program_id(2)
    c, u0, step_off = _k_step(tl.program_id(1), STEPS, ROWS, stride_pc, stride_ph)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # along D
    col_in = cols < D
    offs_k = tl.arange(0, BLOCK_K)
    r = offs_k // PATCH_V
    v = offs_k % PATCH_V
    k_in = (u0 + r < PATCH) & (v < PATCH)
    col_off = step_off + r * stride_ph + v * stride_pw
    if NORMALIZE:
        scale = tl.load(scale_ptr + c)
        shift = tl.load(shift_ptr + c)
    offs_m = tl.arange(0, BLOCK_M)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    start = split.to(tl.int64) * rows_per_split
    end = tl.minimum(start + rows_per_split, patches_total)
    for m0 in range(start, end, BLOCK_M):
        patch = m0 + offs_m
        row_in = patch < end
        patch = tl.where(row_in, patch, 0)
        image = patch // patches_per_image
        token = patch - image * patches_per_image + HAS_CLS
        dy_t = tl.load(  # [BLOCK_N, BLOCK_M]
            grad_ptr + (image * stride_gb + token * stride_gt)[None, :] + cols[:, None],
            mask=col_in[:, None] & row_in[None, :],
            other=0.0,
        )
        row_off = _patch_rows(
            patch, PATCH, patches_w, patches_per_image, stride_pb, stride_ph, stride_pw
        )
        x = tl.load(
            pixels_ptr + row_off[:, None] + col_off[None, :],
            mask=row_in[:, None] & k_in[None, :],
            other=0,
        ).to(tl.float32)
        if NORMALIZE:
            x = tl.where(row_in[:, None], x * scale + shift, 0.0)
        acc += tl.dot(dy_t, x.to(dy_t.dtype), input_precision=INPUT_PRECISION)
        dbias += tl.sum(dy_t.to(tl.float32), 1)

    out_ty = dw_ptr.dtype.element_ty
    base = split.to(tl.int64) * D
    wcol = (c * PATCH + u0 + r) * PATCH + v
    tl.store(
        dw_ptr + (base + cols[:, None]) * K + wcol[None, :],
        acc.to(out_ty),
        mask=col_in[:, None] & k_in[None, :],
    )
    tl.store(dbias_ptr + base + cols, dbias.to(out_ty), mask=col_in & (tl.program_id(1) == 0))


@triton.jit
def _bwd_pixels_kernel(
    grad_ptr,  # dY [B, N, D], unit stride along D
    weight_ptr,  # [D, C*P*P], row stride stride_wd, unit stride along K
    scale_ptr,  # float32 [C]: 1/std (unused without NORMALIZE)
    dx_ptr,  # [B, C, H, W] (strides stride_xb...), the pixels' dtype
    patches_total,
    patches_per_image,
    patches_w,
    D,
    stride_gb,
    stride_gt,
    stride_wd,
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    PATCH: tl.constexpr,
    PATCH_V: tl.constexpr,
    HAS_CLS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # along D (the reduction)
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    ROWS: tl.constexpr = BLOCK_K // PATCH_V
    STEPS: tl.constexpr = (PATCH + ROWS - 1) // ROWS
    pid_m = tl.program_id(0)
    c, u0, step_off = _k_step(tl.program_id(1), STEPS, ROWS, stride_xc, stride_xh)
    patch = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_in = patch < patches_total
    patch = tl.where(row_in, patch, 0)
    image = patch // patches_per_image
    token = patch - image * patches_per_image + HAS_CLS
    offs_k = tl.arange(0, BLOCK_K)
    r = offs_k // PATCH_V
    v = offs_k % PATCH_V
    k_in = (u0 + r < PATCH) & (v < PATCH)
    offs_n = tl.arange(0, BLOCK_N)
    dy_ptrs = grad_ptr + (image * stride_gb + token * stride_gt)[:, None] + offs_n[None, :]
    wcol = (c * PATCH + u0 + r) * PATCH + v
    w_ptrs = weight_ptr + offs_n[:, None].to(tl.int64) * stride_wd + wcol[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        col_in = offs_n < D - n0
        dy = tl.load(dy_ptrs, mask=row_in[:, None] & col_in[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=col_in[:, None] & k_in[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        acc += tl.dot(dy, w.to(dy.dtype), input_precision=INPUT_PRECISION)
        dy_ptrs += BLOCK_N
        w_ptrs += BLOCK_N * stride_wd

    if NORMALIZE:
        acc *= tl.load(scale_ptr + c)
    row_off = _patch_rows(
        patch, PATCH, patches_w, patches_per_image, stride_xb, stride_xh, stride_xw
    )
    tl.store(
        dx_ptr + row_off[:, None] + (step_off + r * stride_xh + v * stride_xw)[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=row_in[:, None] & k_in[None, :],
    )


@triton.jit
def _bwd_pos_kernel(
    grad_ptr,  # dY [B, N, D], unit stride along D
    dpos_ptr,  # [N, D] contiguous, the weight's dtype
    batch,
    tokens,
    D,
    stride_gb,
    stride_gt,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < tokens)[:, None] & (cols < D)[None, :]
    ptrs = grad_ptr + rows[:, None] * stride_gt + cols[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for _ in range(0, batch):
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        ptrs += stride_gb
    tl.store(
        dpos_ptr + rows[:, None] * D + cols[None, :], acc.to(dpos_ptr.dtype.element_ty), mask=mask
    )


# ---- configs ----------------------------------------------------------------------------------------------


# Per kernel name and input width (2: float16/bfloat16 weights, 4: float32), the config list the
# launcher autotunes over on a GPU (the first runs under the interpreter); every one is compiled by the
# compile report for sm_80 and sm_90 at P = 8, 14 and 16 with zero spills.
_CONFIGS = {
    "patch_embed_fwd": {
        2: gemm_configs(
            (64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 8, 3)
        ),
        4: gemm_configs((32, 64, 32, 4, 2), (64, 64, 16, 4, 2), (64, 32, 32, 4, 2)),
    },
    "patch_embed_bwd_weight": {  # BLOCK_M: rows reduced per step; BLOCK_N x BLOCK_K: the dW tile
        2: gemm_configs((32, 64, 64, 4, 3), (64, 128, 64, 8, 3), (64, 64, 64, 8, 3)),
        4: gemm_configs((32, 64, 32, 4, 2), (16, 64, 64, 4, 2)),
    },
    "patch_embed_bwd_pixels": {  # BLOCK_N: D reduced per step
        2: gemm_configs((64, 32, 64, 4, 3), (128, 64, 64, 8, 3), (64, 64, 128, 8, 3)),
        4: gemm_configs((32, 32, 64, 4, 2), (64, 16, 64, 4, 2)),
    },
    "patch_embed_bwd_pos": {
        width: (triton.Config({"BLOCK_T": 16, "BLOCK_D": 128}, num_warps=4, num_stages=1),)
        for width in (2, 4)
    },
}
_MAX_BLOCK_M = 128  # rows_per_split of the dW kernel is a multiple of this (and of every BLOCK_M)
_PRECISION = DOT_PRECISION  # tl.dot input_precision per weight width

for _name, _lists in _CONFIGS.items():
    declare_configs(_name, *_lists.values())


# ---- launchers -----------------------------------------------------------------------------------------


def _check_runnable(pixels: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.device.type != "cuda" and not interpreting(_fwd_kernel):
        raise RuntimeError(
            f"patch_embed (triton): tensors are on {weight.device}; the Triton kernels need CUDA "
            "tensors, or TRITON_INTERPRET=1 set before triton is imported to run CPU tensors through "
            "the interpreter"
        )
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(
            f"patch_embed (triton): weight must be float32, bfloat16 or float16, got {weight.dtype}"
        )


def _normalization(pixels, pixel_mean, pixel_std) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """``(NORMALIZE, scale [C], shift [C])`` float32: x_norm = x * scale + shift."""
    channels = pixels.shape[1]
    if pixels.dtype != torch.uint8 and pixel_mean is None and pixel_std is None:
        unused = torch.zeros(1, dtype=torch.float32, device=pixels.device)  # never read
        return False, unused, unused
    scale = torch.full(
        (channels,),
        1 / 255 if pixels.dtype == torch.uint8 else 1.0,
        dtype=torch.float64,
        device=pixels.device,
    )
    shift = torch.zeros(channels, dtype=torch.float64, device=pixels.device)
    if pixel_mean is not None:
        shift = shift - pixel_mean.double()
    if pixel_std is not None:
        scale = scale / pixel_std.double()
        shift = shift / pixel_std.double()
    return True, scale.float(), shift.float()


def _padded(patch: int) -> int:
    """PV: the power of 2 >= P that each patch row is padded to along K (P = 14: 16)."""
    return triton.next_power_of_2(patch)


def _k_tiles(channels: int, patch: int, block_k: int) -> int:
    """K steps of a kernel: per channel, ceil(P / rows) steps of ``block_k // PV`` patch rows."""
    rows = block_k // _padded(patch)
    if rows == 0:
        raise ValueError(f"patch_embed (triton): BLOCK_K={block_k} is under the padded patch row")
    return channels * triton.cdiv(patch, rows)


def _weight_2d(weight: torch.Tensor) -> torch.Tensor:
    """[D, K] with a unit stride along K."""
    flat = weight.reshape(weight.shape[0], -1)
    return flat if flat.stride(1) == 1 else flat.contiguous()


def _launch(name, kernel, width, grid, args, tune_key, **constexprs) -> None:
    launch(name, kernel, _CONFIGS[name][width], grid, args, tune_key=tune_key, **constexprs)


def patch_embed_fwd_triton(pixels, weight, bias, cls_token, pos_embed, pixel_mean, pixel_std):
    """out [B, N, D] contiguous in weight's dtype; see the module docstring. The op validates."""
    _check_runnable(pixels, weight)
    batch, _, height, width = pixels.shape
    dim, _, patch, _ = weight.shape
    has_cls = cls_token is not None
    tokens = (height // patch) * (width // patch) + has_cls
    out = torch.empty((batch, tokens, dim), dtype=weight.dtype, device=weight.device)
    if out.numel() == 0:
        return out
    normalize, scale, shift = _normalization(pixels, pixel_mean, pixel_std)
    w2d = _weight_2d(weight)
    dummy = w2d  # stands for an absent bias / cls / pos (never read)
    pos = pos_embed if pos_embed is not None else dummy
    channels = weight.shape[1]
    rows = batch * tokens
    args = (
        pixels,
        w2d,
        bias if bias is not None else dummy,
        cls_token if has_cls else dummy,
        pos,
        scale,
        shift,
        out,
        rows,
        tokens,
        width // patch,
        channels,
        dim,
        *pixels.stride(),
        w2d.stride(0),
        pos.stride(0),
    )
    _launch(
        "patch_embed_fwd",
        _fwd_kernel,
        weight.dtype.itemsize,
        lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(dim, meta["BLOCK_N"])),
        args,
        ("channels", "D", "PATCH", "NORMALIZE"),
        PATCH=patch,
        PATCH_V=_padded(patch),
        HAS_CLS=has_cls,
        HAS_BIAS=bias is not None,
        HAS_POS=pos_embed is not None,
        NORMALIZE=normalize,
        INPUT_PRECISION=_PRECISION[weight.dtype.itemsize],
    )
    return out


def _weight_grad_splits(programs: int, patches_total: int, device: torch.device) -> int:
    """Splits of the B*Np reduction of dW: enough programs for two per SM, each split at least 4
    steps of the largest BLOCK_M."""
    return reduction_splits(programs, patches_total, 4 * _MAX_BLOCK_M, device)


def patch_embed_bwd_triton(
    grad_out, pixels, weight, pixel_mean, pixel_std, has_cls, need_pixels_grad, splits=None
):
    """``(grad_pixels or empty, grad_weight, grad_bias, grad_cls or empty, grad_pos)``, contiguous,
    for the output cotangent ``grad_out [B, N, D]`` (unit stride along D); weight-shaped grads in
    weight's dtype, grad_pixels in the pixels' dtype. ``splits`` overrides the number of B*Np ranges
    the weight gradient is reduced over (tests)."""
    _check_runnable(pixels, weight)
    batch, _, height, width = pixels.shape
    dim, _, patch, _ = weight.shape
    tokens = grad_out.shape[1]
    patches_per_image = (height // patch) * (width // patch)
    patches_total = batch * patches_per_image
    width_bytes = weight.dtype.itemsize
    precision = _PRECISION[width_bytes]
    device, dtype = weight.device, weight.dtype
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    grad_out = grad_out.to(dtype)
    w2d = _weight_2d(weight)
    k_total = w2d.shape[1]
    channels = weight.shape[1]
    normalize, scale, shift = _normalization(pixels, pixel_mean, pixel_std)
    common = dict(PATCH=patch, PATCH_V=_padded(patch), HAS_CLS=bool(has_cls), NORMALIZE=normalize)

    grad_pos = torch.empty((tokens, dim), dtype=dtype, device=device)
    if batch == 0 or tokens == 0 or dim == 0:
        grad_pos.zero_()
    else:
        _launch(
            "patch_embed_bwd_pos",
            _bwd_pos_kernel,
            width_bytes,
            lambda meta: (triton.cdiv(tokens, meta["BLOCK_T"]), triton.cdiv(dim, meta["BLOCK_D"])),
            (grad_out, grad_pos, batch, tokens, dim, grad_out.stride(0), grad_out.stride(1)),
            ("D",),
        )
    grad_cls = grad_pos[0].clone() if has_cls else grad_pos.new_empty(0)

    if patches_total == 0 or dim == 0 or k_total == 0:
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=device)
        grad_bias = torch.zeros(dim, dtype=dtype, device=device)
    else:
        if splits is None:
            programs = triton.cdiv(dim, 64) * _k_tiles(channels, patch, 64)
            splits = _weight_grad_splits(programs, patches_total, device)
        rows_per_split = (
            triton.cdiv(triton.cdiv(patches_total, splits), _MAX_BLOCK_M) * _MAX_BLOCK_M
        )
        splits = triton.cdiv(patches_total, rows_per_split)
        part_dtype = dtype if splits == 1 else torch.float32
        grad_w_parts = torch.empty((splits, dim, k_total), dtype=part_dtype, device=device)
        grad_b_parts = torch.empty((splits, dim), dtype=part_dtype, device=device)
        args = (
            grad_out,
            pixels,
            scale,
            shift,
            grad_w_parts,
            grad_b_parts,
            patches_total,
            rows_per_split,
            patches_per_image,
            width // patch,
            k_total,
            dim,
            grad_out.stride(0),
            grad_out.stride(1),
            *pixels.stride(),
        )
        _launch(
            "patch_embed_bwd_weight",
            _bwd_weight_kernel,
            width_bytes,
            lambda meta: (
                triton.cdiv(dim, meta["BLOCK_N"]),
                _k_tiles(channels, patch, meta["BLOCK_K"]),
                splits,
            ),
            args,
            ("K", "D", "PATCH", "NORMALIZE"),
            INPUT_PRECISION=precision,
            **common,
        )
        # A fixed-order sum of the float32 partials: deterministic.
        grad_weight = grad_w_parts.sum(0).to(dtype).reshape(weight.shape)
        grad_bias = grad_b_parts.sum(0).to(dtype)

    if not need_pixels_grad:
        grad_pixels = grad_pos.new_empty(0)
    elif pixels.dtype == torch.uint8:
        raise ValueError("patch_embed: uint8 pixels have no gradient")
    else:
        grad_pixels = torch.empty(pixels.shape, dtype=pixels.dtype, device=device)
        if patches_total and k_total:
            if dim == 0:
                grad_pixels.zero_()
            else:
                args = (
                    grad_out,
                    w2d,
                    scale,
                    grad_pixels,
                    patches_total,
                    patches_per_image,
                    width // patch,
                    dim,
                    grad_out.stride(0),
                    grad_out.stride(1),
                    w2d.stride(0),
                    *grad_pixels.stride(),
                )
                _launch(
                    "patch_embed_bwd_pixels",
                    _bwd_pixels_kernel,
                    width_bytes,
                    lambda meta: (
                        triton.cdiv(patches_total, meta["BLOCK_M"]),
                        _k_tiles(channels, patch, meta["BLOCK_K"]),
                    ),
                    args,
                    ("D", "PATCH", "NORMALIZE"),
                    INPUT_PRECISION=precision,
                    **common,
                )
    return grad_pixels, grad_weight, grad_bias, grad_cls, grad_pos


# ---- ahead-of-time compile report ---------------------------------------------------------------------

# Compiled by `python -m vlm_kernels.tools.gpu_report` for sm_80 and sm_90a. Per kernel and weight type
# (bf16 stands for both 16-bit types): every config at P = 14 and 16 with every epilogue term and the
# fused normalization of uint8 pixels (the most live values), and the first config at P = 8 and with
# float pixels of the weight's type un-normalized. The JIT sees what the model shapes give it: 16-byte
# aligned buffers; int32 sizes; strides and D multiples of 16 (D in 64..1280, W and H*W of 224/336/560
# images; the JIT specializes an int that is a multiple of 16 that way), except the weight's row stride
# C*P*P and K at P = 14 (588); a unit stride along the pixels' W (an int equal to 1 is a constant).
_AOT_WIDTHS = {"bf16": 2, "fp32": 4}


def _aot_signature(kernel, pointers: dict[str, str], patch: int | None) -> dict:
    """Pointers of the given types (16-byte aligned), the pixels' W stride as the constant 1, the
    other strides, D and rows_per_split int32 multiples of 16 (not the weight's C*P*P unless
    16 | P*P), every other argument int32."""
    unaligned_k = patch is not None and (patch * patch) % 16 != 0
    signature = {}
    for name, param in inspect.signature(kernel.fn).parameters.items():
        if "constexpr" in str(param.annotation):
            continue
        if name in pointers:
            signature[name] = f"*{pointers[name]}:16"
        elif name in ("stride_pw", "stride_xw"):
            signature[name] = 1
        elif name in ("stride_wd", "K"):
            signature[name] = "i32" if unaligned_k else "i32:16"
        elif name.startswith("stride_") or name in ("D", "rows_per_split"):
            signature[name] = "i32:16"
        else:
            signature[name] = "i32"
    return signature


def _register(name: str, kernel, pointers_for, variants_for) -> None:
    """``pointers_for(dtype, pixel_type)`` -> pointer types; ``variants_for(dtype)`` -> list of
    ``(label, pixel_type, constexprs, configs)``."""
    for dtype, width in _AOT_WIDTHS.items():
        configs = _CONFIGS[name][width]
        for label, pixel_type, constexprs, variant_configs in variants_for(dtype, configs):
            register_aot(
                kernel,
                name=f"{name}[{dtype},{label}]",
                signature=_aot_signature(
                    kernel, pointers_for(dtype, pixel_type), constexprs.get("PATCH")
                ),
                configs=variant_configs,
                constexprs={**constexprs, "INPUT_PRECISION": _PRECISION[width]}
                if "INPUT_PRECISION" in inspect.signature(kernel.fn).parameters
                else constexprs,
            )


def _gemm_variants(uint8_pixels: bool, **flags):
    def variants(dtype, configs):
        full = {"NORMALIZE": True, **flags}
        plain = {"NORMALIZE": False, **{key: False for key in flags}}
        pixel = "u8" if uint8_pixels else dtype

        def patch(p):
            return {"PATCH": p, "PATCH_V": _padded(p)}

        rows = [(f"{pixel},p{p}", pixel, {**patch(p), **full}, configs) for p in (14, 16)]
        rows.append((f"{pixel},p8", pixel, {**patch(8), **full}, configs[:1]))
        if uint8_pixels:
            rows.append((f"{dtype},p16,plain", dtype, {**patch(16), **plain}, configs[:1]))
        return rows

    return variants


_register(
    "patch_embed_fwd",
    _fwd_kernel,
    lambda dtype, pixel: {
        "pixels_ptr": pixel,
        **{p: dtype for p in ("weight_ptr", "bias_ptr", "cls_ptr", "pos_ptr", "out_ptr")},
        "scale_ptr": "fp32",
        "shift_ptr": "fp32",
    },
    _gemm_variants(True, HAS_CLS=True, HAS_BIAS=True, HAS_POS=True),
)
_register(
    "patch_embed_bwd_weight",
    _bwd_weight_kernel,
    lambda dtype, pixel: {
        "grad_ptr": dtype,
        "pixels_ptr": pixel,
        "scale_ptr": "fp32",
        "shift_ptr": "fp32",
        "dw_ptr": "fp32",
        "dbias_ptr": "fp32",
    },
    _gemm_variants(True, HAS_CLS=True),
)
_register(
    "patch_embed_bwd_pixels",
    _bwd_pixels_kernel,
    lambda dtype, pixel: {
        "grad_ptr": dtype,
        "weight_ptr": dtype,
        "scale_ptr": "fp32",
        "dx_ptr": pixel,
    },
    _gemm_variants(False, HAS_CLS=True),
)
_register(
    "patch_embed_bwd_pos",
    _bwd_pos_kernel,
    lambda dtype, pixel: {"grad_ptr": dtype, "dpos_ptr": dtype},
    lambda dtype, configs: [("any", dtype, {}, configs)],
)
