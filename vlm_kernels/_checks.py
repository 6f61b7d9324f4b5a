"""Argument checks shared by the ops. Each raises ``TypeError`` (wrong kind or dtype) or ``ValueError``
(wrong shape, device, layout or value) with a message that names the argument, what it saw and what was
expected. The ops call these from their public function, once per call, before any backend runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlm_kernels._backends import BACKENDS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_backend(backend: str | None) -> str:
    """Normalises ``backend`` to a string the custom ops carry ("auto" for None)."""
    if backend is None:
        return "auto"
    if not isinstance(backend, str) or backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be None, 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


def check_tensor(
    name: str,
    value,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    shape_doc: str = "",
) -> torch.Tensor:
    """``value`` is a tensor of rank ``ndim`` with a dtype in ``dtypes`` and, where ``shape`` gives an int,
    that size in that dimension. ``shape_doc`` (e.g. "[B, Lq, Hq, Dh]") is quoted in errors."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    doc = f" {shape_doc}" if shape_doc else ""
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions{doc}, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {value.dtype}")
    if shape is not None:
        for dim, (want, got) in enumerate(zip(shape, value.shape, strict=True)):
            if want is not None and want != got:
                expected = ", ".join("*" if s is None else str(s) for s in shape)
                raise ValueError(
                    f"{name} must have shape ({expected}){doc}, got {tuple(value.shape)} "
                    f"(dimension {dim})"
                )
    return value


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors (None skipped) live on one device; returns it."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return next(iter(present.values())).device


def check_same_dtype(**tensors: torch.Tensor | None) -> torch.dtype:
    """All given tensors (None skipped) share one dtype; returns it."""
    present = {name: t for name, t in tensors.items() if t is not None}
    dtypes = {t.dtype for t in present.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{name} is {t.dtype}" for name, t in present.items())
        raise TypeError(f"tensors must share one dtype, got {listing}")
    return next(iter(present.values())).dtype


def check_last_dim_contiguous(**tensors: torch.Tensor) -> None:
    """Kernels read rows with unit stride; other strides are free (e.g. slices of a fused qkv tensor)."""
    for name, t in tensors.items():
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(
                f"{name} must have a contiguous last dimension (stride(-1) == 1), got strides "
                f"{tuple(t.stride())}; call .contiguous() first"
            )


def check_head_dim(name: str, tensor: torch.Tensor, shape_doc: str) -> int:
    """The last dim of ``tensor`` is a head dim of at least 1 (the default scale is ``Dh ** -0.5``)."""
    head_dim = tensor.shape[-1]
    if head_dim < 1:
        raise ValueError(
            f"{name} must have a head dim Dh >= 1 {shape_doc}, got shape {tuple(tensor.shape)}"
        )
    return head_dim
