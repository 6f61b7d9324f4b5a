"""Command line: python -m benchmarks --op image_text_attention --shape mllama-11b ..."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks import registry, report, timing
from benchmarks.runner import RunConfig, build_cases, run_case, select_providers
from benchmarks.spec import DTYPES, MODES

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
_EVERY = ("*", "all")


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark vlm_kernels ops (ours per backend) against PyTorch peers; prints a "
        "markdown table and writes <name>.md, <name>.csv and <name>.png to --out.",
        epilog="Example: python -m benchmarks --op image_text_attention --shape mllama-11b "
        "--mask 1of4 --dtype bf16 --mode fwd --repeats 5 --baseline sdpa --out /tmp/bench",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--list", action="store_true", help="list ops, shapes, variants and providers, then exit"
    )
    parser.add_argument(
        "--op",
        default="image_text_attention",
        help=f"comma-separated ops, or 'all'; ops: {', '.join(registry.OPS)}",
    )
    parser.add_argument(
        "--shape",
        default="tiny",
        help="comma-separated shape names, or 'all'; ops without such a shape are skipped",
    )
    parser.add_argument(
        "--mask",
        "--variant",
        dest="variant",
        default=None,
        help="comma-separated input variants (the media mask of image_text_attention, "
        "uint8|float pixels of patch_embed, none|pad of perceiver_attention), or '*' for every "
        "variant; default: the shape's first variant",
    )
    parser.add_argument(
        "--dtype", default="fp32", help=f"comma-separated dtypes: {', '.join(DTYPES)}"
    )
    parser.add_argument(
        "--mode",
        default="fwd",
        help="comma-separated modes: fwd, fwd_bwd (forward then the grads of sum(out * fixed "
        "random cotangent)), or 'all'; modes a shape does not support are skipped",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed calls per provider (median, p20, p80)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed calls before timing (the first also compiles and is checked numerically)",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="comma-separated provider names; the first present in a case is its baseline for the "
        "speedup column; default per op: "
        + ", ".join(f"{n}={s.default_baseline}" for n, s in registry.OPS.items()),
    )
    parser.add_argument(
        "--providers",
        default=None,
        help="comma-separated providers to run (default: all non-opt-in; emulated backends such as "
        "vk-cuda_sim run only when named here)",
    )
    parser.add_argument(
        "--device", default=None, help="torch device; default cuda if available, else cpu"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads(N) for CPU runs"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="directory for the .md/.csv/.png files"
    )
    parser.add_argument(
        "--name",
        default=None,
        help="file stem of the outputs; default: op_shape_variant_dtype_mode for one case, else "
        "bench_<date>_<time>",
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the peak-memory measurement call"
    )
    parser.add_argument("--no-check", action="store_true", help="skip the max-abs-error column")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    parser.add_argument(
        "--mem-interval-ms",
        type=float,
        default=1.0,
        help="RSS sampling interval for CPU peak memory",
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="CPU runs: keep glibc's default mmap / trim thresholds (by default they are pinned so "
        "that repeated calls reuse their memory instead of page-faulting; see "
        "timing.steady_malloc)",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="time each provider's repeats one after another (by default a case's providers are "
        "timed in rounds, one call each per round, so the machine's drift reaches them alike; see "
        "timing.time_interleaved)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def _pick(text: str | None, known, what: str) -> list[str] | None:
    if text is None:
        return None
    if text in _EVERY:
        return list(known)
    items = _csv(text)
    unknown = [item for item in items if item not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; expected one of {sorted(known)}")
    return items


def list_registry(device: torch.device) -> str:
    lines = [f"device: {device}"]
    for name, spec in registry.OPS.items():
        lines += ["", f"{name}  (default baseline: {spec.default_baseline})"]
        lines.append(f"  variants: {spec.variant_help}")
        for shape in spec.shapes.values():
            params = ", ".join(f"{k}={v}" for k, v in shape.params.items())
            lines.append(f"  shape {shape.name}: {params}")
            lines.append(
                f"    variants {', '.join(shape.variants)}; modes {', '.join(shape.modes)}"
            )
            lines.append(f"    source: {shape.source}")
        for provider in registry.providers(name):
            reason = provider.unavailable(device)
            state = "available" if reason is None else f"unavailable ({reason})"
            if reason is None and provider.opt_in(device):
                state = "opt-in (name it in --providers)"
            lines.append(
                f"  provider {provider.name} [{provider.kind}]: {provider.description} -- {state}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA device is available here")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    steady = device.type == "cpu" and not args.default_malloc and timing.steady_malloc()
    if args.list:
        print(list_registry(device))
        return 0

    ops = _pick(args.op, registry.OPS, "op")
    all_shapes = {shape.name for op in ops for shape in registry.get_op(op).shapes.values()}
    shapes = _pick(args.shape, all_shapes, "shape")
    all_variants = {
        v for op in ops for s in registry.get_op(op).shapes.values() for v in s.variants
    }
    variants = (
        list(all_variants) if args.variant == "*" else _pick(args.variant, all_variants, "variant")
    )
    dtypes = _pick(args.dtype, DTYPES, "dtype")
    modes = _pick(args.mode, MODES, "mode")
    names = None if args.providers is None else _csv(args.providers)
    if names is not None:
        known = {p.name for op in ops for p in registry.providers(op)}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"unknown providers {unknown}; expected some of {sorted(known)}")
    cases = build_cases(ops, shapes, variants, dtypes, modes)
    if not cases:
        raise SystemExit("no benchmark case matches these --op/--shape/--mask/--mode (see --list)")

    config = RunConfig(
        device=device,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        baselines=tuple(_csv(args.baseline)) if args.baseline else (),
        memory=not args.no_memory,
        check=not args.no_check,
        mem_interval_s=args.mem_interval_ms / 1e3,
        interleave=not args.sequential,
    )
    progress = (
        None if args.quiet else (lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    )
    results = []
    for case in cases:
        providers = select_providers(case.op, device, names)
        results += run_case(case, providers, config, progress)

    env = report.environment(device)
    if device.type == "cpu":
        env["malloc"] = "steady (glibc thresholds pinned)" if steady else "glibc default"
    env["timing"] = (
        "providers one after another" if args.sequential else "providers in rounds (interleaved)"
    )
    print(report.markdown(results, env))
    if args.name:
        name = args.name
    elif len(cases) == 1:
        c = cases[0]
        name = f"{c.op}_{c.shape}_{c.variant}_{c.dtype}_{c.mode}"
    else:
        name = time.strftime("bench_%Y%m%d_%H%M%S")
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text(report.markdown(results, env))
    report.write_csv(results, out_dir / f"{name}.csv")
    written = [out_dir / f"{name}.md", out_dir / f"{name}.csv"]
    if not args.no_plot:
        report.write_plot(results, out_dir / f"{name}.png")
        written.append(out_dir / f"{name}.png")
    print("wrote " + ", ".join(str(p) for p in written))
    return 1 if any(r.status == "error" for r in results) else 0
