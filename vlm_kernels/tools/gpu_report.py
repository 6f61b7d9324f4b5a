"""GPU compile report: every Triton kernel at every registered config, and every CUDA source,
compiled for sm_80 and sm_90 on a machine without a GPU, with ptxas's register and spill figures.

    python -m vlm_kernels.tools.gpu_report [--arch 80 90] [--json PATH] [--cuda-sources csrc/cuda]
        [--no-cuda] [--no-triton] [--module MOD ...] [--kernel GLOB ...] [--log-dir build/ptxas]
        [--jobs N]

Triton: each kernel registered with ``vlm_kernels.triton.aot.register_aot`` (the report imports
every module of ``vlm_kernels.triton``) is compiled at each config with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, then ``ptxas -v`` (the ptxas
Triton uses, with Triton's flags) runs on the PTX for the PTX's own target (sm_90a for 90). Shared
memory comes from the compiled kernel's metadata.

CUDA: when nvcc is found (``$CUDA_HOME/bin/nvcc``, CUDA_HOME defaulting to /usr/local/cuda, else
``nvcc`` on PATH), each ``.cu`` file of ``--cuda-sources`` is compiled with ``nvcc -cubin -Xptxas -v`` for
``-arch=sm_80`` and ``-arch=sm_90a`` (include dir: the sources folder's parent, ``csrc/``; the
code-generation flags of setup.py). Shared memory is the static ``__shared__`` size plus the dynamic
size a kernel declares with a ``// gpu-report: <glob> dynamic_smem=<bytes>`` line in its ``.cu`` (the
glob matches the demangled kernel name, template arguments included). Each CUDA row also carries:
- occupancy: blocks per SM from registers (allocated per warp in units of 256), shared memory (+1 KB
  the driver reserves per block), threads (``__launch_bounds__``' first argument, ``.maxntid`` in the
  PTX) and the arch's block limit, with the limiting resource; the row fails when
  ``__launch_bounds__``' second argument (``.minnctapersm``) promises more blocks per SM than that;
- tensor-core instructions in the SASS (``cuobjdump -sass``: HMMA / HGMMA / IMMA / DMMA), and the
  ldmatrix (LDSM) and cp.async (LDGSTS) counts beside them; a kernel declared tensor-core with a
  ``// gpu-report: <glob> tensor_cores`` line fails when it has none.
Triton rows carry the same three counts, read from the PTX Triton generated (``mma.sync`` /
``wgmma.mma_async``, ``ldmatrix``, ``cp.async`` copies: each becomes one HMMA / HGMMA, LDSM, LDGSTS).

Without nvcc the ``.cu`` rows are reported as skipped, with the reason, and do not fail the report.

Logs (PTX and ptxas output per kernel, config and arch) go under ``build/ptxas/``. The exit status
is 1 when a compile fails, a kernel spills (spill stores or loads > 0), a kernel needs more shared
memory than an SM gives one block (sm_80: 163 KB = 166912 bytes, sm_90: 227 KB = 232448 bytes), a CUDA
kernel's launch bounds promise more blocks per SM than its resources allow, or a kernel declared
tensor-core has no tensor-core instruction.

The compiles run in worker processes whose environment has no ``TRITON_INTERPRET``, so the report
also runs from a test session that uses the Triton interpreter.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import fnmatch
import importlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ARCHS = (80, 90)
DEFAULT_CUDA_SOURCES = "csrc/cuda"
DEFAULT_LOG_DIR = "build/ptxas"
# The code-generation flags of setup.py's nvcc build (the -arch flag is the report's own).
NVCC_FLAGS = ("-std=c++17", "-O3", "--use_fast_math", "-lineinfo")
# Most shared memory one block may use (the opt-in dynamic maximum), bytes, by compute capability.
SHARED_MEMORY_LIMIT = {
    80: 166912,
    86: 101376,
    87: 166912,
    89: 101376,
    90: 232448,
    100: 232448,
    120: 101376,
}
_SUBPROCESS_TIMEOUT_S = 600


@dataclasses.dataclass
class Row:
    """One compiled kernel at one config for one arch (or a compile that failed)."""

    source: str  # "triton" or "cuda"
    kernel: str  # registry name (Triton) or demangled kernel name (CUDA)
    config: str  # config label (Triton) or source file (CUDA)
    arch: str  # "sm_80", "sm_90a"
    registers: int | None = None
    spill_stores: int | None = None  # bytes
    spill_loads: int | None = None  # bytes
    stack_frame: int | None = None  # bytes
    shared_memory: int | None = None  # bytes
    shared_memory_limit: int | None = None  # bytes
    error: str = ""  # compile failure, first lines
    skipped: str = ""  # why this row was not compiled (no nvcc on the machine): not a failure
    log: str = ""  # path of the ptxas log
    seconds: float = 0.0  # compile + ptxas time (CUDA: the whole file)
    # CUDA rows only (None elsewhere): see the module docstring.
    dynamic_shared_memory: int | None = None  # bytes, as declared in the .cu
    threads: int | None = None  # per block, from __launch_bounds__ (.maxntid)
    min_blocks: int | None = None  # per SM, as __launch_bounds__ promises (.minnctapersm)
    blocks_per_sm: int | None = None  # what registers, shared memory and threads allow
    occupancy_limit: str = ""  # the resource that caps blocks_per_sm
    tensor_core_ops: int | None = None  # HMMA/HGMMA/IMMA/DMMA instructions in the SASS
    ldmatrix_ops: int | None = None  # LDSM
    cp_async_ops: int | None = None  # LDGSTS
    expects_tensor_cores: bool = False  # declared with "// gpu-report: <glob> tensor_cores"

    @property
    def status(self) -> str:
        if self.error:
            return "error"
        if self.skipped:
            return "skipped"
        problems = []
        if (self.spill_stores or 0) > 0 or (self.spill_loads or 0) > 0:
            problems.append("spill")
        if (
            self.shared_memory_limit is not None
            and (self.shared_memory or 0) > self.shared_memory_limit
        ):
            problems.append("shared memory")
        if (
            self.min_blocks
            and self.blocks_per_sm is not None
            and self.min_blocks > self.blocks_per_sm
        ):
            problems.append("occupancy")
        if self.expects_tensor_cores and not self.tensor_core_ops:
            problems.append("no tensor cores")
        return " + ".join(problems) or "ok"

    @property
    def ok(self) -> bool:
        """Not a failure: compiled clean, or skipped for want of a tool (the reason is shown)."""
        return self.status in ("ok", "skipped")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "status": self.status}


def report_ok(rows: Sequence[Row]) -> bool:
    return all(row.ok for row in rows)


def sm_name(arch: int) -> str:
    """``sm_80``; ``sm_90a`` from 90 on, like Triton (arch-specific features: wgmma, setmaxnreg)."""
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


# ----------------------------------------------------------------------------------------------- pt


@dataclasses.dataclass
class PtxasFunction:
    name: str
    entry: bool = False
    registers: int | None = None
    spill_stores: int = 0
    spill_loads: int = 0
    stack_frame: int = 0
    shared_memory: int = 0


_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPS_RE = re.compile(
    r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads"
)
_USED_RE = re.compile(r"Used (\d+) registers")
_SMEM_RE = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> list[PtxasFunction]:
    """Functions of a ``ptxas -v`` log, in order: entry kernels with registers, spills, stack frame
    and static shared memory; non-inlined device functions (stack frame and spills only)."""
    functions: dict[str, PtxasFunction] = {}
    current: PtxasFunction | None = None
    lines = log.splitlines()
    for index, line in enumerate(lines):
        if match := _ENTRY_RE.search(line):
            current = functions.setdefault(match.group(1), PtxasFunction(match.group(1)))
            current.entry = True
        elif match := _PROPS_RE.search(
            line + "\n" + (lines[index + 1] if index + 1 < len(lines) else "")
        ):
            function = functions.setdefault(match.group(1), PtxasFunction(match.group(1)))
            function.stack_frame, function.spill_stores, function.spill_loads = (
                int(match.group(2)),
                int(match.group(3)),
                int(match.group(4)),
            )
        elif (match := _USED_RE.search(line)) and current is not None:
            current.registers = int(match.group(1))
            if smem := _SMEM_RE.search(line):
                current.shared_memory = int(smem.group(1))
    return list(functions.values())


def _ptxas_path() -> str:
    from triton import knobs

    return knobs.nvidia.ptxas.path  # the ptxas Triton compiles with (TRITON_PTXAS_PATH overrides)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,-]+", "_", text)


# ---------------------------------------------------------------------------------------------- wor


def _worker_main() -> None:
    """A Triton compile worker: the JSON arguments of ``_compile_triton`` per stdin line, its JSON
    result per line on the original stdout.

    Started with ``TRITON_INTERPRET`` removed from its environment, so ``@triton.jit`` builds
    JITFunctions (it reads the switch when a kernel module is imported). Anything else written to
    stdout (Triton prints the PTX of a failed ptxas run) goes to stderr: a log file of the parent's.
    """
    results = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        results.write(json.dumps(_compile_triton(*json.loads(line))) + "\n")
        results.flush()


def _compile_triton(module: str, name: str, config_index: int, arch: int, log_dir: str) -> dict:
    """Worker: compile one (kernel, config) for one arch; the figures as a Row dict."""
    start = time.perf_counter()
    row = Row("triton", name, f"config #{config_index}", sm_name(arch))
    try:
        _compile_triton_into(row, module, name, config_index, arch, log_dir)
    except Exception as error:
        row.error = row.error or _first_lines(f"{type(error).__name__}: {error}")
    row.seconds = round(time.perf_counter() - start, 3)
    return row.to_dict()


def _compile_triton_into(
    row: Row, module: str, name: str, config_index: int, arch: int, log_dir: str
) -> None:
    importlib.import_module(module)
    import triton
    from triton.backends.compiler import GPUTarget

    from vlm_kernels.triton.aot import REGISTRY

    kernel = REGISTRY.get(name)
    config = kernel.configs[config_index]
    row.config = config.label
    stem = Path(log_dir, "triton", _safe_name(name), f"{_safe_name(config.label)}.{sm_name(arch)}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    row.log = f"{stem}.log"
    signature, constexprs, attrs = kernel.compile_args(config)
    source = triton.compiler.ASTSource(
        fn=kernel.fn, signature=signature, constexprs=constexprs, attrs=attrs
    )
    try:
        compiled = triton.compile(
            source, target=GPUTarget("cuda", arch, 32), options=config.options()
        )
    except Exception as error:  # a compile error is a report row, with the traceback in the log
        Path(row.log).write_text(traceback.format_exc())
        row.error = _first_lines(f"{type(error).__name__}: {error}")
        return
    ptx = compiled.asm["ptx"]
    ptx_path = Path(f"{stem}.ptx")
    ptx_path.write_text(ptx)
    row.tensor_core_ops, row.ldmatrix_ops, row.cp_async_ops = count_ptx_instructions(ptx)
    row.arch = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE).group(1)
    row.shared_memory = compiled.metadata.shared
    row.shared_memory_limit = SHARED_MEMORY_LIMIT.get(arch)
    # Triton's own ptxas flags (make_cubin), so the figures are those of the cubin it launches.
    flags = ["-lineinfo", "-v", "--regAllocOptLevel=2"]
    if not compiled.metadata.enable_fp_fusion:
        flags.append("--fmad=false")
    if compiled.metadata.ptx_options:
        flags += compiled.metadata.ptx_options.split(" ")
    with tempfile.TemporaryDirectory() as tmp:
        command = [_ptxas_path(), *flags, f"--gpu-name={row.arch}", str(ptx_path)]
        command += ["-o", str(Path(tmp, "kernel.cubin"))]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=_SUBPROCESS_TIMEOUT_S
        )
    log = f"$ {' '.join(command)}\n{done.stdout}{done.stderr}"
    Path(row.log).write_text(log)
    if done.returncode != 0:
        row.error = _first_lines(f"ptxas exited with {done.returncode}: {done.stderr}")
        return
    functions = parse_ptxas_log(log)
    entry = next((f for f in functions if f.entry), None)
    if entry is None:
        row.error = "no entry function in the ptxas log"
        return
    row.registers = entry.registers
    row.spill_stores = sum(f.spill_stores for f in functions)
    row.spill_loads = sum(f.spill_loads for f in functions)
    row.stack_frame = entry.stack_frame


def _compile_cuda(
    path: str, arch: int, include_dirs: Sequence[str], flags: Sequence[str], log_dir: str, nvcc: str
) -> list[Row]:
    """``nvcc -cubin -Xptxas -v`` one ``.cu`` file for one arch: a Row per kernel (in a thread)."""
    start = time.perf_counter()
    target = sm_name(arch)
    log_path = Path(log_dir, "cuda", f"{_safe_name(Path(path).stem)}.{target}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    base = Row("cuda", Path(path).name, str(path), target, log=str(log_path))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp, "kernel.cubin")
        # -keep leaves the PTX (launch bounds) beside the cubin (SASS) at no extra compile cost.
        command = [nvcc, "-cubin", "-Xptxas", "-v", f"-arch={target}", "-keep", f"-keep-dir={tmp}"]
        command += [*flags, *(f"-I{d}" for d in include_dirs), "-o", str(cubin), str(path)]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=_SUBPROCESS_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            log_path.write_text(f"$ {' '.join(command)}\n{error}\n")
            base.error = _first_lines(f"{type(error).__name__}: {error}")
            return [base]
        ptx = "\n".join(p.read_text(errors="replace") for p in Path(tmp).glob("*.ptx"))
        sass = _disassemble(cubin) if done.returncode == 0 else ""
    base.seconds = round(time.perf_counter() - start, 3)
    log = f"$ {' '.join(command)}\n{done.stdout}{done.stderr}"
    log_path.write_text(log)
    if done.returncode != 0:
        base.error = _first_lines(f"nvcc exited with {done.returncode}: {done.stderr}")
        return [base]
    bounds = parse_launch_bounds(ptx)
    sass_counts = count_sass_instructions(sass)
    declarations = parse_report_declarations(Path(path).read_text(errors="replace"))
    functions = parse_ptxas_log(log)
    names = _demangle([f.name for f in functions], nvcc)
    rows = []
    for function, name in zip(functions, names, strict=True):
        if not function.entry and not (function.spill_stores or function.spill_loads):
            continue  # a device function without spills: its cost is in its callers' figures
        row = dataclasses.replace(
            base,
            kernel=name if function.entry else f"{name} (device function)",
            registers=function.registers,
            spill_stores=function.spill_stores,
            spill_loads=function.spill_loads,
            stack_frame=function.stack_frame,
            shared_memory=function.shared_memory,
            shared_memory_limit=SHARED_MEMORY_LIMIT.get(arch),
        )
        if function.entry:
            _fill_cuda_analysis(
                row, arch, bounds.get(function.name), sass_counts.get(function.name)
            )
            _apply_declarations(row, declarations)
        rows.append(row)
    return rows or [base]  # a file without kernels: one row that says so (ok, no figures)


# ---- CUDA occupancy and SASS ----------------------------------------------------------------------

# Per-SM resources of the report's archs (CUDA C Programming Guide, compute capability tables).
SM_REGISTERS = 65536
SM_MAX_THREADS = 2048
SM_MAX_BLOCKS = {80: 32, 86: 16, 89: 24, 90: 32}
SM_SHARED_MEMORY = {80: 167936, 86: 102400, 89: 102400, 90: 233472}  # bytes per SM
SHARED_MEMORY_RESERVED_PER_BLOCK = 1024  # the driver's per-block reservation (sm_80 and later)
REGISTER_ALLOCATION_UNIT = 256  # registers are allocated per warp in units of 256

_TENSOR_CORE_RE = re.compile(r"\b(?:HMMA|HGMMA|IMMA|IGMMA|DMMA|BMMA|QMMA)\b")
_LDSM_RE = re.compile(r"\bLDSM\b")
_LDGSTS_RE = re.compile(r"\bLDGSTS\b")
_FUNCTION_RE = re.compile(r"^\s*Function : (\S+)", re.MULTILINE)
_PTX_MMA_RE = re.compile(r"^\s*(?:@%p\d+\s+)?(?:mma\.sync|wgmma\.mma_async)\.", re.MULTILINE)
_PTX_LDMATRIX_RE = re.compile(r"^\s*(?:@%p\d+\s+)?ldmatrix\.", re.MULTILINE)
_PTX_CP_ASYNC_RE = re.compile(r"^\s*(?:@%p\d+\s+)?cp\.async\.(?:ca|cg|bulk)\.", re.MULTILINE)
_PTX_ENTRY_RE = re.compile(r"\.entry\s+([\w$]+)\s*\(([^{]*)\{", re.DOTALL)
_DECLARATION_RE = re.compile(r"//\s*gpu-report:\s*(\S+)\s+(.+)$", re.MULTILINE)


@dataclasses.dataclass
class LaunchBounds:
    threads: int | None = None  # .maxntid x*y*z
    min_blocks: int | None = None  # .minnctapersm


def parse_launch_bounds(ptx: str) -> dict[str, LaunchBounds]:
    """Mangled entry name -> its ``__launch_bounds__`` as the PTX states them (``.maxntid``,
    ``.minnctapersm`` between the parameter list and the body)."""
    result = {}
    for match in _PTX_ENTRY_RE.finditer(ptx):
        directives = match.group(2)[match.group(2).rfind(")") :]
        bounds = LaunchBounds()
        if found := re.search(r"\.maxntid\s+([\d,\s]+)", directives):
            bounds.threads = 1
            for size in found.group(1).replace(" ", "").strip(",").split(","):
                bounds.threads *= int(size)
        if found := re.search(r"\.minnctapersm\s+(\d+)", directives):
            bounds.min_blocks = int(found.group(1))
        result[match.group(1)] = bounds
    return result


def count_ptx_instructions(ptx: str) -> tuple[int, int, int]:
    """(tensor-core MMA, ldmatrix, cp.async copy) instructions of a PTX module."""
    return (
        len(_PTX_MMA_RE.findall(ptx)),
        len(_PTX_LDMATRIX_RE.findall(ptx)),
        len(_PTX_CP_ASYNC_RE.findall(ptx)),
    )


def count_sass_instructions(sass: str) -> dict[str, tuple[int, int, int]]:
    """Mangled function name -> (tensor-core, LDSM, LDGSTS instruction counts) of ``cuobjdump -sass``."""
    counts = {}
    starts = list(_FUNCTION_RE.finditer(sass))
    for match, following in zip(starts, [*starts[1:], None], strict=True):
        body = sass[match.end() : following.start() if following else len(sass)]
        counts[match.group(1)] = (
            len(_TENSOR_CORE_RE.findall(body)),
            len(_LDSM_RE.findall(body)),
            len(_LDGSTS_RE.findall(body)),
        )
    return counts


def parse_report_declarations(source: str) -> list[tuple[str, dict]]:
    """``// gpu-report: <glob> tensor_cores dynamic_smem=<bytes>`` lines of a ``.cu``: (glob, options)."""
    declarations = []
    for glob, options in _DECLARATION_RE.findall(source):
        parsed: dict = {}
        for word in options.split():
            key, _, value = word.partition("=")
            parsed[key] = int(value) if value else True
        declarations.append((glob, parsed))
    return declarations


def _apply_declarations(row: Row, declarations: list[tuple[str, dict]]) -> None:
    for glob, options in declarations:
        if not fnmatch.fnmatchcase(row.kernel, glob):
            continue
        if options.get("tensor_cores"):
            row.expects_tensor_cores = True
        if "dynamic_smem" in options:
            row.dynamic_shared_memory = int(options["dynamic_smem"])
            _fill_occupancy(row, int(row.arch[3:5]))


def _fill_cuda_analysis(row: Row, arch: int, bounds, counts) -> None:
    if bounds is not None:
        row.threads, row.min_blocks = bounds.threads, bounds.min_blocks
    if counts is not None:
        row.tensor_core_ops, row.ldmatrix_ops, row.cp_async_ops = counts
    _fill_occupancy(row, arch)


def _fill_occupancy(row: Row, arch: int) -> None:
    """Blocks per SM and the resource that limits them (threads default to 1024 when the kernel
    states no launch bounds: the most a block may have, the worst case)."""
    threads = row.threads or 1024
    warps = -(-threads // 32)
    regs_per_warp = (
        -(-(row.registers or 0) * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    )
    smem = (row.shared_memory or 0) + (row.dynamic_shared_memory or 0)
    limits = {
        "blocks": SM_MAX_BLOCKS.get(arch, 16),
        "threads": SM_MAX_THREADS // threads,
        "registers": SM_REGISTERS // (regs_per_warp * warps) if regs_per_warp else 10**9,
        "shared memory": SM_SHARED_MEMORY.get(arch, 102400)
        // (smem + SHARED_MEMORY_RESERVED_PER_BLOCK),
    }
    row.occupancy_limit = min(limits, key=limits.get)
    row.blocks_per_sm = limits[row.occupancy_limit]


def _cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, else the one Triton's wheel carries."""
    nvcc = _find_nvcc()
    if nvcc and (toolkit := Path(nvcc).with_name("cuobjdump")).exists():
        return str(toolkit)
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    except ImportError:
        return shutil.which("cuobjdump")
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def _disassemble(cubin: Path) -> str:
    tool = _cuobjdump()
    if tool is None:
        return ""
    done = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else ""


def _demangle(names: list[str], nvcc: str) -> list[str]:
    filt = Path(nvcc).with_name("cu++filt")
    filt = str(filt) if filt.exists() else shutil.which("c++filt")
    if not names or filt is None:
        return names
    done = subprocess.run([filt, *names], capture_output=True, text=True)
    out = done.stdout.splitlines()
    return out if done.returncode == 0 and len(out) == len(names) else names


def _first_lines(text: str, count: int = 6) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[:count]) + ("\n..." if len(lines) > count else "")


# ----------------------------------------------------------------------------------------------- re


def _find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = Path(home, "bin", "nvcc")
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path  # run from elsewhere: the repository's folder


def run_report(
    archs: Sequence[int] = DEFAULT_ARCHS,
    *,
    triton: bool = True,
    modules: Sequence[str] | None = None,
    kernels: Sequence[str] | None = None,
    cuda_sources: str | Path | None = DEFAULT_CUDA_SOURCES,
    include_dirs: Sequence[str | Path] | None = None,
    nvcc_flags: Sequence[str] = NVCC_FLAGS,
    log_dir: str | Path = DEFAULT_LOG_DIR,
    jobs: int | None = None,
) -> list[Row]:
    """Compile and measure: a Row per (kernel, config, arch) (CUDA: per kernel, file and arch).

    triton: compile the registered Triton kernels.
    modules: modules whose ``register_aot`` calls are compiled (default: every module of
        ``vlm_kernels.triton``); a module that fails to import is an error row.
    kernels: glob patterns on Triton kernel names (default: all).
    cuda_sources: folder of ``.cu`` files (None: no CUDA); a missing folder has no sources.
    include_dirs: nvcc include dirs (default: the parent of ``cuda_sources``, i.e. ``csrc/``).
    jobs: worker processes (default: the CPU count, at most 4).
    """
    from vlm_kernels.triton.aot import REGISTRY, kernel_modules

    log_dir = str(Path(log_dir).resolve())

    jobs = jobs or min(4, os.cpu_count() or 1)
    rows: list[Row] = []
    triton_tasks: list[tuple] = []  # arguments of _compile_triton
    cuda_tasks: list[tuple] = []  # arguments of _compile_cuda
    if triton:
        modules = kernel_modules() if modules is None else list(modules)
        for module in modules:
            try:
                importlib.import_module(module)
            except Exception as error:
                message = _first_lines(f"import failed: {type(error).__name__}: {error}")
                rows.append(Row("triton", module, "-", "-", error=message))
        selected = REGISTRY.from_modules(modules)
        if kernels:
            selected = [k for k in selected if any(fnmatch.fnmatch(k.name, p) for p in kernels)]
        for kernel in selected:
            for index in range(len(kernel.configs)):
                for arch in archs:
                    triton_tasks.append((kernel.module, kernel.name, index, arch, log_dir))

    if cuda_sources is not None:
        folder = _resolve(cuda_sources)
        sources = sorted(folder.glob("*.cu")) if folder.is_dir() else []
        nvcc = _find_nvcc()
        if sources and nvcc is None:
            # A machine without the CUDA toolkit still proves the Triton kernels (Triton carries
            # its own ptxas); the .cu rows say why they were not compiled, and do not fail.
            reason = (
                f"nvcc not found (CUDA_HOME={os.environ.get('CUDA_HOME', '<unset>')}, "
                "not on PATH); install the CUDA toolkit to compile the .cu sources"
            )
            rows += [
                Row("cuda", s.name, str(s), sm_name(arch), skipped=reason)
                for s in sources
                for arch in archs
            ]
        elif sources:
            includes = [str(_resolve(d)) for d in include_dirs or [folder.parent]]
            for source in sources:
                for arch in archs:
                    cuda_tasks.append(
                        (str(source), arch, includes, list(nvcc_flags), log_dir, nvcc)
                    )

    # nvcc runs from threads here; Triton compiles need worker processes (see _worker_main).
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as threads:
        cuda_results = [threads.submit(_compile_cuda, *args) for args in cuda_tasks]
        for result in _run_in_workers(triton_tasks, jobs, log_dir):
            result.pop("status")
            rows.append(Row(**result))
        for future in cuda_results:
            rows += future.result()
    return rows


class _Worker:
    def __init__(self, log_file) -> None:
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        code = (
            f"import sys; sys.path[:0] = {json.dumps(sys.path)}; "
            "from vlm_kernels.tools.gpu_report import _worker_main; _worker_main()"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            env=env,
            text=True,
        )

    def run(self, args: tuple) -> dict:
        self.process.stdin.write(json.dumps(list(args)) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker process died (exit code {self.process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def _run_in_workers(tasks: list[tuple], jobs: int, log_dir: str) -> list[dict]:
    """``_compile_triton(*args)`` for each args in ``jobs`` worker processes; results in task order.
    A task whose worker dies gets an error row and a fresh worker takes the next one."""
    results: list[dict] = [{}] * len(tasks)
    pending: queue.Queue = queue.Queue()
    for index, task in enumerate(tasks):
        pending.put((index, task))
    Path(log_dir).mkdir(parents=True, exist_ok=True)

    def serve(worker_index: int) -> None:
        with open(Path(log_dir, f"worker-{worker_index}.stderr.log"), "w") as log_file:
            worker = None
            while True:
                try:
                    index, args = pending.get_nowait()
                except queue.Empty:
                    break
                try:
                    worker = worker or _Worker(log_file)
                    results[index] = worker.run(args)
                except Exception as error:
                    _, name, config_index, arch, _ = args
                    row = Row("triton", name, f"config #{config_index}", sm_name(arch))
                    row.error = f"{error}; see {log_file.name}"
                    results[index] = row.to_dict()
                    if worker is not None:
                        worker.process.kill()
                        worker.process.wait()
                    worker = None
            if worker is not None:
                worker.close()

    threads = [
        threading.Thread(target=serve, args=(i,), daemon=True) for i in range(min(jobs, len(tasks)))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def format_table(rows: Sequence[Row]) -> str:
    headers = [
        "kernel",
        "config",
        "arch",
        "regs",
        "spill st/ld",
        "stack",
        "smem",
        "blocks/SM",
        "mma/ldsm/cp.async",
        "status",
    ]

    def number(value: int | None) -> str:
        return "-" if value is None else str(value)

    body = []
    for row in rows:
        spills = "-" if row.spill_stores is None else f"{row.spill_stores}/{row.spill_loads}"
        smem = number(row.shared_memory)
        if row.shared_memory_limit is not None and row.shared_memory is not None:
            smem += f" / {row.shared_memory_limit}"
        if row.dynamic_shared_memory:
            smem += f" (+{row.dynamic_shared_memory} dyn)"
        occupancy = "-"
        if row.blocks_per_sm is not None:
            promised = f" (>= {row.min_blocks} promised)" if row.min_blocks else ""
            occupancy = f"{row.blocks_per_sm} by {row.occupancy_limit}{promised}"
        instructions = "-"
        if row.tensor_core_ops is not None:
            instructions = f"{row.tensor_core_ops}/{row.ldmatrix_ops}/{row.cp_async_ops}"
        body.append(
            [
                row.kernel,
                row.config,
                row.arch,
                number(row.registers),
                spills,
                number(row.stack_frame),
                smem,
                occupancy,
                instructions,
                row.status,
            ]
        )
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *body, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in body]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vlm_kernels.tools.gpu_report",
        description="Compile every Triton kernel config and CUDA source for sm_80/sm_90 without "
        "a GPU; fail on compile errors, register spills or shared memory over the SM limit.",
    )
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS))
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--cuda-sources", default=DEFAULT_CUDA_SOURCES, help="folder of .cu files")
    parser.add_argument("--include", action="append", help="nvcc include dir (default: csrc/)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA sources")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    parser.add_argument(
        "--module",
        action="append",
        help="Triton kernel module to compile instead of every module of vlm_kernels.triton "
        "(repeatable)",
    )
    parser.add_argument(
        "--kernel", action="append", help="only Triton kernels matching this glob (repeatable)"
    )
    parser.add_argument("--log-dir", default=DEFAULT_LOG_DIR, help="where the ptxas logs go")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    rows = run_report(
        args.arch,
        triton=not args.no_triton,
        modules=args.module,
        kernels=args.kernel,
        cuda_sources=None if args.no_cuda else args.cuda_sources,
        include_dirs=args.include,
        log_dir=args.log_dir,
        jobs=args.jobs,
    )
    elapsed = time.perf_counter() - start
    print(format_table(rows) if rows else "nothing to compile")
    failed = [row for row in rows if not row.ok]
    skipped = [row for row in rows if row.status == "skipped"]
    print(
        f"\n{len(rows)} rows, {len(failed)} failed, {len(skipped)} skipped, {elapsed:.1f} s; "
        f"ptxas logs under {args.log_dir}/"
    )
    for reason in sorted({row.skipped for row in skipped}):
        names = sorted({row.kernel for row in skipped if row.skipped == reason})
        print(f"SKIPPED {', '.join(names)}: {reason}")
    for row in failed:
        print(f"FAIL {row.kernel} [{row.config}] {row.arch}: {row.status}; log: {row.log or '-'}")
        if row.error:
            print("    " + row.error.replace("\n", "\n    "))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "archs": args.arch,
            "ok": not failed,
            "seconds": round(elapsed, 2),
            "rows": [row.to_dict() for row in rows],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    from vlm_kernels.tools.gpu_report import (
        main as _main,
    )  # the importable module's functions pickle

    sys.exit(_main())
