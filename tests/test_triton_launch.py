"""The shared Triton launcher (vlm_kernels/triton/_launch.py): ``force_triton_config`` runs the chosen
config of the list a kernel is launched with (clamped to its length, nested, restored on exit) and
``triton_config_counts`` lists every kernel of the package with its longest list. Runs through the
interpreter here and compiled on a GPU (VLMK_TEST_DEVICE=cuda), where forcing bypasses the autotuner.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from tests.devices import ON_CUDA, TEST_DEVICE

triton = pytest.importorskip("triton")
if not ON_CUDA and not triton.knobs.runtime.interpret:
    pytest.skip(
        "TRITON_INTERPRET=1 was not set before triton was imported", allow_module_level=True
    )

import triton.language as tl  # noqa: E402

from vlm_kernels.triton import _launch  # noqa: E402
from vlm_kernels.triton._launch import (  # noqa: E402
    declare_configs,
    force_triton_config,
    launch,
    triton_config_counts,
)


@triton.jit
def _which_config_kernel(out_ptr, TAG: tl.constexpr, BLOCK: tl.constexpr):
    # Every program writes its config's TAG (and the block size it ran with) into its slot.
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + pid * BLOCK + offs, tl.full((BLOCK,), TAG, dtype=tl.int32))


_NAME = "test_which_config"
_CONFIGS = tuple(
    triton.Config({"TAG": tag, "BLOCK": block}, num_warps=warps, num_stages=1)
    for tag, block, warps in ((10, 16, 1), (11, 32, 2), (12, 16, 4))
)


@pytest.fixture(autouse=True, scope="module")
def _declared_test_kernel():
    """The test kernel is declared while this module runs only: triton_config_counts() in the same
    process (gpu_check --dry-run) lists the package's kernels alone."""
    declare_configs(_NAME, _CONFIGS, _CONFIGS[:2])
    yield
    _launch._declared.pop(_NAME, None)


def _run(configs=_CONFIGS) -> torch.Tensor:
    """The TAG of the config the launch ran (the grid depends on the config's BLOCK)."""
    out = torch.full((64,), -1, dtype=torch.int32, device=TEST_DEVICE)
    launch(
        _NAME,
        _which_config_kernel,
        configs,
        lambda meta: (64 // meta["BLOCK"],),
        (out,),
        tune_key=(),
    )
    tags = set(out.tolist())
    assert len(tags) == 1, f"the grid did not follow the config's BLOCK: {out.tolist()}"
    return tags.pop()


def test_forced_index_runs_that_config_clamped_to_the_list():
    for index in range(5):
        with force_triton_config(_NAME, index):
            assert _run() == 10 + min(index, 2)
            assert _run(_CONFIGS[:2]) == 10 + min(index, 1)


def test_forcing_nests_and_restores():
    with force_triton_config(_NAME, 2):
        with force_triton_config(_NAME, 1):
            assert _run() == 11
        assert _run() == 12
    assert _launch._forced.get(_NAME) is None


def test_test_kernel_is_counted_while_declared():
    assert triton_config_counts()[_NAME] == 3


@pytest.mark.skipif(ON_CUDA, reason="on a GPU an unforced launch is autotuned")
def test_unforced_interpreter_launch_runs_the_first_config():
    assert _run() == 10


def test_unknown_kernel_and_negative_index_are_refused():
    with pytest.raises(ValueError, match="unknown kernel"), force_triton_config("no_such", 0):
        pass
    with pytest.raises(ValueError, match=">= 0"), force_triton_config(_NAME, -1):
        pass


def test_undeclared_launch_is_refused():
    with pytest.raises(RuntimeError, match="not declared"):
        launch("never_declared", _which_config_kernel, _CONFIGS, lambda meta: (1,), (), tune_key=())


def test_config_counts_cover_every_kernel_of_the_package():
    """Names and lengths come from each module's own lists (so the gpu_check walks them all)."""
    from vlm_kernels.triton import block_chunk_schedule as bcs
    from vlm_kernels.triton import image_text_attention as ita

    counts = triton_config_counts()
    assert counts["block_chunk_schedule"] == len(bcs._CONFIGS)
    per_width = [ita._kernel_configs(tiles) for tiles in ita._TILES.values()]
    for name in per_width[0]:
        assert counts[name] == max(len(lists[name]) for lists in per_width)
    assert counts["image_text_attention_fwd"] == len(ita._FWD_CONFIGS[64]) + len(
        ita._FWD_CONFIGS[128]
    )
