"""Test-side fix for Triton 3.8's interpreter: ``tl.dot`` on bfloat16 operands.

The interpreter keeps bfloat16 tensors as their raw uint16 bits (numpy has no bfloat16), and its
``InterpreterBuilder.create_dot`` hands those bits straight to ``np.matmul``: a bf16 dot comes out
as the product of the integers behind the bits (relative error ~1e10; fp16 and fp32 are right). The
patch widens bf16 operands to float32 (exact: bf16 is the top half of an fp32) before the original
``create_dot`` runs, and rounds the result back to bf16 when the accumulator is bf16. Kernels are
not bent around the bug (DESIGN §4); tests call ``patch_interpreter_bf16_dot()`` (tests/conftest.py
does, once per session).
"""

from __future__ import annotations

import numpy as np

_PATCH_FLAG = "_vlmk_bf16_dot_patch"


def _bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def _fp32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF  # round to nearest, ties to even
    return ((bits + rounding) >> 16).astype(np.uint16)


def _builder_class():
    from triton.runtime.interpreter import InterpreterBuilder

    return InterpreterBuilder


def bf16_dot_patch_applied() -> bool:
    return getattr(_builder_class().create_dot, _PATCH_FLAG, False)


def patch_interpreter_bf16_dot() -> bool:
    """Patch the interpreter's dot (idempotent). True if this call applied the patch."""
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    builder = _builder_class()
    if bf16_dot_patch_applied():
        return False
    original = builder.create_dot

    def widen(handle):
        if handle.dtype == tl.bfloat16:
            return TensorHandle(_bf16_bits_to_fp32(handle.data), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype != tl.bfloat16 and b.dtype != tl.bfloat16:
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        out = original(self, widen(a), widen(b), widen(d), input_precision, max_num_imprecise_acc)
        if d.dtype == tl.bfloat16:
            return TensorHandle(_fp32_to_bf16_bits(out.data), tl.bfloat16)
        return out

    create_dot.__wrapped__ = original
    setattr(create_dot, _PATCH_FLAG, True)
    builder.create_dot = create_dot
    return True


def unpatch_interpreter_bf16_dot() -> bool:
    """Restore the interpreter's own dot. True if a patch was removed."""
    builder = _builder_class()
    if not bf16_dot_patch_applied():
        return False
    builder.create_dot = builder.create_dot.__wrapped__
    return True
