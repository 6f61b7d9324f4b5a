"""NaN-poisoned allocations for kernel tests: an output element a kernel forgets to write stays NaN
and fails the comparison with the reference instead of passing on whatever memory held."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """ATen's ``empty`` (Python's ``torch.empty`` and the C++ kernels' outputs alike) returns
    NaN-filled tensors while active, through PyTorch's deterministic-mode fill of uninitialized
    memory; both settings are restored after."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill
