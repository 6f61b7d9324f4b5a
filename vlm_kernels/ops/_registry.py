"""Kernel tables: for each op, which backends have a forward (and backward) kernel.

Each op file fills its own table with the backends side by side, so adding a backend to an op is one
entry there; ``resolve_backend`` (in ``_backends``) turns a request into one of these names at call time,
inside the custom op, so the choice is invisible to ``torch.compile`` and never a graph break."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vlm_kernels._backends import resolve_backend


@dataclass
class KernelTable:
    op_name: str
    forward: dict[str, Callable] = field(default_factory=dict)
    backward: dict[str, Callable] = field(default_factory=dict)

    def forward_for(self, device: torch.device, backend: str) -> Callable:
        return self.forward[resolve_backend(self.op_name, self.forward, device, backend)]

    def backward_for(self, device: torch.device, backend: str) -> Callable:
        # The backward runs on the same backend as the forward would; an op whose backend has a forward
        # kernel but no backward kernel falls back to the reference backward.
        name = resolve_backend(self.op_name, self.forward, device, backend)
        return self.backward.get(name, self.backward["reference"])


TABLES: dict[str, KernelTable] = {}


def kernel_table(op_name: str) -> KernelTable:
    table = TABLES.setdefault(op_name, KernelTable(op_name))
    return table


def op_backends(op_name: str) -> list[str]:
    """Backends that have a kernel for ``op_name`` (whether or not they can run on this machine)."""
    if op_name not in TABLES:
        raise ValueError(f"unknown op {op_name!r}; ops: {sorted(TABLES)}")
    return list(TABLES[op_name].forward)
