"""Shared checks of the drop-in integration tests: a patched model against the stock model, outputs
and every parameter's gradient under the DESIGN §6 policy (err(patched) <= 2 * err(stock float32) +
floor, both against the stock model in float64)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from tests.attention_testing import assert_within_policy


def _as_double(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.double()
    if isinstance(value, dict):
        return {key: _as_double(item) for key, item in value.items()}
    return value


def assert_patched_matches_stock(
    name: str,
    model: nn.Module,
    apply: Callable[[nn.Module], object],
    inputs: dict,
    output: Callable[[object], torch.Tensor],
    *,
    grads: bool = True,
) -> nn.Module:
    """Runs ``output(model(**inputs))`` on the stock model in float64 and float32 and on a patched
    copy in float32; compares the outputs and (``grads``) every parameter's gradient of a random
    projection of the output. Returns the patched copy."""
    model = model.float().eval()
    patched = copy.deepcopy(model)
    apply(patched)
    reference = copy.deepcopy(model).double()
    results = {}
    for key, module, args in (
        ("ref", reference, _as_double(inputs)),
        ("stock", model, inputs),
        ("ours", patched, inputs),
    ):
        module.zero_grad(set_to_none=True)
        out = output(module(**args))
        if grads:
            cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
            (out * cotangent.to(out.dtype)).sum().backward()
        results[key] = (out.detach(), dict(module.named_parameters()))
    assert_within_policy(
        name, results["ours"][0], results["stock"][0], results["ref"][0], torch.float32
    )
    if grads:
        checked = 0
        for param_name, param in results["ref"][1].items():
            if param.grad is None:
                continue
            ours = results["ours"][1][param_name].grad
            assert ours is not None, f"{name}: {param_name} got no gradient through the patch"
            assert_within_policy(
                f"{name} d{param_name}",
                ours,
                results["stock"][1][param_name].grad,
                param.grad,
                torch.float32,
            )
            checked += 1
        assert checked > 0, f"{name}: no parameter received a gradient"
    return patched
