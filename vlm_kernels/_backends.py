"""Which backends exist on this machine, and which one an op call runs on.

One place for the environment switches the Python side reads:
  VLMK_BACKEND      overrides ``backend=None``/``"auto"`` for every op (falls back to auto, with a warning,
                    for an op that has no kernel for that backend or a backend that cannot run the tensors).
  TRITON_INTERPRET  "1" lets the triton backend run CPU tensors through Triton's interpreter (tests).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Iterable

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda", "cuda_sim")

# Order in which "auto" tries backends, per tensor device. The emulator and the Triton interpreter are
# correctness tools and never chosen automatically.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


@functools.cache
def _extension():
    """The compiled extension ``vlm_kernels._C``, or the reason it cannot be imported."""
    try:
        from vlm_kernels import _C
    except ImportError as error:  # not built, or built against another torch
        return None, f"vlm_kernels._C is not importable ({error}); run `make build`"
    return _C, ""


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe() -> dict[str, tuple[bool, str]]:
    """{backend: (available, reason-if-not or a note)}; cheap enough to call per op (cached pieces)."""
    ext, ext_reason = _extension()
    status: dict[str, tuple[bool, str]] = {"reference": (True, "PyTorch composition (the spec)")}
    status["cpu"] = (True, "C++ kernels in vlm_kernels._C") if ext else (False, ext_reason)
    if ext is None:
        status["cuda"] = (False, ext_reason)
        status["cuda_sim"] = (False, ext_reason)
    else:
        if ext.built_with_cuda():
            note = f"compiled for sm_{', sm_'.join(ext.cuda_archs().split(';'))}"
            if not torch.cuda.is_available():
                note += (
                    "; no CUDA device here (the cuda_sim backend runs the same source on the CPU)"
                )
            status["cuda"] = (True, note)
        else:
            status["cuda"] = (
                False,
                "extension built without CUDA (VLMK_SKIP_CUDA_BUILD=1 or no nvcc)",
            )
        status["cuda_sim"] = (True, "CUDA kernels' source run on the CPU by the SIMT emulator")
    if not _triton_installed():
        status["triton"] = (False, "triton is not installed")
    elif torch.cuda.is_available():
        status["triton"] = (True, "GPU")
    elif triton_interpreter_enabled():
        status["triton"] = (True, "CPU tensors through the Triton interpreter (TRITON_INTERPRET=1)")
    else:
        status["triton"] = (False, "no CUDA device; set TRITON_INTERPRET=1 to run the interpreter")
    return status


def available_backends() -> dict:
    """``{"reference": True, "cpu": bool, "triton": bool, "cuda": bool, "cuda_sim": bool,
    "reasons": {backend: why it is missing}, "notes": {backend: what it runs on}}``.

    ``cuda`` means the CUDA kernels are compiled into the extension; running them needs CUDA tensors.
    """
    status = _probe()
    result: dict = {name: status[name][0] for name in BACKENDS}
    result["reasons"] = {name: why for name, (ok, why) in status.items() if not ok}
    result["notes"] = {name: note for name, (ok, note) in status.items() if ok}
    return result


def _runs_on(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` can execute tensors living on ``device``."""
    if backend in ("reference",):
        return True
    if backend in ("cpu", "cuda_sim"):
        return device.type == "cpu"
    if backend == "cuda":
        return device.type == "cuda"
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreter_enabled())
    return False


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve_backend(
    op: str, kernels: Iterable[str], device: torch.device, backend: str | None
) -> str:
    """The backend that runs ``op`` for tensors on ``device``.

    ``kernels``: the backends that have a kernel for this op. An explicit ``backend`` is strict (a clear
    ``ValueError`` if it cannot run here); ``None``/``"auto"`` honours ``VLMK_BACKEND`` when it can, else
    picks the first of ``_AUTO_ORDER`` that has a kernel and is available.
    """
    kernels = tuple(kernels)
    status = _probe()
    if backend is not None and backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(
                f"backend must be one of {('auto', *BACKENDS)} or None, got {backend!r}"
            )
        if backend not in kernels:
            raise ValueError(
                f"{op} has no {backend!r} kernel yet; backends with a kernel: {kernels}"
            )
        available, why = status[backend]
        if not available:
            raise ValueError(f"backend {backend!r} is not available: {why}")
        if not _runs_on(backend, device):
            raise ValueError(f"backend {backend!r} cannot run {device.type} tensors ({op})")
        return backend

    requested = os.environ.get("VLMK_BACKEND", "").strip()
    if requested and requested != "auto":
        if (
            requested in kernels
            and status.get(requested, (False, ""))[0]
            and _runs_on(requested, device)
        ):
            return requested
        _warn_once(
            f"VLMK_BACKEND={requested!r} cannot run {op} on {device.type} tensors; using auto instead"
        )
    for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
        if candidate in kernels and status[candidate][0]:
            return candidate
    return "reference"
