"""Session-wide test setup.

- TRITON_INTERPRET=1 before anything imports triton: the triton backend then runs CPU tensors through
  Triton's interpreter (DESIGN §4), and the interpreter's bf16 ``tl.dot`` fault is patched test-side.
  Not with VLMK_TEST_DEVICE=cuda (tests/devices.py): there the triton backend runs CUDA tensors on the GPU.
- Heavy cases are marked ``slow`` and deselected unless VLMK_SLOW_TESTS=1 (or ``-m slow`` is given).
"""

import os
import zlib

if os.environ.get("VLMK_TEST_DEVICE", "cpu") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from tests.devices import ON_CUDA, TEST_DEVICE
from tests.triton_interpreter import patch_interpreter_bf16_dot

if not ON_CUDA:
    patch_interpreter_bf16_dot()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("VLMK_SLOW_TESTS") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs in every test, reproducible from the test's id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture
def tensors_on_test_device():
    """Factory calls without a device (torch.randn(2, 3)) build TEST_DEVICE tensors (tests/devices.py).
    A module opts in with ``pytestmark = pytest.mark.usefixtures("tensors_on_test_device")``."""
    with torch.device(TEST_DEVICE):
        yield
