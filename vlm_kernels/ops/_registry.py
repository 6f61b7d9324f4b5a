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
    # Backends whose kernels take only some dtypes (e.g. no float64); absent = every dtype.
    dtypes: dict[str, tuple[torch.dtype, ...]] = field(default_factory=dict)
    # Backends whose kernels need something of this machine (e.g. a CPU instruction set); absent = none.
    usable: dict[str, Callable[[], bool]] = field(default_factory=dict)

    def _backend(self, device: torch.device, backend: str, dtype: torch.dtype | None) -> str:
        kernels = [
            name
            for name in self.forward
            if (dtype is None or dtype in self.dtypes.get(name, (dtype,)))
            and self.usable.get(name, lambda: True)()
        ]
        what = self.op_name if dtype is None else f"{self.op_name} ({dtype})"
        return resolve_backend(what, kernels, device, backend)

    def forward_for(
        self, device: torch.device, backend: str, dtype: torch.dtype | None = None
    ) -> Callable:
        return self.forward[self._backend(device, backend, dtype)]

    def backward_for(
        self, device: torch.device, backend: str, dtype: torch.dtype | None = None
    ) -> Callable:
        # The backward runs on the backend the forward ran on; a backend with a forward kernel but no
        # backward kernel falls back to the reference backward.
        name = self._backend(device, backend, dtype)
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
