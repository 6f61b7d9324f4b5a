"""MultiLayerProjector: one Linear over the feature-axis concatenation of several hidden states (the
Llama 3.2 Vision ``multi_modal_projector``), on ``vlm_kernels.concat_project`` (no concat buffer).

    features: L tensors [..., D_l] -> [..., N];  out = concat(features, -1) @ weight.T + bias

Parameters ``weight [N, sum_l D_l]`` and ``bias [N]``: the names and shapes of the ``nn.Linear`` it
replaces, so that Linear's state dict loads as it is (columns ordered like the concatenation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

import vlm_kernels as vk
from vlm_kernels.nn._autocast import autocast_dtype, cast


class MultiLayerProjector(nn.Module):
    def __init__(
        self,
        in_features: Sequence[int],
        out_features: int,
        bias: bool = True,
        *,
        backend: str | None = None,
    ):
        super().__init__()
        self.in_features = tuple(int(d) for d in in_features)
        if not self.in_features or min(self.in_features) < 1:
            raise ValueError(
                f"in_features must list one positive size per input, got {in_features}"
            )
        self.out_features = out_features
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(out_features, sum(self.in_features)))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialization for a Linear(sum D_l, N)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight.shape[1])
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """features: L tensors [..., D_l] with D_l = in_features[l] -> [..., out_features]."""
        sizes = tuple(f.shape[-1] for f in features)
        if sizes != self.in_features:
            raise ValueError(
                f"expected {len(self.in_features)} features with last dims {self.in_features}, got "
                f"{len(sizes)} with shapes {[tuple(f.shape) for f in features]}"
            )
        dtype = autocast_dtype(features[0].device)
        return vk.concat_project(
            [cast(f, dtype) for f in features],
            cast(self.weight, dtype),
            cast(self.bias, dtype),
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, backend={self.backend!r}"
        )
