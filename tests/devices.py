"""Where the op tests run: ``VLMK_TEST_DEVICE`` = "cpu" (default) or "cuda".

- cpu: CPU tensors; the triton backend runs through Triton's interpreter (TRITON_INTERPRET=1, set by
  tests/conftest.py before triton is imported), the CUDA kernels through the SIMT emulator (cuda_sim).
- cuda: CUDA tensors on the local GPU; the triton and cuda backends run for real, and the tests that
  only make sense on the CPU (the interpreter, the emulator, the C++ CPU kernels) skip with a reason.
  ``make gpu-check`` runs the suite this way.

Test modules use ``TEST_DEVICE`` for the tensors they build, ``GPU_BACKENDS`` for the backends that run
them, and the markers below to skip what cannot run there.
"""

from __future__ import annotations

import os

import pytest
import torch

TEST_DEVICE = os.environ.get("VLMK_TEST_DEVICE", "cpu").strip() or "cpu"
if TEST_DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"VLMK_TEST_DEVICE must be 'cpu' or 'cuda', got {TEST_DEVICE!r}")
ON_CUDA = TEST_DEVICE == "cuda"
if ON_CUDA and not torch.cuda.is_available():
    raise RuntimeError("VLMK_TEST_DEVICE=cuda but torch.cuda.is_available() is False")

# The backends that execute tensors on TEST_DEVICE (reference runs everywhere).
DEVICE_BACKENDS = (
    ("reference", "triton", "cuda") if ON_CUDA else ("reference", "cpu", "triton", "cuda_sim")
)

# Tests of a CPU-only tool (the interpreter's internals, the SIMT emulator, the C++ CPU kernels).
cpu_only = pytest.mark.skipif(
    ON_CUDA,
    reason="runs on the CPU only (interpreter / emulator / C++ CPU kernels); VLMK_TEST_DEVICE=cuda",
)
# Tests that need a real GPU.
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="needs VLMK_TEST_DEVICE=cuda and a GPU")


def run_without_avx512(script: str, timeout: float = 900) -> None:
    """Runs ``script`` in a fresh Python process with VLMK_CPU_NO_AVX512=1 (read once per process, so
    the C++ CPU kernels take their portable code there) and fails with its stderr if it fails."""
    import subprocess
    import sys

    env = dict(os.environ, VLMK_CPU_NO_AVX512="1")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]


def backends_for(op: str, *, include_reference: bool = True) -> list[str]:
    """The backends with a kernel for ``op`` that are available here, can run on this machine (the
    C++ CPU kernels need AVX-512) and run TEST_DEVICE tensors."""
    import vlm_kernels as vk
    from vlm_kernels.ops._registry import TABLES

    available = vk.available_backends()
    table = TABLES[op]
    return [
        b
        for b in DEVICE_BACKENDS
        if available[b]
        and b in table.forward
        and table.usable.get(b, lambda: True)()
        and (include_reference or b != "reference")
    ]
