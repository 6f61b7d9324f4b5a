"""Types shared by the benchmark registry: shapes, inputs, peers, op specs and providers.

A benchmark *case* is (op, shape, variant, dtype, mode). A *shape* is a named set of sizes taken
from a real model; a *variant* is the data-dependent part of the inputs (the media mask of
image_text_attention, uint8 vs float pixels of patch_embed, ...). Inputs are built lazily, only when
a case runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

MODES = ("fwd", "fwd_bwd")
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}


class ProviderUnavailable(Exception):
    """Raised by a provider's prepare step when it cannot run this case here (message: why)."""


@dataclass
class Inputs:
    """The inputs of one case, on its device.

    tensors: tensor arguments by their name in the public API (concat_project: a list of them).
    options: non-tensor keyword arguments (e.g. media_len).
    grad_inputs: the leaves that require grad in mode fwd_bwd (empty in mode fwd).
    """

    tensors: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    grad_inputs: tuple[torch.Tensor, ...] = ()


# Builds the inputs of a case: (shape, variant, dtype, device, seed, requires_grad) -> Inputs.
InputBuilder = Callable[["Shape", str, torch.dtype, torch.device, int, bool], Inputs]
# Prepares one provider for one case (mask conversion, compilation, ...), outside the timed region,
# and returns the timed forward: a zero-argument callable returning the op's output tensor.
Prepare = Callable[[Inputs], Callable[[], torch.Tensor]]


@dataclass(frozen=True)
class Shape:
    """A named problem size of one op; `params`: the sizes, `source`: where they come from."""

    op: str
    name: str
    params: Mapping[str, Any]
    variants: tuple[str, ...]
    modes: tuple[str, ...] = MODES
    source: str = ""

    def build(
        self,
        variant: str,
        dtype: torch.dtype,
        device: torch.device | str,
        seed: int = 0,
        requires_grad: bool = False,
    ) -> Inputs:
        """Build the seeded inputs (values drawn on the CPU, so equal on every device)."""
        from benchmarks.registry import get_op

        if variant not in self.variants:
            raise ValueError(
                f"shape {self.op}/{self.name} has no variant {variant!r}; "
                f"expected one of {self.variants}"
            )
        spec = get_op(self.op)
        return spec.make_inputs(self, variant, dtype, torch.device(device), seed, requires_grad)


@dataclass(frozen=True)
class Peer:
    """A PyTorch implementation of an op that ours is compared against.

    ceiling: not an implementation of the op but the bare work it cannot beat (e.g. ``torch.mm`` on
    already-unfolded patches): timed in the forward only, its output is not the op's and is not
    checked against it; it appears in the tables with kind "ceiling"."""

    name: str
    description: str
    prepare: Prepare
    ceiling: bool = False


@dataclass(frozen=True)
class OpSpec:
    """Everything the harness knows about one op."""

    name: str
    shapes: Mapping[str, Shape]
    make_inputs: InputBuilder
    # (inputs, backend) -> the output, through the public API
    call_ours: Callable[[Inputs, str], torch.Tensor]
    # (inputs, mode) -> floating point operations of one step
    flops: Callable[[Inputs, str], int]
    peers: tuple[Peer, ...]
    default_baseline: str
    variant_help: str = ""


@dataclass(frozen=True)
class Provider:
    """One way to run an op: ours through the public API with one backend, or a peer.

    unavailable: device -> None when it can run there, else the reason.
    opt_in: device -> True when the provider runs only if named in --providers (slow emulators).
    """

    name: str
    op: str
    kind: str  # "ours", "peer" or "ceiling"
    description: str
    prepare: Prepare
    unavailable: Callable[[torch.device], str | None]
    opt_in: Callable[[torch.device], bool] = lambda device: False


def seeded_generator(seed: int, salt: int = 0) -> torch.Generator:
    """A CPU generator: inputs are drawn on the CPU so they are equal on every device."""
    return torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + salt)


def randn(shape, generator, dtype, device, scale: float = 1.0, requires_grad: bool = False):
    """Seeded normal values (drawn in fp32 on the CPU) as a leaf tensor of `dtype` on `device`."""
    values = torch.randn(shape, generator=generator, dtype=torch.float32) * scale
    return values.to(device=device, dtype=dtype).requires_grad_(requires_grad)
