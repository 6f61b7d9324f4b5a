"""pytest-benchmark of every provider of every op at the `tiny` shapes (fp32, CPU or CUDA).

    pytest benchmarks/ --benchmark-only                      # all
    pytest benchmarks/ --benchmark-only -k image_text        # one op
    pytest benchmarks/ --benchmark-only --benchmark-group-by=group

Not collected by the default test run (pytest's testpaths is tests/). Providers that cannot run
here are skipped with the reason; the first call (compilation, lazy init) happens before timing.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import registry
from benchmarks.runner import make_step
from benchmarks.spec import ProviderUnavailable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

CASES = [
    pytest.param(op, provider.name, mode, id=f"{op}-{provider.name}-{mode}")
    for op in registry.OPS
    for provider in registry.providers(op)
    for mode in registry.get_shape(op, "tiny").modes
]


@pytest.mark.parametrize(("op", "provider_name", "mode"), CASES)
def test_tiny(benchmark, op, provider_name, mode):
    provider = registry.get_provider(op, provider_name)
    reason = provider.unavailable(DEVICE)
    if reason is not None:
        pytest.skip(reason)
    shape = registry.get_shape(op, "tiny")
    inputs = shape.build(shape.variants[0], torch.float32, DEVICE, requires_grad=mode == "fwd_bwd")
    try:
        step = make_step(provider.prepare(inputs), inputs, mode)
    except ProviderUnavailable as exc:
        pytest.skip(str(exc))
    step()
    benchmark.group = f"{op}-tiny-{shape.variants[0]}-{mode}"
    if DEVICE.type == "cuda":

        def synced():
            step()
            torch.cuda.synchronize()

        benchmark(synced)
    else:
        benchmark(step)
