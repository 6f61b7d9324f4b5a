"""Writes results a person can read: a markdown table per case (printed too), a CSV, a PNG plot."""

from __future__ import annotations

import csv
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.runner import Case, Result

CSV_FIELDS = (
    "op",
    "shape",
    "variant",
    "dtype",
    "mode",
    "provider",
    "kind",
    "status",
    "reason",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "repeats",
    "flops",
    "gflops",
    "peak_mem_mib",
    "mem_method",
    "setup_s",
    "baseline",
    "speedup_vs_baseline",
    "check_against",
    "max_abs_err",
    "samples_ms",
)


def environment(device: torch.device) -> dict[str, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name() or platform.processor() or "cpu"
    return {
        "device": f"{device.type}: {name}",
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "load avg (1 min)": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a",
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _flop_text(flops: int) -> str:
    if flops >= 10**8:
        return f"{flops / 1e9:.3f} GFLOP"
    return f"{flops / 1e6:.4g} MFLOP"


def _groups(results: Sequence[Result]) -> dict[Case, list[Result]]:
    groups: dict[Case, list[Result]] = {}
    for r in results:
        groups.setdefault(r.case, []).append(r)
    return groups


def markdown(results: Sequence[Result], env: dict[str, str]) -> str:
    lines = ["# vlm_kernels benchmarks", ""]
    lines.append(", ".join(f"{k}: {v}" for k, v in env.items()))
    methods = sorted({r.mem_method for r in results if r.mem_method})
    if methods:
        lines.append(f"peak memory: {'; '.join(methods)}")
    lines.append(
        "time: median of the timed repeats (p20-p80 in brackets); GFLOP/s counts visible work only "
        "(attention: query/key pairs the mask allows; backward = 2.5x forward)"
    )
    for case, rows in _groups(results).items():
        baseline = rows[0].baseline
        against = next((r.check_against for r in rows if r.check_against), "")
        flops = rows[0].flops
        lines += ["", f"## {case.label}", ""]
        if flops:
            lines.append(f"work: {_flop_text(flops)} per call; baseline: {baseline}")
            lines.append("")
        err_header = f"max abs err vs {against}" if against else "max abs err"
        lines.append(
            "| provider | kind | median ms | p20-p80 ms | GFLOP/s | peak mem MiB | "
            f"speedup vs {baseline} | {err_header} | setup s | status |"
        )
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in rows:
            spread = "n/a" if r.p20_ms is None else f"{r.p20_ms:.3f}-{r.p80_ms:.3f}"
            mem = None if r.peak_mem_bytes is None else r.peak_mem_bytes / 2**20
            status = r.status if not r.reason else f"{r.status}: {r.reason}"
            status = status.replace("|", "/")
            lines.append(
                f"| {r.provider} | {r.kind} | {_num(r.median_ms, '.3f')} | {spread} | "
                f"{_num(r.gflops, '.1f')} | {_num(mem, '.1f')} | "
                f"{_num(r.speedup, '.2f')}{'x' if r.speedup is not None else ''} | "
                f"{_num(r.max_abs_err, '.2e')} | {_num(r.setup_s, '.2f')} | {status} |"
            )
    return "\n".join(lines) + "\n"


def write_csv(results: Sequence[Result], path: Path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in results:
            writer.writerow(
                {
                    "op": r.case.op,
                    "shape": r.case.shape,
                    "variant": r.case.variant,
                    "dtype": r.case.dtype,
                    "mode": r.case.mode,
                    "provider": r.provider,
                    "kind": r.kind,
                    "status": r.status,
                    "reason": r.reason,
                    "median_ms": r.median_ms,
                    "p20_ms": r.p20_ms,
                    "p80_ms": r.p80_ms,
                    "repeats": r.repeats,
                    "flops": r.flops,
                    "gflops": r.gflops,
                    "peak_mem_mib": None if r.peak_mem_bytes is None else r.peak_mem_bytes / 2**20,
                    "mem_method": r.mem_method,
                    "setup_s": r.setup_s,
                    "baseline": r.baseline,
                    "speedup_vs_baseline": r.speedup,
                    "check_against": r.check_against,
                    "max_abs_err": r.max_abs_err,
                    "samples_ms": " ".join(f"{s:.4f}" for s in r.samples_ms),
                }
            )


def write_plot(results: Sequence[Result], path: Path):
    """One panel per case: median time per provider (p20-p80 whiskers), speedups as labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [
        (case, [r for r in rows if r.status == "ok"]) for case, rows in _groups(results).items()
    ]
    groups = [(case, rows) for case, rows in groups if rows] or list(_groups(results).items())[:1]
    heights = [max(1.2, 0.45 * len(rows) + 0.9) for _, rows in groups]
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, sum(heights)), squeeze=False)
    for ax, (case, rows) in zip(axes[:, 0], groups, strict=True):
        ax.set_title(case.label, fontsize=9)
        if not rows or rows[0].median_ms is None:
            ax.text(0.5, 0.5, "no provider ran", ha="center", va="center", transform=ax.transAxes)
            ax.set_yticks([])
            continue
        names = [r.provider for r in rows]
        medians = [r.median_ms for r in rows]
        low = [r.median_ms - r.p20_ms for r in rows]
        high = [r.p80_ms - r.median_ms for r in rows]
        palette = {"ours": "tab:orange", "ceiling": "tab:gray"}
        colors = [palette.get(r.kind, "tab:blue") for r in rows]
        bars = ax.barh(names, medians, xerr=[low, high], color=colors, capsize=3)
        ax.invert_yaxis()
        ax.set_xlabel(
            f"median ms (lower is better; label: speedup vs {rows[0].baseline})", fontsize=8
        )
        ax.tick_params(labelsize=8)
        for bar, r in zip(bars, rows, strict=True):
            if r.speedup is not None:
                y = bar.get_y() + bar.get_height() / 2
                ax.text(r.p80_ms, y, f"  {r.speedup:.2f}x", va="center", fontsize=8)
        ax.set_xlim(0, max(r.p80_ms for r in rows) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(
    results: Sequence[Result], out_dir: Path, name: str, env: dict[str, str]
) -> dict[str, Path]:
    """Write <name>.md, <name>.csv and <name>.png into out_dir; returns the paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"{name}.{kind}" for kind in ("md", "csv", "png")}
    paths["md"].write_text(markdown(results, env))
    write_csv(results, paths["csv"])
    write_plot(results, paths["png"])
    return paths
