"""The shipped CUDA kernels under the SIMT emulator's hardening: the shared-memory race checker
(SIMT_RACECHECK) and other thread schedules (SIMT_SCHEDULE=random with several seeds).

The emulator reads SIMT_* from the environment once per process, so these tests switch the settings
through ``_C.simt_set_config`` for the duration of a test and restore them after. Shared memory is
poisoned (0xff bytes, NaN) at every block start whatever the settings, so an uninitialized shared
read shows up as a NaN that the reference comparison rejects. The probe test proves, in this very
extension, that the race checker reports a planted race and that it is off by default; the
C++-level proof of each detector is the ctest suite (csrc/simt/tests/test_racecheck.cpp).
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlm_kernels as vk
from tests.attention_testing import check_against_reference, make_case
from tests.devices import cpu_only
from vlm_kernels.ops.image_text_attention import TABLE

pytestmark = cpu_only  # the emulator runs on the CPU; VLMK_TEST_DEVICE=cuda runs the real kernels

_C = pytest.importorskip("vlm_kernels._C")
forward = TABLE.forward["cuda_sim"]
ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def simt_settings(**settings):
    """The emulator's settings for the launches inside the block, restored after it."""
    previous = _C.simt_set_config(**settings)
    try:
        yield
    finally:
        _C.simt_set_config(**previous)


@pytest.fixture(autouse=True)
def _poison_outputs():
    """In deterministic mode ``at::empty`` fills float tensors with NaN: unwritten outputs show up."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def test_race_probe_is_reported_only_with_the_checker():
    with simt_settings(racecheck=False, schedule="forward"):
        message, first = _C.simt_race_probe()
        assert message == ""
        assert math.isnan(first), "thread 0 read its neighbour's slot before the write: poison"
    with simt_settings(racecheck=True, schedule="forward"):
        message, _ = _C.simt_race_probe()
    assert "race (write-read)" in message or "race (read-write)" in message, message
    assert "race_probe_kernel" in message
    assert "block (0,0,0)" in message
    assert "static shared 'slots'" in message
    assert _C.simt_config()["racecheck"] is False  # restored


def test_settings_come_from_the_environment():
    env = dict(os.environ, SIMT_RACECHECK="1", SIMT_SCHEDULE="random", SIMT_SEED="42")
    code = "from vlm_kernels import _C; c = _C.simt_config(); print(c['racecheck'], c['schedule'], c['seed'])"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "random", "42"]


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown SIMT schedule"):
        _C.simt_set_config(schedule="sideways")
    assert _C.simt_config()["schedule"] != "sideways"


# (batch, Lq, Hq, Hkv, Dh, chunks, media_len, mask kind, empty_rows): prefill (Lq > 16) with a
# partial last slot tile, GQA/MQA, several blocks and both empty-row modes; decode (Lq <= 16) with a
# single split and with several splits + the combine kernel (the emulated device has 132 SMs: few
# blocks, many splits, most of them empty when few key tiles are visible), and more than one slot
# tile of 64 rows per decode block (Lq * G > 64). The tensor-core kernels double-buffer K/V with
# cp.async: a missing wait reads poison, a missing barrier around a stage is a reported race.
ATTENTION_CASES = [
    (1, 33, 8, 2, 64, 3, 17, "random", "zero"),
    (1, 20, 4, 4, 80, 2, 33, "runs", "uniform"),
    (1, 5, 8, 2, 64, 4, 65, "random", "zero"),
    (2, 1, 4, 1, 96, 3, 40, "random", "uniform"),
    (1, 16, 4, 4, 128, 1, 20, "all", "zero"),
    (1, 97, 4, 1, 96, 3, 17, "gappy", "zero"),
    (1, 2, 8, 2, 80, 12, 33, "runs", "uniform"),
    (1, 9, 32, 4, 64, 2, 40, "random", "zero"),
]


def _attention_id(case):
    batch, lq, hq, hkv, dh, chunks, media_len, kind, empty = case
    path = "decode" if lq <= 16 else "prefill"
    return f"{path}-B{batch}-Lq{lq}-H{hq}-{hkv}-D{dh}-M{chunks}x{media_len}-{kind}-{empty}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=_attention_id)
def test_image_text_attention_is_race_free(case, dtype):
    *dims, kind, empty_rows = case
    attention = make_case(*dims, dtype=dtype, mask_kind=kind, empty_rows=empty_rows)
    with simt_settings(racecheck=True):
        check_against_reference(attention, forward)


def test_unaligned_inputs_are_race_free():
    """q/k/v off 16-byte alignment: K/V tiles are staged by plain element stores instead of cp.async
    (still committed as a group), under the checker."""
    case = make_case(1, 20, 4, 2, 64, 3, 17, dtype=torch.float16)
    wide = torch.randn(2, 51, 2, 65).to(torch.float16)
    wide[0, :, :, 1:] = case.k
    wide[1, :, :, 1:] = case.v
    case.k, case.v = wide[0:1, :, :, 1:], wide[1:2, :, :, 1:]
    assert case.k.data_ptr() % 16 != 0
    with simt_settings(racecheck=True):
        check_against_reference(case, forward)


# Every thread order must give the right answer; the checker stays on (a race it would report
# under one order is a race under all).
SCHEDULES = [("random", 1), ("random", 2), ("random", 3), ("reverse", 0)]


@pytest.mark.parametrize("schedule,seed", SCHEDULES, ids=lambda v: str(v))
def test_image_text_attention_under_other_schedules(schedule, seed):
    with simt_settings(racecheck=True, schedule=schedule, seed=seed, num_threads=1):
        for case in (ATTENTION_CASES[0], ATTENTION_CASES[2]):
            *dims, kind, empty_rows = case
            attention = make_case(*dims, dtype=torch.float16, mask_kind=kind, empty_rows=empty_rows)
            check_against_reference(attention, forward)


@pytest.mark.parametrize("schedule,seed", [("alternate", 0), *SCHEDULES], ids=lambda v: str(v))
def test_block_chunk_schedule_race_free_under_schedules(schedule, seed):
    generator = torch.Generator().manual_seed(seed)
    # 300 chunks: three tiles of 128 threads, so the running offset carries across tiles.
    mask = torch.rand(2, 45, 300, generator=generator) < 0.05
    mask[:, :8] = False  # a query block that sees nothing
    want_count, want_ids = vk.block_chunk_schedule(mask, 16, backend="reference")
    with simt_settings(racecheck=True, schedule=schedule, seed=seed):
        count, ids = vk.block_chunk_schedule(mask, 16, backend="cuda_sim")
    assert torch.equal(count, want_count)
    assert torch.equal(ids, want_ids)


# perceiver_attention, forward and backward (dk/dv + dq passes, the preprocess): two segments with
# partial tiles in both (Nm 37 / Nl 8: a key tile of 32 and a dk/dv block of 64 cut short), a padded
# media item and an all-padding one, GQA (the dk/dv block walks the group's heads), Nl 70 (two
# query blocks of 64 rows, three dk/dv steps of 32), and strided views: aligned slices of fused
# tensors (cp.async) and unaligned ones (plain loads, whose stores race at once with a missing
# barrier; a cp.async write is recorded at its wait).
PERCEIVER_CASES = [
    # (batch, Nl, Nm, Hq, Hkv, Dh, strided)
    (2, 8, 37, 4, 2, 64, None),
    (1, 70, 5, 2, 1, 80, None),
    (1, 8, 21, 2, 1, 64, "fused"),
    (1, 8, 37, 2, 1, 64, "unaligned"),
]


def _perceiver_race_check(case, dtype):
    from tests.test_perceiver_attention_cuda_sim import check_case, make_inputs

    batch, num_latents, num_media, heads_q, heads_kv, head_dim, strided = case
    inputs = make_inputs(
        batch, num_latents, num_media, heads_q, heads_kv, head_dim, dtype, strided=strided
    )
    mask = torch.rand(batch, num_media) < 0.5
    mask[0, 0] = True
    mask[-1] = False if batch > 1 else mask[-1]
    check_case(inputs, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", PERCEIVER_CASES, ids=lambda c: "-".join(map(str, c)))
def test_perceiver_attention_is_race_free(case, dtype):
    with simt_settings(racecheck=True):
        _perceiver_race_check(case, dtype)


@pytest.mark.parametrize("schedule,seed", SCHEDULES, ids=lambda v: str(v))
def test_perceiver_attention_under_other_schedules(schedule, seed):
    with simt_settings(racecheck=True, schedule=schedule, seed=seed, num_threads=1):
        _perceiver_race_check(PERCEIVER_CASES[0], torch.float16)
