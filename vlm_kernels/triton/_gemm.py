"""Pieces the Triton GEMM kernels share: config lists, the dot precision per input width, and how
many ranges a reduction over rows (a weight gradient) is cut into."""

from __future__ import annotations

import functools

import torch
import triton

# tl.dot input_precision per input width in bytes (ignored for 16-bit operands). float32: 3xTF32, the
# high and low TF32 parts of each operand in three MMAs: one TF32 rounding (10 mantissa bits) leaves
# ~1e-4 to 1e-3 relative error on long dots, far over the float32 tolerance; 3xTF32 keeps float32-grade
# error (~1e-6) at a third of the tensor-core rate, still above the FMA rate of "ieee".
DOT_PRECISION = {2: "tf32", 4: "tf32x3"}


def gemm_configs(*shapes) -> tuple[triton.Config, ...]:
    """One config per ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)``."""
    return tuple(
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    )


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def reduction_splits(programs: int, rows: int, min_rows: int, device: torch.device) -> int:
    """Ranges a reduction over ``rows`` is cut into so that ``programs`` programs per range fill the
    GPU twice over (a pretend GPU of 2 SMs under the interpreter), each range at least ``min_rows``
    rows, at most 64 ranges."""
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 2
    wanted = triton.cdiv(2 * sms, max(programs, 1))
    return max(1, min(wanted, triton.cdiv(rows, min_rows), 64))
