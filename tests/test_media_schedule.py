"""vk.MediaSchedule: identical results to the plain-mask call on every backend (forward and gradients),
the schedules it caches equal the Triton schedule kernel's, the launchers read them instead of
rebuilding, validation, torch.compile(fullgraph=True); and the Triton tuning policy: bucketed tuning
keys (a bounded number of tuning passes over image counts and decode lengths), no autotuner and no
device-to-host sync on the decode path."""

import pytest
import torch

import vlm_kernels as vk
import vlm_kernels.triton.image_text_attention as ita
from tests.devices import ON_CUDA, TEST_DEVICE, backends_for
from vlm_kernels.ops.media_schedule import one_block_schedule
from vlm_kernels.triton import _launch
from vlm_kernels.triton.block_chunk_schedule import block_chunk_schedule_triton

pytestmark = pytest.mark.usefixtures("tensors_on_test_device")


def _inputs(batch=2, query_len=7, heads_q=4, heads_kv=2, head_dim=16, chunks=3, media_len=5):
    dev = TEST_DEVICE
    q = torch.randn(batch, query_len, heads_q, head_dim, device=dev, requires_grad=True)
    k = torch.randn(batch, chunks * media_len, heads_kv, head_dim, device=dev, requires_grad=True)
    v = torch.randn(batch, chunks * media_len, heads_kv, head_dim, device=dev, requires_grad=True)
    mask = torch.rand(batch, query_len, chunks, device=dev) > 0.5
    mask[0, 0] = False  # a row that sees nothing
    if batch > 1 and chunks > 1:
        mask[1, :, 1] = False  # a chunk nobody of batch 1 sees
    return q, k, v, mask, media_len


def _forward_backward(q, k, v, mask, **kwargs):
    out = vk.image_text_attention(q, k, v, mask, **kwargs)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), (q, k, v))
    return out, *grads


# ---- identical results on every backend -----------------------------------------------------------


@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
@pytest.mark.parametrize("query_len", [5, 40])  # the decode path and the prefill path
@pytest.mark.parametrize("backend", backends_for("image_text_attention"))
def test_schedule_gives_identical_results(backend, query_len, empty_rows):
    head_dim = 64 if backend in ("cuda", "cuda_sim") else 16  # the compiled kernels' head dims
    q, k, v, mask, media_len = _inputs(query_len=query_len, head_dim=head_dim)
    plain = _forward_backward(
        q, k, v, mask, media_len=media_len, empty_rows=empty_rows, backend=backend
    )
    schedule = vk.MediaSchedule(mask, media_len=media_len, empty_rows=empty_rows)
    for _ in range(2):  # the second call reads the cached schedules
        shared = _forward_backward(q, k, v, schedule, backend=backend)
        for expected, got in zip(plain, shared, strict=True):
            assert torch.equal(expected, got)


def test_schedule_contents_equal_the_schedule_kernel():
    mask = torch.rand(2, 70, 5, device=TEST_DEVICE) > 0.6
    mask[1, 10:50] = False
    schedule = vk.MediaSchedule(mask, media_len=3)
    for block in (16, 32, 64, 70, 128):
        count, ids = schedule.chunk_schedule(block)
        expected_count, expected_ids = block_chunk_schedule_triton(mask, block)
        assert torch.equal(count, expected_count) and torch.equal(ids, expected_ids), block
    assert schedule.chunk_schedule(70) is schedule.chunk_schedule(128)  # one block either way
    for block in (16, 32):
        qb_count, qb_ids = schedule.transposed_schedule(block)
        visible = ita._block_visibility(mask, block).transpose(1, 2)
        expected_count, expected_ids = block_chunk_schedule_triton(visible, 1)
        assert torch.equal(qb_count, expected_count) and torch.equal(qb_ids, expected_ids)
        assert schedule.transposed_schedule(block)[0] is qb_count  # cached


def test_one_block_schedule_edge_cases():
    mask = torch.zeros(3, 4, 6, dtype=torch.bool, device=TEST_DEVICE)
    mask[0, 2, 5] = mask[0, 0, 1] = True  # batch 0 sees chunks 1 and 5; batch 1 none
    mask[2] = True  # batch 2 all
    count, ids = one_block_schedule(mask)
    assert count.tolist() == [[2], [0], [6]]
    assert ids.tolist() == [[[1, 5, -1, -1, -1, -1]], [[-1] * 6], [list(range(6))]]
    assert torch.equal(ids, block_chunk_schedule_triton(mask, 4)[1])
    empty_count, empty_ids = one_block_schedule(mask[:, :, :0])  # M = 0
    assert empty_count.tolist() == [[0]] * 3 and empty_ids.shape == (3, 1, 0)


def test_uniform_schedule_holds_the_effective_mask():
    mask = torch.tensor([[[True, False], [False, False]]], device=TEST_DEVICE)
    schedule = vk.MediaSchedule(mask, media_len=2, empty_rows="uniform")
    assert schedule.media_mask is mask
    assert schedule.kernel_mask.tolist() == [[[True, False], [True, True]]]
    assert vk.MediaSchedule(mask, media_len=2).kernel_mask is mask
    assert schedule.num_keys == 4 and schedule.shape == mask.shape


# ---- the Triton launchers read the schedule -----------------------------------------------------------


@pytest.mark.parametrize("query_len", [3, 40])
def test_triton_launchers_build_no_schedule_when_given_one(monkeypatch, query_len):
    """Two layers sharing a schedule: the schedules are built once (by the MediaSchedule), never by
    the launchers, in the forward and in the backward."""
    q, k, v, mask, media_len = _inputs(query_len=query_len)
    schedule = vk.MediaSchedule(mask, media_len=media_len)
    built = []

    def spy(name, function):
        def wrapper(*args, **kwargs):
            built.append(name)
            return function(*args, **kwargs)

        monkeypatch.setattr(ita, name, wrapper)

    spy("block_chunk_schedule_triton", ita.block_chunk_schedule_triton)
    spy("one_block_schedule", ita.one_block_schedule)
    out = sum(
        vk.image_text_attention(q * (layer + 1), k, v, schedule, backend="triton")
        for layer in range(2)
    )
    out.sum().backward()
    assert built == []
    forward_block, dq_block, dkdv_block = ita.schedule_blocks(q, k, media_len)
    assert forward_block == (query_len if query_len <= 16 else 32)  # float32 prefill: BLOCK_M=32
    assert set(schedule._chunk_schedules) == {
        min(forward_block, query_len),
        min(dq_block, query_len),
    }
    assert set(schedule._transposed) == {dkdv_block}
    # Without a schedule each call builds its own.
    vk.image_text_attention(q, k, v, mask, media_len=media_len, backend="triton").sum().backward()
    assert len(built) == 3  # the forward's, the dq and the transposed schedules
    assert built[0] == ("one_block_schedule" if query_len <= 16 else "block_chunk_schedule_triton")


@pytest.mark.parametrize("chunks", [5, 33], ids=["spanning", "chunk-aligned"])
@pytest.mark.parametrize("query_len", [3, 40])
def test_forward_reads_the_schedules_chunk_bits(monkeypatch, query_len, chunks):
    """16-bit inputs and M <= 32: the forward's spanning tiles read the MediaSchedule's per-row chunk
    bits (built once, by the schedule, never by the launcher) and equal the plain-mask call, which
    builds its own; M > 32: no bits, the chunk-aligned walk, the same equality."""
    q, k, v, mask, media_len = _inputs(query_len=query_len, chunks=chunks, media_len=3)
    q, k, v = (x.detach().to(torch.bfloat16) for x in (q, k, v))
    schedule = vk.MediaSchedule(mask, media_len=media_len, empty_rows="uniform")
    built = []
    real_chunk_bits = ita.chunk_bits
    monkeypatch.setattr(ita, "chunk_bits", lambda m: built.append(m) or real_chunk_bits(m))
    shared = [vk.image_text_attention(q, k, v, schedule, backend="triton") for _ in range(2)]
    assert built == []
    assert (schedule._chunk_bits is not None) is (chunks <= 32)
    plain = vk.image_text_attention(
        q, k, v, mask, media_len=media_len, empty_rows="uniform", backend="triton"
    )
    assert len(built) == (chunks <= 32)
    assert torch.equal(plain, shared[0]) and torch.equal(plain, shared[1])
    if chunks <= 32:  # float32 walks chunk-aligned tiles: no bits
        float32 = vk.MediaSchedule(mask, media_len=media_len)
        vk.image_text_attention(q.float(), k.float(), v.float(), float32, backend="triton")
        assert float32._chunk_bits is None


def test_no_backward_schedule_without_grad():
    q, k, v, mask, media_len = _inputs(query_len=40)
    schedule = vk.MediaSchedule(mask, media_len=media_len)
    with torch.no_grad():
        vk.image_text_attention(q, k, v, schedule, backend="triton")
    assert list(schedule._chunk_schedules) == [32] and not schedule._transposed


def test_a_schedule_for_another_block_is_not_read():
    """A launcher running another query block (a config forced after the schedule was taken) builds
    its own: the schedule's number of query blocks tells which block it was built for."""
    mask = torch.rand(1, 100, 3, device=TEST_DEVICE) > 0.5
    schedule = vk.MediaSchedule(mask, media_len=2)
    assert ita._given_schedule(schedule.chunk_schedule(32), 100, 64) is None
    assert ita._given_schedule(schedule.chunk_schedule(64), 100, 64) is not None
    one_block = schedule.chunk_schedule(100)
    assert ita._given_schedule(one_block, 100, 128) is one_block  # one block: the same schedule


def test_forced_bf16_block_sizes_read_matching_schedules():
    """bf16 has two prefill blocks (64, 128): under each forced config the schedule handed over is
    the one for that config's block, and the results equal the plain-mask call."""
    q, k, v, mask, media_len = _inputs(query_len=130, heads_q=2, heads_kv=1, chunks=2, media_len=4)
    q, k, v = (x.detach().to(torch.bfloat16) for x in (q, k, v))
    schedule = vk.MediaSchedule(mask, media_len=media_len)
    first_128 = len(ita._FWD_CONFIGS[64])
    for index in (0, first_128):  # the first configs of BLOCK_M=64 and of BLOCK_M=128
        with _launch.force_triton_config("image_text_attention_fwd", index):
            block = ita.schedule_blocks(q)[0]
            plain = vk.image_text_attention(q, k, v, mask, media_len=media_len, backend="triton")
            shared = vk.image_text_attention(q, k, v, schedule, backend="triton")
        assert block == (64 if index == 0 else 128)
        assert torch.equal(plain, shared)
    assert {64, 128} <= set(schedule._chunk_schedules)


# ---- validation ------------------------------------------------------------------------------------------


def test_validation_errors():
    q, k, v, mask, media_len = _inputs()
    schedule = vk.MediaSchedule(mask, media_len=media_len, empty_rows="uniform")
    with pytest.raises(ValueError, match="media_len=4 disagrees"):
        vk.image_text_attention(q, k, v, schedule, media_len=4)
    with pytest.raises(ValueError, match="empty_rows='zero' disagrees"):
        vk.image_text_attention(q, k, v, schedule, empty_rows="zero")
    # agreeing values are accepted
    vk.image_text_attention(q, k, v, schedule, media_len=media_len, empty_rows="uniform")
    with pytest.raises(ValueError, match="media_len is required"):
        vk.image_text_attention(q, k, v, mask)
    with pytest.raises(ValueError, match="Lk == M"):
        vk.image_text_attention(q, k, v, vk.MediaSchedule(mask, media_len=media_len + 1))
    with pytest.raises(ValueError, match="media_len must be a positive int"):
        vk.MediaSchedule(mask, media_len=0)
    with pytest.raises(ValueError, match="empty_rows must be one of"):
        vk.MediaSchedule(mask, media_len=2, empty_rows="average")
    with pytest.raises((TypeError, ValueError), match="media_mask"):
        vk.MediaSchedule(mask.float(), media_len=2)
    with pytest.raises((TypeError, ValueError), match="media_mask"):
        vk.MediaSchedule(mask[0], media_len=2)


def test_nn_module_accepts_a_schedule_and_checks_it():
    layer = vk.nn.ImageTextCrossAttention(64, 4, 2, backend="triton").to(TEST_DEVICE)
    hidden = torch.randn(2, 7, 64, device=TEST_DEVICE)
    images = torch.randn(2, 15, 64, device=TEST_DEVICE)
    mask = torch.rand(2, 7, 3, device=TEST_DEVICE) > 0.5
    schedule = vk.MediaSchedule(mask, media_len=5, empty_rows="uniform")
    assert layer.schedule(schedule, 15) is schedule
    assert torch.equal(
        layer(hidden, schedule, images), layer(hidden, mask, images, empty_rows="uniform")
    )
    with pytest.raises(ValueError, match="disagrees"):
        layer(hidden, schedule, images, empty_rows="zero")
    with pytest.raises(ValueError, match="disagrees"):
        layer(hidden, schedule, images, media_len=3)


# ---- torch.compile ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_compile_fullgraph_with_a_schedule(backend):
    if backend not in backends_for("image_text_attention"):
        pytest.skip(f"no {backend} backend here")
    q, k, v, mask, media_len = _inputs(query_len=20)

    def built_inside(q, k, v, mask):
        schedule = vk.MediaSchedule(mask, media_len=media_len, empty_rows="uniform")
        first = vk.image_text_attention(q, k, v, schedule, backend=backend)
        return vk.image_text_attention(first, k, v, schedule, backend=backend)

    def passed_in(q, k, v, schedule):
        return vk.image_text_attention(q, k, v, schedule, backend=backend)

    expected = _forward_backward(q, k, v, mask, media_len=media_len, backend=backend)
    compiled = torch.compile(passed_in, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, vk.MediaSchedule(mask, media_len=media_len))
    torch.testing.assert_close(out, expected[0])
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), (q, k, v))
    for want, have in zip(expected[1:], grads, strict=True):
        torch.testing.assert_close(have, want)

    eager = built_inside(q, k, v, mask)
    compiled_inside = torch.compile(built_inside, fullgraph=True, backend="aot_eager")
    out = compiled_inside(q, k, v, mask)
    torch.testing.assert_close(out, eager)
    out.sum().backward()


# ---- tuning policy -------------------------------------------------------------------------------------


def test_tune_bucket_and_key():
    assert [_launch.tune_bucket(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 577, 1601)] == [
        0,
        1,
        2,
        4,
        4,
        8,
        8,
        16,
        1024,
        2048,
    ]
    assert _launch.tune_bucket("tf32") == "tf32" and _launch.tune_bucket(True) is True
    q = torch.zeros(1, 1, 1, 16)
    key = _launch.tuning_key(
        ita._fwd_kernel,
        (q, q, q, None, None, None, None, None, q, None, None, None, None, 17, 5, 577),
        {"HEAD_DIM": 80, "INPUT_PRECISION": "tf32"},
        ita._TUNE_KEY,
    )
    assert key == (
        ("media_len", 1024),
        ("M", 8),
        ("HEAD_DIM", 128),
        ("INPUT_PRECISION", "tf32"),
        *["torch.float32"] * 4,
    )


def test_image_counts_and_decode_lengths_tune_a_bounded_number_of_times(monkeypatch):
    """Calls with M = 1..8 images (prefill) and decode lengths Lq = 1..16 run at most 4 tuning
    passes per kernel (the power-of-two buckets of M) and none on the decode path, where every
    launch gets a one-config list (a heuristic's pick: no autotuner)."""
    launches = []
    real_launch = ita.launch

    def recording_launch(name, kernel, configs, grid, args, *, tune_key, tune_configs=None, **kw):
        launches.append((name, len(tune_configs or configs)))
        real_launch(
            name, kernel, configs, grid, args, tune_key=tune_key, tune_configs=tune_configs, **kw
        )

    monkeypatch.setattr(ita, "launch", recording_launch)
    _launch.reset_tuning_passes()
    for chunks in range(1, 9):
        q, k, v, mask, media_len = _inputs(1, 17, 2, 1, 16, chunks, 3)
        vk.image_text_attention(q, k, v, mask, media_len=media_len, backend="triton")
    prefill = _launch.tuning_passes()
    assert prefill["image_text_attention_fwd"] == 4  # M in {1}, {2}, {3, 4}, {5..8}
    assert prefill["block_chunk_schedule"] == 4
    launches.clear()
    for query_len in range(1, 17):
        q, k, v, mask, media_len = _inputs(2, query_len, 4, 2, 16, 4, 3)
        with torch.no_grad():
            vk.image_text_attention(q, k, v, mask, media_len=media_len, backend="triton")
            vk.image_text_attention(q, k, v, vk.MediaSchedule(mask, media_len=3), backend="triton")
    assert _launch.tuning_passes() == prefill  # decode added no tuning pass
    assert {name for name, _ in launches} == {
        "image_text_attention_decode_split",
        "image_text_attention_decode_combine",
    }
    assert all(count == 1 for _, count in launches)


def test_decode_config_heuristic_is_a_declared_config():
    for tiles in ita._TILES.values():
        configs = ita._kernel_configs(tiles)["image_text_attention_decode_split"]
        for head_dim in (64, 80, 96, 128):
            for block_r in (16, 32, 64):
                assert ita._decode_config(tiles, head_dim, block_r) in configs
    bf16 = ita._TILES[2]
    assert ita._decode_config(bf16, 64, 64).kwargs["BLOCK_N"] == 128
    assert ita._decode_config(bf16, 128, 64).kwargs["BLOCK_N"] == 64


class _SyncGuard:
    """Makes every device-to-host synchronization of a tensor raise while active, except inside the
    kernel launches (the interpreter copies kernel arguments to the host itself)."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")

    def __init__(self, monkeypatch):
        self.active = False
        for method in self.METHODS:
            original = getattr(torch.Tensor, method)
            monkeypatch.setattr(torch.Tensor, method, self._guarded(method, original))
        monkeypatch.setattr(
            torch.cuda, "synchronize", self._guarded("synchronize", lambda *a: None)
        )
        real_launch = ita.launch

        def launch_unguarded(*args, **kwargs):
            active, self.active = self.active, False
            try:
                real_launch(*args, **kwargs)
            finally:
                self.active = active

        monkeypatch.setattr(ita, "launch", launch_unguarded)

    def _guarded(self, method, original):
        guard = self

        def guarded(*args, **kwargs):
            if guard.active:
                raise AssertionError(f"host sync on the decode path: Tensor.{method}")
            return original(*args, **kwargs)

        return guarded


@pytest.mark.parametrize("query_len", [1, 16])
@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
def test_decode_path_does_no_host_sync(monkeypatch, query_len, empty_rows):
    q, k, v, mask, media_len = _inputs(2, query_len, 4, 2, 16, 4, 3)
    q, k, v = (x.detach() for x in (q, k, v))
    expected = vk.image_text_attention(
        q, k, v, mask, media_len=media_len, empty_rows=empty_rows, backend="reference"
    )
    guard = _SyncGuard(monkeypatch)
    with pytest.raises(AssertionError, match="host sync"):  # the guard works
        guard.active = True
        try:
            bool(mask.any())
        finally:
            guard.active = False
    guard.active = True
    try:
        schedule = vk.MediaSchedule(mask, media_len=media_len, empty_rows=empty_rows)
        shared = vk.image_text_attention(q, k, v, schedule, backend="triton")
        plain = vk.image_text_attention(
            q, k, v, mask, media_len=media_len, empty_rows=empty_rows, backend="triton"
        )
    finally:
        guard.active = False
    torch.testing.assert_close(shared, expected, atol=2e-5, rtol=2e-5)
    assert torch.equal(plain, shared)


def test_prefill_heaviest_first_order_does_no_host_sync(monkeypatch):
    """The prefill forward with a schedule: the heaviest-first order of its query blocks is sorted on
    the device (``heaviest_first``), with no host sync."""
    q, k, v, mask, media_len = _inputs(2, 40, 4, 2, 16, 4, 3)
    q, k, v = (x.detach() for x in (q, k, v))
    schedule = vk.MediaSchedule(mask, media_len=media_len)
    schedule.chunk_schedule(ita.schedule_blocks(q)[0])  # built outside the guard
    guard = _SyncGuard(monkeypatch)
    guard.active = True
    try:
        shared = vk.image_text_attention(q, k, v, schedule, backend="triton")
    finally:
        guard.active = False
    expected = vk.image_text_attention(q, k, v, mask, media_len=media_len, backend="reference")
    torch.testing.assert_close(shared, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not ON_CUDA, reason="torch.cuda.set_sync_debug_mode needs a GPU")
def test_decode_step_under_cuda_sync_debug_mode():
    q, k, v, mask, media_len = _inputs(8, 1, 32, 8, 128, 4, 577)
    q, k, v = (x.detach().to(torch.bfloat16) for x in (q, k, v))
    schedule = vk.MediaSchedule(mask, media_len=media_len)
    vk.image_text_attention(q, k, v, schedule, backend="triton")  # warm: compile outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        vk.image_text_attention(q, k, v, schedule, backend="triton")
        vk.image_text_attention(q, k, v, mask, media_len=media_len, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
