"""Timing and peak-memory measurement.

Timing: `warmup` untimed calls, then `repeats` timed calls; the median and the 20th/80th
percentiles are reported. CPU: wall clock (time.perf_counter) around each call. CUDA: CUDA events
around each call, with the L2 cache flushed before each one (as triton.testing.do_bench does).
The runner times a case's providers in rounds (time_interleaved: one call of each per round), so
the machine's drift during a run reaches them alike; `time_calls` times one step alone.

Peak memory: CUDA: torch.cuda.max_memory_allocated during one call minus the allocation before it
(exact for the caching allocator). CPU: the resident set size (psutil) sampled by a thread every
`interval_s` during one call, peak minus the RSS before it, after gc and glibc malloc_trim(0) so
freed heap pages are not silently reused. Sampled RSS is approximate: allocations shorter than the
interval can be missed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

CPU_MEMORY_METHOD = "peak RSS delta (psutil sampler thread)"
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated delta"


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples_ms: tuple[float, ...]


def summarize(samples_ms: Sequence[float]) -> Timing:
    """Median and 20th/80th percentiles (linear interpolation between closest ranks)."""
    if not samples_ms:
        raise ValueError("summarize needs at least one sample")
    ordered = sorted(samples_ms)

    def percentile(q: float) -> float:
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return Timing(statistics.median(ordered), percentile(0.2), percentile(0.8), tuple(samples_ms))


def time_calls(
    step: Callable[[], object], device: torch.device, warmup: int, repeats: int
) -> Timing:
    """Time `step` on `device`: `warmup` untimed calls then `repeats` timed ones."""
    measured = time_interleaved([step], device, warmup, repeats)[0]
    if isinstance(measured, Exception):
        raise measured
    return measured


def time_interleaved(
    steps: Sequence[Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> list[Timing | Exception]:
    """Time several steps in rounds: `warmup` untimed rounds, then `repeats` timed ones, each round
    calling every step once in turn. A shared machine's speed drifts over a run (on the 2-core VM the
    same GEMM took 31-43 ms within minutes); timed one after another, a provider measured in a slow
    stretch loses to one measured in a fast one (concat_project mllama-projector fp32 read 0.92x with
    ours first and 1.03x with the peer first). In rounds every provider sees the same stretches.
    A step that raises gives its exception in its place and is not called again."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    samples: list[list[float] | Exception] = [[] for _ in steps]
    for round_index in range(warmup + repeats):
        for index, step in enumerate(steps):
            if isinstance(samples[index], Exception):
                continue
            try:
                if device.type == "cuda":
                    elapsed = _cuda_samples(step, device, 1)[0]
                else:
                    start = time.perf_counter()
                    step()
                    elapsed = (time.perf_counter() - start) * 1e3
            except Exception as exc:
                samples[index] = exc
                continue
            if round_index >= warmup:
                samples[index].append(elapsed)
    return [s if isinstance(s, Exception) else summarize(s) for s in samples]


def _cuda_samples(step, device, repeats) -> list[float]:
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda.synchronize(device)
    for start, end in zip(starts, ends, strict=True):
        flush.zero_()
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)]


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim (returns freed heap pages to the OS), or None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX).
_MMAP_THRESHOLD_MAX = 32 << 20


def steady_malloc() -> bool:
    """Makes glibc keep freed memory mapped and serve blocks up to 32 MiB from its heap, so that
    repeated calls reuse their pages instead of faulting fresh ones (True if it took effect).

    With glibc's defaults the mmap threshold moves with the allocation history and the heap is
    trimmed whenever its free top passes twice that threshold, so the same call can take from 0 to
    thousands of page faults depending on what was allocated and freed before it. Measured on the
    llava-2layer concat_project forward (bf16, 2 threads, 12 calls after a first one): with the
    first outputs kept alive, as the runner keeps them for its check, ~400 faults per call for ours
    and 2,000-2,700 for cat + Linear (8.4-9.3 ms instead of ~5.5); with nothing kept, ~30-60 for
    ours and 0-2 for cat + Linear. Every provider of a run shares the setting; a serving process
    with a caching allocator (or jemalloc / tcmalloc) is in this steady state too. Blocks over
    32 MiB are still mmapped.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    trim = mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))
    mmap = mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_MMAP_THRESHOLD_MAX))
    return bool(trim) and bool(mmap)


class RssPeakSampler:
    """Samples this process's RSS in a thread; `peak_bytes` is the peak minus the RSS at start."""

    def __init__(self, interval_s: float = 0.001):
        import psutil

        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.baseline = 0
        self.peak = 0

    def _rss(self) -> int:
        return self._process.memory_info().rss

    def _sample(self):
        while not self._stop.wait(self._interval_s):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        self.baseline = self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.peak = max(self.peak, self._rss())
        self._stop.set()
        self._thread.join()

    @property
    def peak_bytes(self) -> int:
        return max(self.peak - self.baseline, 0)


def peak_memory(
    step: Callable[[], object], device: torch.device, interval_s: float = 0.001
) -> tuple[int, str]:
    """(peak bytes of one call of `step` above what was allocated before it, the method's name)."""
    gc.collect(1)  # young generations: the previous call's cycles (a full collection costs ~0.2 s)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return max(peak, 0), CUDA_MEMORY_METHOD
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    with RssPeakSampler(interval_s) as sampler:
        result = step()
    del result
    return sampler.peak_bytes, CPU_MEMORY_METHOD
