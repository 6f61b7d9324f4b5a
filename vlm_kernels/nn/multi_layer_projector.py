"""MultiLayerProjector: one Linear over the feature-axis concatenation of several hidden states (the
Llama 3.2 Vision ``multi_modal_projector``), on ``vlm_kernels.concat_project`` (no concat buffer).

    features: L tensors [..., D_l] -> [..., N];  out = concat(features, -1) @ weight.T + bias

Parameters ``weight [N, sum_l D_l]`` and ``bias [N]``: the names and shapes of the ``nn.Linear`` it
replaces, so that Linear's state dict loads as it is (columns ordered like the concatenation).

Loading Mllama's projector (``MllamaModel.multi_modal_projector``, a Linear(D * (1 + L), N)): Hugging
Face's ``MllamaVisionModel`` outputs ``cat([final, stack(intermediates, -1).reshape(..., D * L)], -1)``,
so the L intermediate layers (``intermediate_layers_indices``) are interleaved feature by feature:
column ``D + d * L + k`` holds feature d of intermediate layer k. ``MultiLayerProjector.from_mllama``
permutes the weight's columns once (``mllama_projector_weight``) so that the projector takes the
1 + L hidden states as separate sources, ``[final, layer_0, ..., layer_{L-1}]``, with no stack, reshape
or concatenation::

    projector = MultiLayerProjector.from_mllama(hf_model.model.multi_modal_projector, 1280, 5)
    out = projector([final_hidden_state, *intermediate_hidden_states])   # == HF's projector output
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

    @classmethod
    def from_mllama(
        cls,
        projector: nn.Linear,
        hidden_size: int,
        num_intermediate_layers: int,
        *,
        backend: str | None = None,
    ) -> MultiLayerProjector:
        """A projector over ``[final, layer_0, ..., layer_{L-1}]`` (each [..., hidden_size]) equal to
        Mllama's ``projector`` applied to HF's interleaved vision output (module docstring), its
        weight columns permuted once; same device and dtype as ``projector``."""
        sources = 1 + num_intermediate_layers
        module = cls(
            (hidden_size,) * sources,
            projector.out_features,
            bias=projector.bias is not None,
            backend=backend,
        ).to(device=projector.weight.device, dtype=projector.weight.dtype)
        with torch.no_grad():
            module.weight.copy_(
                mllama_projector_weight(projector.weight, hidden_size, num_intermediate_layers)
            )
            if projector.bias is not None:
                module.bias.copy_(projector.bias)
        return module

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


def mllama_projector_weight(
    weight: torch.Tensor, hidden_size: int, num_intermediate_layers: int
) -> torch.Tensor:
    """Mllama's projector weight [N, D * (1 + L)] (columns: the final hidden state's D features, then
    column ``D + d * L + k`` for feature d of intermediate layer k) with its columns reordered to the
    concatenation ``[final, layer_0, ..., layer_{L-1}]``: new column ``D + k * D + d`` is old column
    ``D + d * L + k``. A new tensor; ``weight`` is not modified."""
    layers = num_intermediate_layers
    if weight.dim() != 2 or weight.shape[1] != hidden_size * (1 + layers):
        raise ValueError(
            f"weight must be [N, hidden_size * (1 + num_intermediate_layers)] = "
            f"[N, {hidden_size * (1 + layers)}], got {tuple(weight.shape)}"
        )
    out_features = weight.shape[0]
    intermediate = weight[:, hidden_size:].reshape(out_features, hidden_size, layers)
    return torch.cat(
        [weight[:, :hidden_size], intermediate.transpose(1, 2).reshape(out_features, -1)], dim=1
    )
