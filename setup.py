"""Builds ``vlm_kernels._C``: the C++ CPU kernels and the SIMT-emulated CUDA kernels always, the real CUDA
kernels when nvcc is found.

Environment switches (read only here):
  VLMK_SKIP_CUDA_BUILD=1   CPU-only build even when nvcc exists.
  VLMK_CUDA_ARCHS          semicolon list of SM versions, default "80;90a".
  CUDA_HOME                CUDA toolkit root, default /usr/local/cuda (torch would otherwise guess /usr/local
                           from nvcc's symlink there).
  MAX_JOBS                 parallel compile jobs (honoured by torch's ninja builder).
  VLMK_METADATA_ONLY=1     no extension: for `pip install -e .` after `setup.py build_ext --inplace` has
                           put vlm_kernels/_C*.so beside the sources (the Makefile's build), so pip's
                           editable build does not compile everything a second time in a temporary tree.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _relative_sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, pattern)))


def _want_cuda() -> bool:
    if os.environ.get("VLMK_SKIP_CUDA_BUILD", "0") == "1":
        return False
    nvcc = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    return os.path.exists(nvcc) or shutil.which("nvcc") is not None


def _gencode_flags(archs: str) -> list[str]:
    flags = []
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def _extension():
    # Torch glue (.cpp with ATen) + CPU kernels + the CUDA kernels' own source compiled for the host through
    # the SIMT emulator (the cuda_sim backend). The CUDA-only glue lives in *_cuda.cpp files.
    glue = [s for s in _relative_sources("torch/*.cpp") if not s.endswith("_cuda.cpp")]
    sources = glue + _relative_sources("cpu/*.cpp") + _relative_sources("sim/*.cpp")
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    include_dirs = [CSRC]
    if not _want_cuda():
        return CppExtension(
            "vlm_kernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    archs = os.environ.get("VLMK_CUDA_ARCHS", "80;90a")
    sources += _relative_sources("torch/*_cuda.cpp") + _relative_sources("cuda/*.cu")
    nvcc_flags = [
        "-O3",
        "-std=c++20",
        "--use_fast_math",
        "-lineinfo",
        # ptxas prints registers / spills / shared memory per kernel; the full report that tests read is
        # produced by `python -m vlm_kernels.tools.gpu_report` (build/ptxas/), which fails on any spill.
        "-Xptxas=-v",
        "-Xptxas=--warn-on-spills",
        *_gencode_flags(archs),
    ]
    return CUDAExtension(
        "vlm_kernels._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={
            # torch shell-quotes each flag for ninja, so the macro arrives as a string literal.
            "cxx": [*cxx_flags, "-DVLMK_WITH_CUDA=1", f'-DVLMK_CUDA_ARCHS="{archs}"'],
            "nvcc": nvcc_flags,
        },
        extra_link_args=["-fopenmp"],
    )


setup(
    name="vlm_kernels",
    version="0.1.0",
    description="Triton, CUDA and CPU kernels for vision-language models",
    packages=find_packages(include=["vlm_kernels", "vlm_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"triton": ["triton>=3.2"]},
    ext_modules=[] if os.environ.get("VLMK_METADATA_ONLY", "0") == "1" else [_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
