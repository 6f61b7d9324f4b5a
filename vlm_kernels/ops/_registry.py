"""Kernel tables: for each op, which backends have a forward (and backward) kernel.

Each op file fills its own table with the backends side by side, so adding a backend to an op is one
entry there; ``resolve_backend`` (in ``_backends``) turns a request into one of these names at call time,
inside the custom op, so the choice is invisible to ``torch.compile`` and never a graph break."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vlm_kernels._backends import _warn_once, resolve_backend

# Backward kernels tried, fastest first, for a CUDA-tensor backend that has a forward kernel only.
_GPU_BACKWARD_ORDER = ("triton", "cuda")


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
        """The backward kernel of the backend the forward ran on. A backend with a forward kernel but
        no backward kernel never falls back silently: it warns once per (op, backend), then on CUDA
        tensors runs the fastest GPU backward kernel that exists here (the dense reference backward
        would materialize [B, H, Lq, Lk]), elsewhere the reference backward."""
        name = self._backend(device, backend, dtype)
        if name in self.backward:
            return self.backward[name]
        substitute = "reference"
        if device.type == "cuda":
            for candidate in _GPU_BACKWARD_ORDER:
                if candidate in self.backward and self._usable(candidate, device, dtype):
                    substitute = candidate
                    break
        _warn_once(
            f"{self.op_name}: the {name!r} backend has no backward kernel; its gradients run on "
            f"the {substitute!r} backward"
        )
        return self.backward[substitute]

    def _usable(self, name: str, device: torch.device, dtype: torch.dtype | None) -> bool:
        """Whether backend ``name`` has a kernel for ``dtype`` that can run ``device`` tensors here."""
        if dtype is not None and dtype not in self.dtypes.get(name, (dtype,)):
            return False
        if not self.usable.get(name, lambda: True)():
            return False
        try:
            resolve_backend(self.op_name, [name], device, name)
        except ValueError:
            return False
        return True


TABLES: dict[str, KernelTable] = {}


def kernel_table(op_name: str) -> KernelTable:
    table = TABLES.setdefault(op_name, KernelTable(op_name))
    return table


def op_backends(op_name: str) -> list[str]:
    """Backends that have a kernel for ``op_name`` (whether or not they can run on this machine)."""
    if op_name not in TABLES:
        raise ValueError(f"unknown op {op_name!r}; ops: {sorted(TABLES)}")
    return list(TABLES[op_name].forward)
