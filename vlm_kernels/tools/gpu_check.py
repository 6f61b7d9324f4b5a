"""One command for a machine with a CUDA GPU: build, test on the device, prove every Triton config,
benchmark, and write a report. ``make gpu-check`` runs it; so does

    python -m vlm_kernels.tools.gpu_check --out DIR [--budget-s 480] [--dry-run]

from the repository root, with a Python that already holds torch (>= 2.11) and triton (>= 3.6); our
pins do not apply on a borrowed GPU machine, so the report starts with the versions it ran on.

Stages, each time-boxed inside the overall budget (a stage that would start with too little time left
is skipped and the report says so):
  1. build    ``setup.py build_ext --inplace`` for the local GPU's arch only, with every core.
  2. pytest   the test suite with VLMK_TEST_DEVICE=cuda: every op test on CUDA tensors with the
              backends that run there (triton, cuda, reference); interpreter/emulator tests skip.
  3. model    the thin model (model/) as a user runs it, through its CLI with --device cuda: a few
              training steps with a periodic evaluation, a resume that extends the run, generate
              (eager and with --cuda-graph; a text-only prompt) and eval; a few seconds.
  4. configs  every Triton kernel at every autotune config, forced one kernel at a time (the other
              kernels held at their first config, so nothing is autotuned), against the float64
              reference with the tolerance policy of tests/attention_testing.py: fp32/bf16/fp16,
              Dh 64/80/96/128, GQA, both empty-row modes, and key/value chunks that no row sees
              poisoned with NaN; small cases first, then mllama-sized ones while time lasts.
  5. bench    first decode, eager vs captured in a CUDA graph and replayed: image_text_attention
              at the mllama-11b decode shape (B=1 and 8, a prebuilt MediaSchedule) and the thin
              model's per-token ``generate(cuda_graph=True)``; then image_text_attention forward,
              forward+backward and decode at the mllama-11b shapes (masks 1-of-4, cumulative, all,
              random) against SDPA with the dense mask, SDPA without a mask (flash) on the
              all-visible case and compiled FlexAttention; CUDA-event medians (benchmarks/),
              visible TFLOP/s and their ratio to the device's bf16 matmul.
Output in DIR (at most 8 files, one sub-folder): report.md, figures.json, logs/{build,pytest,model,
configs,bench}.log. Progress goes to stdout.

``--dry-run`` runs the same plumbing on this CPU (the Triton interpreter and the SIMT emulator, tiny
shapes, a short test subset; the build stage only checks that the extension `make build` made imports) so that the script cannot rot while no GPU is
around; ``make test`` runs it. It times the eager decode rows and reports the graph ones as skipped
(no CUDA graphs on a CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUDGET_S = 480.0  # 8 minutes: a 15-minute GPU lease then allows one rerun
# Seconds each stage may take at most, and the least it needs to be worth starting.
STAGE_BUDGET_S = {"build": 200.0, "pytest": 150.0, "model": 40.0, "configs": 100.0, "bench": 120.0}
STAGE_MIN_S = {"build": 30.0, "pytest": 20.0, "model": 10.0, "configs": 10.0, "bench": 15.0}


@dataclass
class StageResult:
    name: str
    status: str = "skipped"  # ok | failed | partial | skipped
    seconds: float = 0.0
    summary: str = ""
    figures: dict = field(default_factory=dict)


class Clock:
    """The overall deadline, and each stage's share of what is left."""

    def __init__(self, budget_s: float):
        self.start = time.monotonic()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def stage_budget(self, stage: str) -> float:
        return min(STAGE_BUDGET_S[stage], self.left())


def log(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- environment ---------------------------------------------------------------------------------------


def environment(dry_run: bool) -> dict:
    import torch
    import triton

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "torch_cuda": torch.version.cuda,
        "dry_run": dry_run,
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
        )
    else:
        info["device"] = "cpu (dry run: Triton interpreter + SIMT emulator)"
    nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    if nvcc.exists():
        version = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True)
        info["nvcc"] = version.stdout.strip().splitlines()[-1] if version.stdout else "?"
    return info


def local_arch() -> str:
    """The local GPU's arch for VLMK_CUDA_ARCHS: sm_90 builds as 90a (the kernels' Hopper target)."""
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return "90a" if (major, minor) == (9, 0) else f"{major}{minor}"


def run_logged(command: list[str], log_path: Path, timeout_s: float, env: dict) -> tuple[int, str]:
    """Runs ``command`` from the repo root with output to ``log_path`` (appended); returns (exit code,
    last lines). A command past ``timeout_s`` is killed and returns 124."""
    with open(log_path, "a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        try:
            code = subprocess.run(
                command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            out.write(f"\n[gpu-check] killed after {timeout_s:.0f} s\n")
            code = 124
    tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
    return code, "\n".join(tail)


# ---- stage 1: build ------------------------------------------------------------------------------------


def stage_build(result: StageResult, logs: Path, budget_s: float, dry_run: bool) -> None:
    env = dict(os.environ)
    env.setdefault("CUDA_HOME", "/usr/local/cuda")
    env["MAX_JOBS"] = str(os.cpu_count() or 1)
    command = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    if dry_run:
        # The extension `make build` made is used as it is: a dry run runs inside `make test` (and
        # its pytest workers), where rebuilding in place would race the build it is checking.
        command = [sys.executable, "-c", "import vlm_kernels._C as c; print(c.__file__)"]
    else:
        env["VLMK_CUDA_ARCHS"] = local_arch()  # the local arch only
    code, tail = run_logged(command, logs / "build.log", budget_s, env)
    if code != 0:
        result.status, result.summary = "failed", f"exit {code}\n{tail}"
        return
    from vlm_kernels import _backends

    _backends._extension.cache_clear()  # a probe before the build must not stick
    status = _backends.available_backends()
    result.figures = {
        "archs": env.get("VLMK_CUDA_ARCHS", "80;90a"),
        "max_jobs": env["MAX_JOBS"],
        "backends": {b: status[b] for b in _backends.BACKENDS},
        "reasons": status["reasons"],
    }
    result.status = "ok"
    result.summary = f"archs {result.figures['archs']}, backends {result.figures['backends']}"


# ---- stage 2: the test suite on the device ---------------------------------------------------------------

# Op tests first, so that a time-boxed run covers the kernels before the model and tooling tests.
PYTEST_FIRST = (
    "tests/test_ops.py",
    "tests/test_nan_propagation.py",
    "tests/test_image_text_attention_triton.py",
    "tests/test_image_text_attention_cuda_sim.py",
    "tests/test_perceiver_attention_cuda_sim.py",
    "tests/test_block_chunk_schedule.py",
    "tests/test_triton_block_chunk_schedule.py",
)
# The dry run: a short subset through the reference and the SIMT emulator.
PYTEST_DRY_RUN = ("tests/test_nan_propagation.py", "-k", "(reference or cuda_sim) and 40 and nan")


def stage_pytest(result: StageResult, logs: Path, budget_s: float, dry_run: bool) -> None:
    env = dict(os.environ)
    if dry_run:
        selection = list(PYTEST_DRY_RUN)
    else:
        env["VLMK_TEST_DEVICE"] = "cuda"
        env.pop("TRITON_INTERPRET", None)
        selection = [*PYTEST_FIRST, "tests"]
        if importlib.util.find_spec("xdist") is not None:  # the lent machine has it; 16 cores
            selection = ["-n", str(min(8, os.cpu_count() or 1)), *selection]
    command = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *selection]
    code, tail = run_logged(command, logs / "pytest.log", budget_s, env)
    counts = _pytest_counts(tail)
    result.figures = {"exit_code": code, **counts}
    result.status = "ok" if code == 0 else ("partial" if code == 124 else "failed")
    closing = next((line for line in reversed(tail.splitlines()) if " in " in line), tail[-200:])
    result.summary = closing.strip("= ") if code != 124 else "killed at the stage's time box"


def _pytest_counts(tail: str) -> dict:
    counts = {}
    for line in reversed(tail.splitlines()):
        if " in " in line and ("passed" in line or "failed" in line or "error" in line):
            for part in line.strip("= ").split(" in ")[0].split(","):
                number, _, word = part.strip().partition(" ")
                if number.isdigit():
                    counts[word] = int(number)
            break
    return counts


# ---- stage 3: the thin model where a user runs it --------------------------------------------------------


def model_commands(run_dir: Path, device: str, dry_run: bool) -> list[tuple[str, list[str]]]:
    """The ``python -m model`` command lines of the model stage, in order (the tiny preset: the
    point is that every path runs on the device, not how well it learns)."""
    tiny = ["--preset", "tiny", "--batch-size", "8", "--warmup-steps", "1"]
    where = ["--device", device, "--threads", "1"]
    run = str(run_dir)
    commands = [
        ("train", ["train", *tiny, "--steps", "4", "--eval-every", "2", "--eval-examples", "8",
                   "--out", run, *where]),
        ("resume --steps 6", ["train", "--resume", run, "--steps", "6", *where]),
        ("generate video", ["generate", "--checkpoint", run, "--task", "video", "--count", "4",
                            *where]),
        ("eval", ["eval", "--checkpoint", run, "--examples", "8", *where]),
    ]  # fmt: skip
    graph = ["generate", "--checkpoint", run, "--task", "interleaved", "--count", "4"]
    commands.append(("generate interleaved --cuda-graph", [*graph, "--cuda-graph", *where]))
    return commands


def stage_model(result: StageResult, logs: Path, budget_s: float, dry_run: bool) -> None:
    """Runs ``model_commands`` in this process (their output to logs/model.log), then a text-only
    generate of the trained checkpoint; each row says what ran, its exit code and seconds. A
    command that exits non-zero or raises fails the stage; one past the time box is left out."""
    import tempfile

    import torch

    from model.checkpoint import load_model
    from model.cli import main as model_main
    from model.vlm import generate

    device = "cpu" if dry_run else "cuda"
    deadline = time.monotonic() + budget_s
    threads = (
        torch.get_num_threads()
    )  # the model CLI sets its own; the later stages get theirs back
    rows = []
    with tempfile.TemporaryDirectory() as tmp, open(logs / "model.log", "w") as log_file:
        run_dir = Path(tmp) / "run"
        try:
            for what, argv in model_commands(run_dir, device, dry_run):
                if dry_run and "--cuda-graph" in argv:
                    rows.append({"what": what, "status": "skipped", "reason": DRY_RUN_GRAPH_REASON})
                    continue
                if time.monotonic() > deadline:
                    rows.append({"what": what, "status": "skipped", "reason": "out of time"})
                    continue
                log_file.write(f"$ python -m model {' '.join(argv)}\n")
                log_file.flush()
                started = time.monotonic()
                with contextlib.redirect_stdout(log_file), contextlib.redirect_stderr(log_file):
                    code = model_main(argv)
                rows.append(
                    {
                        "what": what,
                        "status": "ok" if code == 0 else "failed",
                        "exit_code": code,
                        "seconds": time.monotonic() - started,
                    }
                )
                if code != 0:
                    break  # the later commands read what this one should have written
            if all(r["status"] == "ok" or r.get("reason") == DRY_RUN_GRAPH_REASON for r in rows):
                started = time.monotonic()
                model, tokenizer = load_model(run_dir, device)
                ids = torch.tensor([[tokenizer.bos_id, tokenizer.ids["video"]]], device=device)
                out = generate(model, ids, None, 3)
                rows.append(
                    {
                        "what": "generate text only (media=None)",
                        "status": "ok",
                        "exit_code": 0,
                        "seconds": time.monotonic() - started,
                        "text": tokenizer.decode(out[0].cpu()),
                    }
                )
        finally:
            torch.set_num_threads(threads)
    result.figures = {"device": device, "commands": rows}
    failed = [r["what"] for r in rows if r["status"] == "failed"]
    ran = [r for r in rows if r["status"] == "ok"]
    skipped = [f"{r['what']} skipped: {r['reason']}" for r in rows if r["status"] == "skipped"]
    if failed:
        result.status = "failed"
        result.summary = f"failed: {', '.join(failed)} (logs/model.log)"
    else:
        out_of_time = any(r.get("reason") == "out of time" for r in rows)
        result.status = "partial" if out_of_time else "ok"
        result.summary = "; ".join(
            [
                f"{len(ran)} ran on {device} in {sum(r['seconds'] for r in ran):.1f} s: "
                + ", ".join(r["what"] for r in ran),
                *skipped,
            ]
        )


# ---- stage 4: every Triton config against the reference ------------------------------------------------


@dataclass(frozen=True)
class ConfigCase:
    """One image_text_attention case for the config sweep."""

    batch: int
    query_len: int
    heads_q: int
    heads_kv: int
    head_dim: int
    chunks: int
    media_len: int
    dtype: str
    empty_rows: str
    backward: bool

    @property
    def label(self) -> str:
        return (
            f"B{self.batch} Lq{self.query_len} H{self.heads_q}/{self.heads_kv} Dh{self.head_dim} "
            f"{self.chunks}x{self.media_len} {self.dtype} {self.empty_rows}"
            + (" fwd+bwd" if self.backward else " fwd")
        )


def config_cases(dry_run: bool, index: int) -> tuple[list[ConfigCase], list[ConfigCase]]:
    """(small, large) cases for config ``index`` of a kernel: each config sees every dtype, the head
    dims rotate with the index (so a kernel's configs together cover Dh 64/80/96/128 in each dtype),
    GQA 4:1 and 1:1 and both empty-row modes alternate; prefill with backward, and decode."""
    if dry_run:
        return [
            ConfigCase(1, 20, 2, 1, 16, 2, 8, "float32", "zero", True),
            ConfigCase(1, 3, 2, 1, 16, 2, 8, "bfloat16", "uniform", False),
        ], []
    head_dims = (64, 80, 96, 128)
    small = []
    for j, dtype in enumerate(("float32", "bfloat16", "float16")):
        head_dim = head_dims[(index + j) % 4]
        heads_kv = 2 if (index + j) % 2 else 8
        empty_rows = ("zero", "uniform")[(index + j) % 2]
        small.append(ConfigCase(2, 97, 8, heads_kv, head_dim, 3, 77, dtype, empty_rows, True))
        small.append(ConfigCase(2, 5, 8, heads_kv, head_dim, 3, 77, dtype, empty_rows, False))
    large = [
        ConfigCase(1, 512, 32, 8, 128, 4, 1601, "bfloat16", "zero", True),
        ConfigCase(8, 1, 32, 8, 128, 4, 1601, "bfloat16", "uniform", False),
    ]
    return small, large


def _nan_poisoned_kernels(chunks: int, media_len: int):
    """The triton backend's kernel-table forward/backward, called with the last chunk's keys and
    values overwritten by NaN (the case's mask hides that chunk from every row): a kernel that loads
    a chunk it should skip, or multiplies its values by a zero probability, turns NaN."""
    from vlm_kernels.triton.image_text_attention import (
        image_text_attention_bwd_triton,
        image_text_attention_fwd_triton,
    )

    unseen = slice((chunks - 1) * media_len, chunks * media_len)

    def poison(*tensors):
        poisoned = [t.clone() for t in tensors]
        for t in poisoned:
            t[:, unseen] = float("nan")
        return poisoned

    def forward(q, k, v, *rest):
        return image_text_attention_fwd_triton(q, *poison(k, v), *rest)

    def backward(grad_out, q, k, v, *rest):
        return image_text_attention_bwd_triton(grad_out, q, *poison(k, v), *rest)

    return forward, backward


def run_config_case(case: ConfigCase, device: str) -> None:
    """Raises AssertionError (with the failing quantity) unless the triton backend matches the
    reference on ``case``."""
    import torch

    from tests.attention_testing import check_against_reference, make_case

    attention = make_case(
        case.batch,
        case.query_len,
        case.heads_q,
        case.heads_kv,
        case.head_dim,
        case.chunks,
        case.media_len,
        dtype=getattr(torch, case.dtype),
        mask_kind="random",
        empty_rows=case.empty_rows,
        device=device,
    )
    if case.empty_rows == "zero":
        # Nobody sees the last chunk, which is poisoned with NaN (random masks keep empty rows).
        attention.media_mask[..., -1] = False
        forward, backward = _nan_poisoned_kernels(case.chunks, case.media_len)
    else:
        # "uniform" opens every chunk to an empty row, so nothing may be poisoned.
        from vlm_kernels.ops.image_text_attention import TABLE

        forward, backward = TABLE.forward["triton"], TABLE.backward["triton"]
    check_against_reference(attention, forward, backward if case.backward else None)


def sweep_order(counts: dict[str, int], dry_run: bool) -> list[tuple[str, int, ConfigCase]]:
    """Every (kernel, config, case) of the sweep, breadth first: the first case of every (kernel,
    config), then the second of each, ... then the large cases, so that a time-boxed run that stops
    early has still run every config of every kernel at least once."""
    per_config = {
        (kernel, index): [*small, *large]
        for kernel, count in counts.items()
        for index in range(count)
        for small, large in [config_cases(dry_run, index)]
    }
    slots = max((len(cases) for cases in per_config.values()), default=0)
    return [
        (kernel, index, cases[slot])
        for slot in range(slots)
        for (kernel, index), cases in per_config.items()
        if slot < len(cases)
    ]


def _sweep_configs(counts, device, dry_run, deadline, rows, log_file) -> tuple[int, int]:
    """Runs the (kernel, config, case) sweep into ``rows``; returns (skipped for time, failures)."""
    import torch

    from vlm_kernels.triton._launch import force_triton_config

    skipped = failures = 0
    for kernel, index, case in sweep_order(counts, dry_run):
        if time.monotonic() > deadline:
            skipped += 1
            continue
        # Fresh random inputs, reproducible from the row's name (a failure reruns the same way).
        torch.manual_seed(zlib.crc32(f"{kernel}/{index}/{case.label}".encode()))
        started = time.monotonic()
        with contextlib.ExitStack() as stack:
            for other in counts:  # hold every other kernel at config 0: no autotuning
                stack.enter_context(force_triton_config(other, 0))
            stack.enter_context(force_triton_config(kernel, index))
            try:
                run_config_case(case, device)
                status, detail = "ok", ""
            except Exception as exc:  # AssertionError, or a launch/compile error
                status, detail = "FAIL", f"{type(exc).__name__}: {exc}".splitlines()[0]
                failures += 1
                log_file.write(traceback.format_exc())
        if device == "cuda":
            torch.cuda.synchronize()
        row = dict(kernel=kernel, config=index, case=case.label, status=status)
        row.update(seconds=round(time.monotonic() - started, 2), detail=detail[:300])
        rows.append(row)
        log_file.write(f"{kernel} config {index} {case.label}: {status} {detail}\n")
        log_file.flush()
        if status != "ok":
            log(f"  {kernel} config {index} {case.label}: {detail[:160]}")
    log(f"configs: {len(rows)} runs, {failures} failed, {skipped} skipped for time")
    return skipped, failures


SWEPT_KERNEL_PREFIX = "image_text_attention"


def triton_config_counts() -> dict[str, int]:
    """Kernel name -> its number of autotune configs, for the image_text_attention kernels: the
    sweep's cases are attention cases. The patch_embed and concat_project Triton tests force each of
    their kernels' configs themselves (tests/test_*_triton.py), and the pytest stage runs them on
    the device."""
    from vlm_kernels.triton._launch import triton_config_counts as counts

    return {name: n for name, n in counts().items() if name.startswith(SWEPT_KERNEL_PREFIX)}


def stage_configs(result: StageResult, logs: Path, budget_s: float, dry_run: bool) -> None:
    device = "cpu" if dry_run else "cuda"
    deadline = time.monotonic() + budget_s
    counts = triton_config_counts()
    rows, skipped, failures = [], 0, 0
    with open(logs / "configs.log", "a") as log_file:
        skipped, failures = _sweep_configs(counts, device, dry_run, deadline, rows, log_file)
    result.figures = {"kernels": counts, "cases": rows, "skipped_for_time": skipped}
    ran = len(rows)
    result.status = "failed" if failures else ("partial" if skipped else "ok")
    result.summary = f"{ran - failures}/{ran} (kernel, config, case) runs match the reference" + (
        f"; {skipped} skipped for time" if skipped else ""
    )


# ---- stage 5: benchmarks ---------------------------------------------------------------------------------

_ATTENTION_PROVIDERS = ("vk-triton", "vk-cuda", "sdpa", "sdpa_nomask", "flex")
# (op, shape, variants, modes, providers); "vs peer" is against sdpa where it runs, else the op's
# default baseline (conv for patch_embed, cat_linear for concat_project).
BENCH_PLAN = (
    (
        "image_text_attention",
        "mllama-11b",
        ("1of4", "causal", "all", "random"),
        ("fwd", "fwd_bwd"),
        _ATTENTION_PROVIDERS,
    ),
    (
        "image_text_attention",
        "mllama-11b-decode",
        ("last", "all", "random"),
        ("fwd",),
        _ATTENTION_PROVIDERS,
    ),
    (
        "perceiver_attention",
        "flamingo-perceiver",
        ("none", "pad"),
        ("fwd", "fwd_bwd"),
        ("vk-triton", "vk-cuda", "sdpa", "eager"),
    ),
    (
        "patch_embed",
        "clip-vit-l14-336",
        ("float", "uint8"),
        ("fwd", "fwd_bwd"),
        ("vk-triton", "vk-cuda", "conv", "unfold_linear", "mm"),
    ),
    (
        "concat_project",
        "mllama-projector",
        ("default",),
        ("fwd", "fwd_bwd"),
        ("vk-triton", "vk-cuda", "cat_linear"),
    ),
)
DRY_RUN_PLAN = (
    (
        "image_text_attention",
        "tiny",
        ("1of4", "all"),
        ("fwd",),
        ("vk-triton", "vk-reference", "sdpa", "sdpa_nomask"),
    ),
    ("perceiver_attention", "tiny", ("pad",), ("fwd",), ("vk-reference", "sdpa")),
    ("patch_embed", "tiny", ("uint8",), ("fwd",), ("vk-reference", "conv", "mm")),
    ("concat_project", "tiny", ("default",), ("fwd",), ("vk-reference", "cat_linear")),
)


def matmul_tflops(device: str, dry_run: bool) -> float:
    """bf16 matmul TFLOP/s of this device (8192^3 on a GPU; 512^3 timed on the CPU in a dry run)."""
    import torch

    n = 512 if dry_run else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    if dry_run:
        started = time.perf_counter()
        torch.mm(a, b)
        seconds = time.perf_counter() - started
    else:
        import triton.testing

        seconds = triton.testing.do_bench(lambda: torch.mm(a, b), warmup=25, rep=200) * 1e-3
    return 2 * n**3 / seconds / 1e12


# ---- decode: eager vs CUDA graph ---------------------------------------------------------------------------

DECODE_GRAPH_BATCHES = (1, 8)
DECODE_GRAPH_VARIANT = "all"  # every token sees every image: the most kernel work per step
DECODE_GRAPH_CALLS = 50  # calls per timed round, back to back as a decode loop issues them
DECODE_GRAPH_ROUNDS = 5  # the median of these rounds is reported
# Two generate lengths; their time difference over their token difference is the per-token time
# (the prompt, the vision tower and, with a graph, the warm-up and the capture cancel out). Far
# apart, so that the capture's variable cost (torch.cuda.graph runs gc.collect) stays small next to
# the tokens' time; the model's max_seq_len is raised to fit.
MODEL_DECODE_TOKENS = {False: (8, 104), True: (3, 27)}  # by dry_run
MODEL_DECODE_ROUNDS = 3
DRY_RUN_GRAPH_REASON = "CUDA graphs need a GPU; the dry run times the eager path only"


def time_per_call(call: Callable[[], object], device, calls: int, rounds: int) -> float:
    """Milliseconds per call: ``rounds`` rounds of ``calls`` back-to-back calls (CUDA events around
    each round on a GPU, the wall clock on the CPU); the median round. Back to back, so that a call
    whose launches take longer than its kernels shows the launch cost, as in a decode loop."""
    import statistics

    import torch

    call()  # warm (compilation, lazy schedules)
    per_call = []
    for _ in range(rounds):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                call()
            end.record()
            end.synchronize()
            per_call.append(start.elapsed_time(end) / calls)
        else:
            started = time.perf_counter()
            for _ in range(calls):
                call()
            per_call.append((time.perf_counter() - started) * 1e3 / calls)
    return statistics.median(per_call)


def capture_cuda_graph(call: Callable[[], object]):
    """(graph, output): ``call`` warmed up on a side stream, then captured in a CUDA graph whose
    replay rewrites ``output`` in place."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = call()
    return graph, output


def _decode_row(what: str, batch: int) -> dict:
    return dict(
        what=what,
        batch=batch,
        status="ok",
        reason="",
        eager_ms=None,
        graph_ms=None,
        graph_speedup=None,
        graph_matches_eager=None,
    )


def attention_decode_rows(dry_run: bool, rows: list[dict]) -> None:
    """Appends to ``rows``: vk.image_text_attention at the mllama-11b decode shape (bf16, Lq=1) with
    a prebuilt MediaSchedule, per call: eager, and captured in a CUDA graph and replayed (dry run:
    the tiny shape through the Triton interpreter, eager only)."""
    import dataclasses

    import torch

    import vlm_kernels as vk
    from benchmarks.ops.image_text_attention import SHAPES

    device = torch.device("cpu" if dry_run else "cuda")
    base = SHAPES["tiny" if dry_run else "mllama-11b-decode"]
    calls, rounds = (2, 1) if dry_run else (DECODE_GRAPH_CALLS, DECODE_GRAPH_ROUNDS)
    for batch in DECODE_GRAPH_BATCHES:
        shape = dataclasses.replace(base, params={**base.params, "B": batch, "Lq": 1})
        row = _decode_row(
            f"image_text_attention {base.name} Lq1 {DECODE_GRAPH_VARIANT} bf16", batch
        )
        rows.append(row)
        inputs = shape.build(DECODE_GRAPH_VARIANT, torch.bfloat16, device)
        t = inputs.tensors
        schedule = vk.MediaSchedule(t["media_mask"], media_len=inputs.options["media_len"])

        def decode(t=t, schedule=schedule):
            return vk.image_text_attention(t["q"], t["k"], t["v"], schedule, backend="triton")

        row["eager_ms"] = time_per_call(decode, device, calls, rounds)
        if dry_run:
            row["status"], row["reason"] = "skipped", DRY_RUN_GRAPH_REASON
            continue
        graph, output = capture_cuda_graph(decode)
        row["graph_ms"] = time_per_call(graph.replay, device, calls, rounds)
        row["graph_speedup"] = row["eager_ms"] / row["graph_ms"]
        graph.replay()
        row["graph_matches_eager"] = bool(torch.equal(output, decode()))


def model_decode_rows(dry_run: bool, rows: list[dict]) -> None:
    """Appends to ``rows``: the thin model's (model/) per-token generate time, greedy, eager and with
    ``cuda_graph=True``, at a random initialisation of the demo preset (dry run: the tiny preset on
    the CPU, eager only). The <eos> row of the output layer is zeroed so that no row stops early."""
    import torch

    from model.config import TrainConfig
    from model.tokenizer import Tokenizer
    from model.train import build_model
    from model.vlm import generate

    device = torch.device("cpu" if dry_run else "cuda")
    short, long = MODEL_DECODE_TOKENS[dry_run]
    prompt_len = 2  # <bos> <image>
    train_config = TrainConfig(
        preset="tiny" if dry_run else "demo", model_overrides={"max_seq_len": prompt_len + long}
    )
    model = build_model(train_config, Tokenizer.for_tasks()).to(device).eval()
    config = model.config
    with torch.no_grad():
        model.decoder.output.weight[config.eos_id] = 0.0  # timing only: nobody stops at <eos>
    for batch in DECODE_GRAPH_BATCHES:
        row = _decode_row(
            f"model generate, {'tiny' if dry_run else 'demo'} preset, per token", batch
        )
        rows.append(row)
        generator = torch.Generator().manual_seed(batch)
        media = torch.randint(
            0,
            256,
            (batch, 1, config.channels, config.image_size, config.image_size),
            generator=generator,
        )
        media = media.to(torch.uint8).to(device)
        prompt = torch.tensor([[config.bos_id, config.image_id]], device=device)
        prompt = prompt.expand(batch, prompt_len)
        outputs = {}
        for cuda_graph in (False, True) if not dry_run else (False,):
            seconds = {}
            for new_tokens in (short, long):
                samples = []
                for _ in range(MODEL_DECODE_ROUNDS):
                    started = time.perf_counter()
                    out = generate(model, prompt, media, new_tokens, cuda_graph=cuda_graph)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    samples.append(time.perf_counter() - started)
                if out.shape[1] != prompt.shape[1] + new_tokens:
                    raise RuntimeError(f"generate stopped after {out.shape[1]} of {new_tokens}")
                # The fastest round: interference only adds time, and the per-token figure is a
                # difference of two timings (medians on a busy machine made it negative).
                seconds[new_tokens] = min(samples)
                outputs[cuda_graph] = out
            per_token_ms = (seconds[long] - seconds[short]) * 1e3 / (long - short)
            row["graph_ms" if cuda_graph else "eager_ms"] = per_token_ms
        if dry_run:
            row["status"], row["reason"] = "skipped", DRY_RUN_GRAPH_REASON
            continue
        row["graph_speedup"] = row["eager_ms"] / row["graph_ms"]
        row["graph_matches_eager"] = bool(torch.equal(outputs[True], outputs[False]))


def decode_graph_rows(dry_run: bool, log_file) -> list[dict]:
    """The attention op's and the thin model's decode, eager vs CUDA graph; a part that raises
    ends with an error row (its traceback in the log), after the rows it finished, and the other
    part still runs."""
    rows = []
    for what, part in (
        ("image_text_attention decode", attention_decode_rows),
        ("model generate", model_decode_rows),
    ):
        try:
            part(dry_run, rows)
        except Exception as exc:
            log_file.write(traceback.format_exc())
            row = _decode_row(what, 0)
            row["status"], row["reason"] = "error", f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
    for row in rows:
        log_file.write(json.dumps(row) + "\n")
        times = f"eager {_fmt(row['eager_ms'], '.3f')} ms"
        if row["graph_ms"] is not None:
            times += f", graph {row['graph_ms']:.3f} ms ({row['graph_speedup']:.2f}x)"
        log(f"bench: {row['what']} B{row['batch']}: {row['status']}, {times}. {row['reason']}")
    return rows


def stage_bench(result: StageResult, logs: Path, budget_s: float, dry_run: bool) -> None:
    import torch

    from benchmarks import registry
    from benchmarks.runner import Case, RunConfig, run_case

    device = torch.device("cpu" if dry_run else "cuda")
    deadline = time.monotonic() + budget_s
    peak = matmul_tflops(device.type, dry_run)
    log(f"bench: bf16 matmul {peak:.3g} TFLOP/s")
    config = RunConfig(device=device, repeats=1 if dry_run else 10, warmup=1 if dry_run else 3)
    config = RunConfig(**{**asdict(config), "memory": not dry_run, "baselines": ("sdpa",)})
    rows, skipped = [], 0
    with open(logs / "bench.log", "a") as log_file:
        # First: a few seconds, and the measurement of graph-safe decode (issue 9).
        decode_rows = decode_graph_rows(dry_run, log_file)
        for op, shape, variants, modes, names in DRY_RUN_PLAN if dry_run else BENCH_PLAN:
            providers = [registry.get_provider(op, name) for name in names]
            for mode in modes:
                for variant in variants:
                    case = Case(op, shape, variant, "bf16", mode)
                    if time.monotonic() > deadline:
                        skipped += 1
                        continue
                    for r in run_case(case, providers, config):
                        tflops = r.gflops / 1000 if r.gflops else None
                        row = dict(
                            op=op,
                            shape=shape,
                            variant=variant,
                            mode=mode,
                            provider=r.provider,
                            status=r.status,
                            reason=r.reason,
                            median_ms=r.median_ms,
                            baseline=r.baseline,
                            speedup_vs_baseline=r.speedup,
                            visible_tflops=tflops,
                            of_matmul=tflops / peak if tflops else None,
                            max_abs_err=r.max_abs_err,
                            peak_mem_bytes=r.peak_mem_bytes,
                        )
                        rows.append(row)
                        log_file.write(json.dumps(row) + "\n")
                    log(f"bench: {case.label} done")
    result.figures = {
        "matmul_bf16_tflops": peak,
        "rows": rows,
        "decode_graph": decode_rows,
        "skipped_for_time": skipped,
    }
    errors = [
        f"{r['provider']}: {r['reason']}"
        for r in rows
        if r["status"] == "error" and r["provider"].startswith("vk-")
    ]
    errors += [
        f"{r['what']} B{r['batch']}: {r['reason'] or 'graph output differs from eager'}"
        for r in decode_rows
        if r["status"] == "error" or r["graph_matches_eager"] is False
    ]
    result.status = "failed" if errors else ("partial" if skipped else "ok")
    result.summary = f"{len(rows)} timings" + (
        f", {skipped} cases skipped for time" if skipped else ""
    )
    graph_b8 = [r for r in decode_rows if r["batch"] == 8 and r["graph_speedup"]]
    if graph_b8:
        result.summary += "; decode B8 graph/eager: " + ", ".join(
            f"{r['what'].split(',')[0]} {r['graph_speedup']:.2f}x" for r in graph_b8
        )
    if errors:
        result.summary += "; errors: " + "; ".join(errors)


# ---- report ----------------------------------------------------------------------------------------------


def _fmt(value, spec: str = ".2f") -> str:
    return "" if value is None else format(value, spec)


def write_report(out: Path, info: dict, stages: list[StageResult], total_s: float) -> None:
    lines = [
        "# vlm_kernels gpu-check",
        "",
        f"{info['date']} on {info['device']}"
        + (
            f" (sm_{info['capability'].replace('.', '')}, {info['sms']} SMs)"
            if "sms" in info
            else ""
        ),
        "",
        f"python {info['python']}, torch {info['torch']} (CUDA {info['torch_cuda']}), "
        f"triton {info['triton']}, {info.get('nvcc', 'no nvcc')}; {total_s:.0f} s in all.",
        "",
        "| stage | status | seconds | summary |",
        "|---|---|---:|---|",
    ]
    for s in stages:
        summary = s.summary.replace("\n", " ").replace("|", "/")[:300]
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {summary} |")
    bench = next((s for s in stages if s.name == "bench" and s.figures.get("rows")), None)
    if bench is not None:
        lines += [
            "",
            f"## the ops, bf16 (device bf16 matmul: "
            f"{bench.figures['matmul_bf16_tflops']:.3g} TFLOP/s; attention TFLOP/s count visible "
            f"work only)",
            "",
            "| op | shape | variant | mode | provider | median ms | vs peer | TFLOP/s | of matmul "
            "| note |",
            "|---|---|---|---|---|---:|---:|---:|---:|---|",
        ]
        for r in bench.figures["rows"]:
            lines.append(
                f"| {r['op']} | {r['shape']} | {r['variant']} | {r['mode']} | {r['provider']} | "
                f"{_fmt(r['median_ms'], '.3f')} | {_fmt(r['speedup_vs_baseline'])} "
                f"{'' if r['speedup_vs_baseline'] is None else 'x ' + r['baseline']} | "
                f"{_fmt(r['visible_tflops'], '.1f')} | {_fmt(r['of_matmul'], '.0%')} | "
                f"{'' if r['status'] == 'ok' else r['status'] + ': ' + r['reason'][:80]} |"
            )
    decode = next((s for s in stages if s.name == "bench" and s.figures.get("decode_graph")), None)
    if decode is not None:
        lines += [
            "",
            "## decode: eager vs CUDA graph (per call / per token; target: graph >= 2x eager at B=8)",
            "",
            "| what | B | eager ms | graph ms | graph speedup | graph == eager | note |",
            "|---|---:|---:|---:|---:|---|---|",
        ]
        for r in decode.figures["decode_graph"]:
            same = "" if r["graph_matches_eager"] is None else str(r["graph_matches_eager"])
            note = "" if r["status"] == "ok" else f"{r['status']}: {r['reason'][:100]}"
            lines.append(
                f"| {r['what']} | {r['batch']} | {_fmt(r['eager_ms'], '.3f')} | "
                f"{_fmt(r['graph_ms'], '.3f')} | {_fmt(r['graph_speedup'])} | {same} | {note} |"
            )
    configs = next((s for s in stages if s.name == "configs" and s.figures.get("cases")), None)
    if configs is not None:
        failed = [c for c in configs.figures["cases"] if c["status"] != "ok"]
        lines += ["", "## Triton configs", "", configs.summary, ""]
        lines += [
            f"- FAIL {c['kernel']} config {c['config']} {c['case']}: {c['detail']}" for c in failed
        ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    figures = {"environment": info, "total_s": total_s, "stages": [asdict(s) for s in stages]}
    (out / "figures.json").write_text(json.dumps(figures, indent=1, default=str))


# ---- main ------------------------------------------------------------------------------------------------

STAGES: dict[str, Callable] = {
    "build": stage_build,
    "pytest": stage_pytest,
    "model": stage_model,
    "configs": stage_configs,
    "bench": stage_bench,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu-check")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S)
    parser.add_argument("--dry-run", action="store_true", help="the same plumbing on this CPU")
    parser.add_argument("--skip", default="", help="comma-separated stages to leave out")
    args = parser.parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be on before triton is first imported: start again with it set.
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        command = [sys.executable, "-m", "vlm_kernels.tools.gpu_check", *sys.argv[1:]]
        return subprocess.run(command, env=env, cwd=ROOT).returncode
    sys.path.insert(0, str(ROOT))  # tests/ (the tolerance policy) and benchmarks/
    import torch

    if args.dry_run:  # the interpreter's bf16 tl.dot fault, patched as the tests do (DESIGN §4)
        from tests.triton_interpreter import patch_interpreter_bf16_dot

        patch_interpreter_bf16_dot()

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --dry-run")
    out = args.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for stale in logs.glob("*.log"):
        stale.unlink()
    clock = Clock(args.budget_s)
    info = environment(args.dry_run)
    log(
        f"python {info['python']}, torch {info['torch']}, triton {info['triton']}, "
        f"device {info['device']}; budget {args.budget_s:.0f} s; report in {out}"
    )
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    stages = []
    for name, run in STAGES.items():
        result = StageResult(name)
        stages.append(result)
        budget = clock.stage_budget(name)
        if name in skip:
            result.summary = "skipped (--skip)"
        elif budget < STAGE_MIN_S[name]:
            result.summary = f"skipped for time ({clock.left():.0f} s of the budget left)"
        elif name != "build" and stages[0].status == "failed":
            result.summary = "skipped: the build failed"
        else:
            log(f"{name}: starting ({budget:.0f} s at most)")
            started = time.monotonic()
            try:
                run(result, logs, budget, args.dry_run)
            except Exception as exc:
                result.status, result.summary = "failed", f"{type(exc).__name__}: {exc}"
                with open(logs / f"{name}.log", "a") as f:
                    f.write(traceback.format_exc())
            result.seconds = time.monotonic() - started
        log(
            f"{name}: {result.status} ({result.seconds:.0f} s) {result.summary.splitlines()[0][:200] if result.summary else ''}"
        )
        write_report(out, info, stages, time.monotonic() - clock.start)
    total = time.monotonic() - clock.start
    write_report(out, info, stages, total)
    log(f"done in {total:.0f} s: {out / 'report.md'}")
    return 1 if any(s.status == "failed" for s in stages) else 0


if __name__ == "__main__":
    sys.exit(main())
