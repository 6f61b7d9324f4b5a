"""The SIMT emulator's own C++ tests: configure and build the CMake project, then run ctest.

The emulator (csrc/simt) runs the CUDA kernels' source on the CPU for the ``cuda_sim`` backend; its
ctest suite checks barriers, shared memory, warp collectives, atomics, 16-bit floats, deadlock
detection, that a kernel missing a ``__syncthreads`` gives a wrong answer under it, shared-memory
poison, and that the race checker (SIMT_RACECHECK) reports planted races and passes clean kernels. The build
directory (build/cmake) is kept, so later runs only rebuild what changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.devices import cpu_only

pytestmark = cpu_only  # the emulator runs on the CPU; VLMK_TEST_DEVICE=cuda runs the real kernels

ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = ROOT / "build" / "cmake"


def _ninja() -> str | None:
    beside_python = Path(sys.executable).parent / "ninja"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("ninja")


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def _check(result: subprocess.CompletedProcess[str], what: str) -> None:
    output = (result.stdout + result.stderr)[-8000:]
    assert result.returncode == 0, f"{what} failed (exit {result.returncode}):\n{output}"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.skipif(shutil.which("ctest") is None, reason="ctest is not installed")
def test_simt_emulator_ctest() -> None:
    configure = ["cmake", "-S", str(ROOT), "-B", str(BUILD_DIR), "-DVLMK_BUILD_LIBRARY=OFF"]
    ninja = _ninja()
    if ninja is not None and not (BUILD_DIR / "CMakeCache.txt").exists():
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    _check(_run(configure, timeout=300), "cmake configure")

    jobs = str(os.cpu_count() or 2)
    _check(_run(["cmake", "--build", str(BUILD_DIR), "-j", jobs], timeout=900), "cmake build")

    result = _run(
        ["ctest", "--test-dir", str(BUILD_DIR), "--output-on-failure", "-j", jobs], timeout=600
    )
    _check(result, "ctest")
    assert "100% tests passed" in result.stdout, result.stdout[-4000:]
