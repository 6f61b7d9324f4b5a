"""How the modules of ``vlm_kernels.nn`` behave under ``torch.autocast``.

The ops are custom ops, which autocast passes through untouched, and they want one dtype for all their
float inputs. So each module casts its float inputs and parameters to the autocast dtype itself, the way
``nn.Linear`` runs in bf16 under ``torch.autocast("cpu", torch.bfloat16)``; outside autocast nothing is cast.
"""

from __future__ import annotations

import torch


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for ``device``'s type, or None when autocast is off there."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def cast(tensor: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """``tensor`` in ``dtype`` when both are given and the tensor is floating point; else as it is."""
    if tensor is None or dtype is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)
