"""Runs benchmark cases: builds the inputs once per case, then prepares, checks, times and measures
each provider, and fills in the speedups against the baseline provider of the case."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from benchmarks import registry, timing
from benchmarks.spec import DTYPES, Provider, ProviderUnavailable, seeded_generator


@dataclass(frozen=True)
class Case:
    op: str
    shape: str
    variant: str
    dtype: str
    mode: str

    @property
    def label(self) -> str:
        return f"{self.op} / {self.shape} / {self.variant} / {self.dtype} / {self.mode}"


@dataclass
class Result:
    """One row of the output: a provider on a case."""

    case: Case
    provider: str
    kind: str
    status: str = "ok"  # ok | unavailable | error
    reason: str = ""
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    repeats: int = 0
    flops: int | None = None
    peak_mem_bytes: int | None = None
    mem_method: str = ""
    setup_s: float | None = None
    baseline: str = ""
    speedup: float | None = None  # baseline median / this median (> 1: faster than the baseline)
    check_against: str = ""
    max_abs_err: float | None = None
    samples_ms: tuple[float, ...] = field(default=(), repr=False)

    @property
    def gflops(self) -> float | None:
        if not self.flops or not self.median_ms:
            return None
        return self.flops / (self.median_ms * 1e-3) / 1e9


@dataclass(frozen=True)
class RunConfig:
    device: torch.device
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    # the first of these present in a case is its baseline, else the op's default baseline
    baselines: tuple[str, ...] = ()
    memory: bool = True
    check: bool = True
    mem_interval_s: float = 0.001
    # time the providers of a case in rounds (timing.time_interleaved), else one after another
    interleave: bool = True


def select_providers(
    op: str, device: torch.device, names: Sequence[str] | None = None
) -> list[Provider]:
    """The providers of `op` to run: all but the opt-in ones, or those named."""
    chosen = []
    for provider in registry.providers(op):
        if names is None:
            if not provider.opt_in(device):
                chosen.append(provider)
        elif provider.name in names:
            chosen.append(provider)
    return chosen


def make_step(forward, inputs, mode: str, cotangent: dict | None = None):
    """The timed step: the forward (under no_grad), or the forward then the grads of sum(out * c)
    for a fixed random cotangent c (drawn at the first call and kept in `cotangent`, so the
    providers of a case share it)."""
    cotangent = {} if cotangent is None else cotangent
    if mode == "fwd":

        def run_fwd():
            with torch.no_grad():
                return forward()

        return run_fwd

    def run_fwd_bwd():
        out = forward()
        if "value" not in cotangent:
            gen = seeded_generator(0, salt=1)
            values = torch.randn(out.shape, generator=gen, dtype=torch.float32)
            cotangent["value"] = values.to(device=out.device, dtype=out.dtype)
        torch.autograd.grad(out, inputs.grad_inputs, cotangent["value"])
        return out

    return run_fwd_bwd


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(
    case: Case, providers: Sequence[Provider], config: RunConfig, progress=None
) -> list[Result]:
    """Benchmark every provider on one case; one that cannot run gives a row saying why."""
    spec = registry.get_op(case.op)
    shape = registry.get_shape(case.op, case.shape)
    inputs = shape.build(
        case.variant,
        DTYPES[case.dtype],
        config.device,
        config.seed,
        requires_grad=case.mode == "fwd_bwd",
    )
    flops = spec.flops(inputs, case.mode)
    cotangent: dict = {}
    results, outputs = [], {}
    prepared: list[tuple[Result, object]] = []  # (result, step) of the providers that ran once
    for provider in providers:
        result = Result(case, provider.name, provider.kind, flops=flops)
        results.append(result)
        if progress is not None:
            progress(f"{case.label}: {provider.name}")
        reason = provider.unavailable(config.device)
        if reason is None and provider.kind == "ceiling" and case.mode != "fwd":
            reason = "a ceiling (the bare GEMM, not the op) is timed in mode fwd only"
        if reason is not None:
            result.status, result.reason = "unavailable", reason
            continue
        try:
            start = time.perf_counter()
            step = make_step(provider.prepare(inputs), inputs, case.mode, cotangent)
            out = step()  # first call: compiles / initializes lazily; its output is checked
            _sync(config.device)
            result.setup_s = time.perf_counter() - start
            if provider.kind != "ceiling":  # its output is not the op's: nothing to check
                outputs[provider.name] = out.detach()
            del out
            if config.interleave:
                prepared.append((result, step))
            else:  # measured now; its prepared state is dropped before the next provider's
                _record(result, config, step)
        except Exception as exc:
            _record_failure(result, exc)
        step = None
    if prepared:
        timings = timing.time_interleaved(
            [step for _, step in prepared],
            config.device,
            max(config.warmup - 1, 0),
            config.repeats,
        )
        for (result, step), measured in zip(prepared, timings, strict=True):
            if isinstance(measured, Exception):
                _record_failure(result, measured)
                continue
            try:
                _record(result, config, step, measured)
            except Exception as exc:
                _record_failure(result, exc)
        prepared.clear()  # the providers' prepared state goes before the next case's inputs
    _fill_baseline(results, spec.default_baseline, config.baselines)
    if config.check:
        _fill_errors(results, outputs)
    return results


def _record(result: Result, config: RunConfig, step, measured: timing.Timing | None = None):
    """Fills in the timing (measured here when not given) and the peak memory of one provider."""
    if measured is None:
        measured = timing.time_calls(step, config.device, max(config.warmup - 1, 0), config.repeats)
    result.median_ms, result.p20_ms, result.p80_ms = (
        measured.median_ms,
        measured.p20_ms,
        measured.p80_ms,
    )
    result.samples_ms, result.repeats = measured.samples_ms, config.repeats
    if config.memory:
        result.peak_mem_bytes, result.mem_method = timing.peak_memory(
            step, config.device, config.mem_interval_s
        )


def _record_failure(result: Result, exc: Exception):
    if isinstance(exc, ProviderUnavailable):
        result.status, result.reason = "unavailable", str(exc)
    else:
        result.status, result.reason = "error", _short(exc)


def _fill_baseline(results: list[Result], default: str, requested: Sequence[str]):
    """Speedup = baseline median / median; the baseline: the first requested provider present."""
    names = [r.provider for r in results]
    candidates = [name for name in requested if name in names] or [default]
    baseline = candidates[0]
    base = next((r for r in results if r.provider == baseline and r.status == "ok"), None)
    for r in results:
        r.baseline = baseline
        if base is not None and r.status == "ok":
            r.speedup = base.median_ms / r.median_ms


def _fill_errors(results: list[Result], outputs: dict[str, torch.Tensor]):
    """Max abs difference of each forward output vs vk-reference (else vs the baseline)."""
    if not results:
        return
    against = "vk-reference" if "vk-reference" in outputs else results[0].baseline
    if against not in outputs:
        return
    expected = outputs[against].float()
    for r in results:
        if r.provider in outputs:
            r.check_against = against
            got = outputs[r.provider].float()
            if got.shape != expected.shape:
                r.status, r.reason = (
                    "error",
                    f"output shape {tuple(got.shape)} != {tuple(expected.shape)}",
                )
                continue
            r.max_abs_err = float((got - expected).abs().max()) if got.numel() else 0.0


def build_cases(
    ops: Sequence[str],
    shapes: Sequence[str] | None,
    variants: Sequence[str] | None,
    dtypes: Sequence[str],
    modes: Sequence[str],
) -> list[Case]:
    """Every existing combination; shapes/variants None: "tiny" / each shape's first variant."""
    cases = []
    for op in ops:
        spec = registry.get_op(op)
        for shape_name in shapes if shapes is not None else ["tiny"]:
            shape = spec.shapes.get(shape_name)
            if shape is None:
                continue
            wanted = shape.variants[:1] if variants is None else variants
            for variant in (v for v in wanted if v in shape.variants):
                for dtype in dtypes:
                    for mode in (m for m in modes if m in shape.modes):
                        cases.append(Case(op, shape_name, variant, dtype, mode))
    return cases
