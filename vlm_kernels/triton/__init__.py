"""Triton kernels (GPU; CPU tensors only under ``TRITON_INTERPRET=1``, the Triton interpreter).

One op per module; each module registers its kernels for the ahead-of-time compile report with
``vlm_kernels.triton.aot.register_aot``. Importing this package imports neither triton nor the
kernel modules: ``import triton`` happens when a kernel module is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"block_chunk_schedule_triton": "vlm_kernels.triton.block_chunk_schedule"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
