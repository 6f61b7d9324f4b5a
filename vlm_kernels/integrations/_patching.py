"""Instance patching with an undo record: the one mechanism every integration uses.

A patch sets attributes on one module *instance* (its ``__dict__``), never on a class, so other
instances, the class and torch are untouched. The attributes the instance had before are recorded on
the instance itself, so a revert restores exactly what was there (a class attribute shows through
again once the instance attribute is removed).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from torch import nn

_RECORD = "_vlmk_patched"
_ABSENT = object()


def patch_instance(module: nn.Module, **attributes: Any) -> None:
    """Sets ``attributes`` on ``module``; functions are bound to it as methods (``forward`` etc.).

    Patching an attribute twice keeps the first original, so a revert always goes back to the
    unpatched module."""
    record: dict[str, Any] = module.__dict__.setdefault(_RECORD, {})
    for name, value in attributes.items():
        if name not in record:
            record[name] = module.__dict__.get(name, _ABSENT)
        if isinstance(value, types.FunctionType):
            value = types.MethodType(value, module)
        # object.__setattr__: nn.Module.__setattr__ would file a module/parameter value in its own
        # registries; these are plain attributes (methods, caches).
        object.__setattr__(module, name, value)


def revert_instance(module: nn.Module) -> bool:
    """Undoes ``patch_instance`` on ``module``; returns whether it had been patched."""
    record = module.__dict__.pop(_RECORD, None)
    if record is None:
        return False
    for name, original in record.items():
        if original is _ABSENT:
            module.__dict__.pop(name, None)
        else:
            object.__setattr__(module, name, original)
    return True


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` carries patched attributes."""
    return _RECORD in module.__dict__


def revert_tree(model: nn.Module) -> int:
    """Reverts every patched module under (and including) ``model``; returns how many were."""
    return sum(revert_instance(module) for module in model.modules())


def patch_matching(
    model: nn.Module, predicate: Callable[[nn.Module], bool], patch: Callable[[nn.Module], None]
) -> int:
    """Applies ``patch`` to every module under ``model`` for which ``predicate`` holds; the count."""
    matches = [module for module in model.modules() if predicate(module)]
    for module in matches:
        patch(module)
    return len(matches)
