"""The GPU compile report (``python -m vlm_kernels.tools.gpu_report``) and its AOT registry.

No GPU needed: Triton compiles for sm_80/sm_90 from the AST, nvcc compiles cubins, ptxas -v gives
the figures. The report must pass on the registered kernels and must catch planted faults: a
register-spilling Triton GEMM tile (128x256 bf16 at num_warps=4, DESIGN §4), a Triton kernel over
the SM's shared memory, a Triton compile error, a spilling CUDA kernel and a CUDA file that does not
compile.

The Triton compiles run in worker processes without TRITON_INTERPRET, so these tests run in the same
session as the interpreter tests.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.devices import ON_CUDA
from vlm_kernels.tools.gpu_report import (
    SHARED_MEMORY_LIMIT,
    Row,
    count_ptx_instructions,
    format_table,
    main,
    parse_ptxas_log,
    report_ok,
    run_report,
)
from vlm_kernels.triton.aot import REGISTRY, AOTConfig, AOTRegistry, kernel_modules, register_aot

if ON_CUDA:
    pytest.skip(
        "the compile report is the no-GPU proof; gpu_check runs the real kernels",
        allow_module_level=True,
    )
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

NVCC = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
needs_nvcc = pytest.mark.skipif(
    not NVCC.exists() and shutil.which("nvcc") is None, reason="nvcc not found"
)
REPO_ROOT = Path(__file__).resolve().parents[1]

PLANTED_MODULE = "vlmk_planted_triton_faults"
PLANTED_SOURCE = textwrap.dedent(
    '''
    """Triton kernels with planted faults for the GPU report (written by test_gpu_report)."""

    import triton
    import triton.language as tl

    from vlm_kernels.triton.aot import AOTConfig, register_aot


    @triton.jit
    def planted_gemm_tile(a_ptr, b_ptr, c_ptr, K, stride_am, stride_bk, stride_cm,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + (k + offs_k)[None, :])
            b = tl.load(b_ptr + (k + offs_k)[:, None] * stride_bk + offs_n[None, :])
            acc += tl.dot(a, b)
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(tl.bfloat16))


    @triton.jit
    def planted_compile_error(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)  # BLOCK = 3: tl.arange needs a power of two
        tl.store(x_ptr + offs, offs)


    GEMM = {"a_ptr": "*bf16:16", "b_ptr": "*bf16:16", "c_ptr": "*bf16:16", "K": "i32",
            "stride_am": "i32:16", "stride_bk": "i32:16", "stride_cm": "i32:16"}
    # 128x256 fp32 accumulator on 128 threads: 256 registers of accumulator alone per thread.
    register_aot(planted_gemm_tile, name="planted_spill", signature=GEMM,
                 configs=[AOTConfig({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, 4, 3)])
    # 5 stages of 128x128 A and B bf16 tiles: 256 KB and more of shared memory.
    register_aot(planted_gemm_tile, name="planted_shared_memory", signature=GEMM,
                 configs=[AOTConfig({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}, 8, 5)])
    # The same kernel at a modest tile: clean (the control).
    register_aot(planted_gemm_tile, name="planted_clean", signature=GEMM,
                 configs=[{"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_stages": 2}])
    register_aot(planted_compile_error, signature={"x_ptr": "*i32"}, configs=[{"BLOCK": 3}])
    '''
)

PLANTED_CUDA = {
    "planted_spill.cu": textwrap.dedent(
        """
        // Launch bounds leave 32 registers per thread (1024 threads x 2 blocks per SM) for 64 live
        // floats: ptxas must spill.
        __global__ void __launch_bounds__(1024, 2) planted_spill(float* out, const float* in) {
          float acc[64];
        #pragma unroll
          for (int i = 0; i < 64; ++i) acc[i] = in[threadIdx.x + i * 1024];
        #pragma unroll
          for (int r = 0; r < 4; ++r) {
        #pragma unroll
            for (int i = 0; i < 64; ++i) acc[i] = acc[i] * acc[(i + r + 1) & 63] + 1.0f;
          }
          float sum = 0.f;
        #pragma unroll
          for (int i = 0; i < 64; ++i) sum += acc[i] * (i + 1);
          out[threadIdx.x] = sum;
        }
        """
    ),
    "planted_broken.cu": "__global__ void planted_broken(float* out) { out[0] = undeclared; }\n",
}
CLEAN_CUDA = textwrap.dedent(
    """
    __global__ void reverse_block(float* out) {
      __shared__ float buffer[256];
      buffer[threadIdx.x] = threadIdx.x;
      __syncthreads();
      out[threadIdx.x] = buffer[255 - threadIdx.x];
    }
    """
)


def by_kernel(rows):
    grouped = {}
    for row in rows:
        grouped.setdefault(row.kernel, []).append(row)
    return grouped


# --- the registered kernels -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def registered_rows(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("ptxas")
    return run_report((80, 90), cuda_sources=None, log_dir=log_dir), log_dir


def test_registered_triton_kernels_compile_without_spills(registered_rows):
    rows, _ = registered_rows
    assert rows, "no Triton kernel is registered for the report"
    assert "_block_chunk_schedule_kernel" in {row.kernel for row in rows}
    failed = [f"{r.kernel} [{r.config}] {r.arch}: {r.status} {r.error}" for r in rows if not r.ok]
    assert not failed, "\n".join(failed)
    for row in rows:
        assert row.registers is not None and 0 < row.registers <= 255
        assert row.spill_stores == 0 and row.spill_loads == 0
        limit = SHARED_MEMORY_LIMIT[80 if row.arch == "sm_80" else 90]
        assert row.shared_memory is not None and row.shared_memory <= limit


def test_every_registered_config_and_arch_is_reported(registered_rows):
    rows, log_dir = registered_rows
    for kernel in REGISTRY.from_modules(kernel_modules()):
        for config in kernel.configs:
            archs = sorted(
                r.arch for r in rows if r.kernel == kernel.name and r.config == config.label
            )
            assert archs == ["sm_80", "sm_90a"], (kernel.name, config.label)
    for row in rows:  # the ptxas logs the report leaves for people (and tests) to read
        log = Path(row.log)
        assert log.is_relative_to(log_dir) and log.exists()
        text = log.read_text()
        assert f"Used {row.registers} registers" in text
        assert f"for '{row.arch}'" in text


def test_triton_rows_count_tensor_core_instructions(registered_rows):
    """Triton rows carry the PTX's MMA / ldmatrix / cp.async counts: the 16-bit attention forward runs
    on tensor cores (mma.sync on sm_80, wgmma on sm_90a); the float32 backward's FMA dots do not."""
    rows, _ = registered_rows
    assert all(r.tensor_core_ops is not None for r in rows if r.source == "triton")
    forward = [r for r in rows if r.kernel.startswith("image_text_attention_fwd[bf16")]
    assert {r.arch for r in forward} == {"sm_80", "sm_90a"}
    assert all(r.tensor_core_ops > 0 for r in forward)
    fma = [r for r in rows if r.kernel.startswith("image_text_attention_bwd_dq[fp32,") and r.ok]
    assert fma and all(r.tensor_core_ops == 0 for r in fma)


def test_count_ptx_instructions():
    ptx = """
        mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1, %f2, %f3, %f4}, {%r1}, {%r2}, {%f5};
        @%p3 wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, 1, 1, 1, 1, 1;
        ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r1, %r2, %r3, %r4}, [%r5];
        cp.async.cg.shared.global [ %r6 + 0 ], [ %rd3 + 0 ], 0x10, %r7;
        cp.async.commit_group;
        cp.async.wait_group 0;
        // mma.sync in a comment is not an instruction
    """
    assert count_ptx_instructions(ptx) == (2, 1, 1)


def test_repository_cuda_sources_compile_without_spills(tmp_path):
    sources = sorted((REPO_ROOT / "csrc" / "cuda").glob("*.cu"))
    if not sources:
        pytest.skip("no .cu files in csrc/cuda yet")
    if not NVCC.exists():
        pytest.skip("nvcc not found")
    rows = run_report((80, 90), triton=False, log_dir=tmp_path)
    failed = [f"{r.kernel} [{r.config}] {r.arch}: {r.status} {r.error}" for r in rows if not r.ok]
    assert not failed, "\n".join(failed)
    assert {Path(r.config).name for r in rows} == {s.name for s in sources}


# --- planted Triton faults ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_triton_rows(tmp_path_factory):
    """The planted kernels through the command line: it must exit 1; their rows from its JSON."""
    folder = tmp_path_factory.mktemp("planted_triton")
    (folder / f"{PLANTED_MODULE}.py").write_text(PLANTED_SOURCE)
    report = folder / "report.json"
    argv = ["--module", PLANTED_MODULE, "--no-cuda", "--log-dir", str(folder / "ptxas")]
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))  # the report's worker processes inherit sys.path
        status = main([*argv, "--json", str(report)])
    for name in (
        "planted_spill",
        "planted_shared_memory",
        "planted_clean",
        "planted_compile_error",
    ):
        REGISTRY.remove(name)
    sys.modules.pop(PLANTED_MODULE, None)
    assert status == 1
    payload = json.loads(report.read_text())
    assert payload["ok"] is False
    rows = [Row(**{k: v for k, v in row.items() if k != "status"}) for row in payload["rows"]]
    return by_kernel(rows)


def test_planted_register_spill_is_flagged(planted_triton_rows):
    rows = planted_triton_rows["planted_spill"]
    assert sorted(r.arch for r in rows) == ["sm_80", "sm_90a"]
    for row in rows:
        assert row.status == "spill", row
        assert row.spill_stores > 0 and row.spill_loads > 0
        assert "bytes spill stores" in Path(row.log).read_text()
    assert not report_ok(rows)


def test_planted_shared_memory_overflow_is_flagged(planted_triton_rows):
    rows = planted_triton_rows["planted_shared_memory"]
    assert sorted(r.arch for r in rows) == ["sm_80", "sm_90a"]
    for row in rows:
        assert row.status == "shared memory", row
        assert row.shared_memory > row.shared_memory_limit
    assert {r.shared_memory_limit for r in rows} == {166912, 232448}


def test_planted_compile_error_is_flagged(planted_triton_rows):
    rows = planted_triton_rows["planted_compile_error"]
    assert [r.status for r in rows] == ["error", "error"]
    assert all("power of 2" in r.error for r in rows)


def test_clean_control_passes(planted_triton_rows):
    rows = planted_triton_rows["planted_clean"]
    assert [r.status for r in rows] == ["ok", "ok"]
    assert report_ok(rows)


# --- planted CUDA faults, through the command line ------------------------------------------------


@needs_nvcc
def test_planted_cuda_faults_fail_the_command(tmp_path, capsys):
    sources = tmp_path / "cuda"
    sources.mkdir()
    for name, text in PLANTED_CUDA.items():
        (sources / name).write_text(text)
    (sources / "clean.cu").write_text(CLEAN_CUDA)
    report = tmp_path / "report.json"
    argv = ["--no-triton", "--cuda-sources", str(sources), "--log-dir", str(tmp_path / "ptxas")]
    assert main([*argv, "--json", str(report)]) == 1
    assert "FAIL" in capsys.readouterr().out

    payload = json.loads(report.read_text())
    assert payload["ok"] is False
    rows = {}
    for row in payload["rows"]:
        rows.setdefault(Path(row["config"]).name, []).append(row)
    spill = rows["planted_spill.cu"]
    assert sorted(r["arch"] for r in spill) == ["sm_80", "sm_90a"]
    for row in spill:
        assert "planted_spill" in row["kernel"]
        assert row["status"] == "spill" and row["spill_stores"] > 0
        assert "bytes spill stores" in Path(row["log"]).read_text()
    broken = rows["planted_broken.cu"]
    assert [r["status"] for r in broken] == ["error", "error"]
    assert all("undeclared" in r["error"] for r in broken)
    clean = rows["clean.cu"]
    assert [(r["status"], r["shared_memory"]) for r in clean] == [("ok", 1024), ("ok", 1024)]

    for name in PLANTED_CUDA:
        (sources / name).unlink()
    assert main(argv) == 0


DECLARED_CUDA = textwrap.dedent(
    """
    #include <mma.h>
    // gpu-report: uses_mma* tensor_cores
    // gpu-report: claims_mma* tensor_cores
    // gpu-report: greedy_smem* dynamic_smem=65536
    using namespace nvcuda;
    // 2 blocks of 128 threads per SM: fine. One wmma 16x16x16 product: HMMA in the SASS.
    __global__ void __launch_bounds__(128, 2) uses_mma(const half* a, const half* b, float* c) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> fb;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
      wmma::fill_fragment(fc, 0.f);
      wmma::load_matrix_sync(fa, a, 16);
      wmma::load_matrix_sync(fb, b, 16);
      wmma::mma_sync(fc, fa, fb, fc);
      wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
    }
    // Declared tensor-core, but plain FMA: a planted fault.
    __global__ void __launch_bounds__(128, 2) claims_mma(float* c) { c[threadIdx.x] *= 2.f; }
    // 4 blocks per SM promised, but 64 KB of dynamic shared memory each fit 2 (sm_80) / 3 (sm_90).
    __global__ void __launch_bounds__(256, 4) greedy_smem(float* c) {
      extern __shared__ float s[];
      s[threadIdx.x] = c[threadIdx.x];
      __syncthreads();
      c[threadIdx.x] = s[255 - threadIdx.x];
    }
    """
)


@needs_nvcc
def test_occupancy_and_tensor_core_declarations(tmp_path):
    sources = tmp_path / "cuda"
    sources.mkdir()
    (sources / "declared.cu").write_text(DECLARED_CUDA)
    rows = run_report(
        triton=False, cuda_sources=sources, log_dir=tmp_path / "ptxas", include_dirs=[sources]
    )
    by_name = {(r.kernel.split("(")[0], r.arch): r for r in rows}
    for arch, smem_blocks in (("sm_80", 2), ("sm_90a", 3)):
        mma = by_name["uses_mma", arch]
        assert mma.status == "ok" and mma.tensor_core_ops > 0 and mma.expects_tensor_cores
        assert (mma.threads, mma.min_blocks, mma.blocks_per_sm) == (128, 2, 16)
        claims = by_name["claims_mma", arch]
        assert claims.status == "no tensor cores" and claims.tensor_core_ops == 0
        greedy = by_name["greedy_smem", arch]
        assert greedy.status == "occupancy" and greedy.dynamic_shared_memory == 65536
        assert (greedy.blocks_per_sm, greedy.occupancy_limit) == (smem_blocks, "shared memory")
    table = format_table(rows)
    assert "3 by shared memory (>= 4 promised)" in table and "no tensor cores" in table


# --- the registry and the log parser --------------------------------------------------------------


@triton.jit
def _registry_probe_kernel(x_ptr, n, stride, BLOCK: tl.constexpr, EVEN: tl.constexpr = False):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs * stride, offs, mask=offs < n)


def test_register_aot_builds_compile_arguments():
    registry = AOTRegistry()
    entry = register_aot(
        _registry_probe_kernel,
        signature={"x_ptr": "*i32:16", "n": "i32", "stride": 1},
        configs=[triton.Config({"BLOCK": 64}, num_warps=2, num_stages=1), {"BLOCK": 128}],
        registry=registry,
    )
    assert entry.name == "_registry_probe_kernel" and entry.module == __name__
    assert registry.get("_registry_probe_kernel") is entry and len(registry) == 1
    assert (
        REGISTRY.from_modules([__name__]) == []
    )  # a registry of its own: the global one is untouched
    first, second = entry.configs
    assert (first.num_warps, first.num_stages, second.num_warps, second.num_stages) == (2, 1, 4, 3)
    assert first.label == "BLOCK=64,w2,s1"
    signature, constexprs, attrs = entry.compile_args(first)
    assert signature == {
        "x_ptr": "*i32",
        "n": "i32",
        "stride": "constexpr",
        "BLOCK": "constexpr",
        "EVEN": "constexpr",
    }
    assert constexprs == {"stride": 1, "BLOCK": 64, "EVEN": False}
    assert attrs == {(0,): [["tt.divisibility", 16]]}


def test_register_aot_takes_the_autotuner_configs_and_variants():
    registry = AOTRegistry()
    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in [(32, 1), (256, 8)]]
    tuned = triton.autotune(configs=configs, key=["n"])(_registry_probe_kernel)
    entry = register_aot(
        tuned,
        signature={"x_ptr": "*i32", "n": "i32", "stride": "i32"},
        constexprs={"EVEN": True},
        name="probe[even]",
        registry=registry,
    )
    assert [c.label for c in entry.configs] == [
        "EVEN=True,BLOCK=32,w1,s3",
        "EVEN=True,BLOCK=256,w8,s3",
    ]
    assert entry.fn is _registry_probe_kernel
    assert "probe[even]" in registry


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"signature": {"x_ptr": "*i32", "n": "i32"}, "configs": [{"BLOCK": 8}]}, "stride"),
        ({"signature": {"x_ptr": "*i32", "n": "i32", "stride": "i32"}, "configs": [{}]}, "BLOCK"),
        (
            {"signature": {"x_ptr": "*i32", "n": "i32", "stride": "i32", "y": "i32"}},
            "unknown arguments",
        ),
    ],
)
def test_register_aot_rejects_incomplete_declarations(kwargs, message):
    kwargs.setdefault("configs", [{"BLOCK": 8}])
    with pytest.raises(ValueError, match=message):
        register_aot(_registry_probe_kernel, registry=AOTRegistry(), **kwargs)


def test_registry_rejects_one_name_from_two_modules():
    registry = AOTRegistry()
    entry = register_aot(
        _registry_probe_kernel,
        signature={"x_ptr": "*i32", "n": "i32", "stride": "i32"},
        configs=[AOTConfig({"BLOCK": 8})],
        registry=registry,
    )
    from dataclasses import replace

    with pytest.raises(ValueError, match="registered by both"):
        registry.add(replace(entry, module="somewhere.else"))


def test_parse_ptxas_log():
    log = textwrap.dedent(
        """\
        ptxas info    : 0 bytes gmem
        ptxas info    : Function properties for _Z6helperv
            16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
        ptxas info    : Compiling entry function '_Z1kPf' for 'sm_80'
        ptxas info    : Function properties for _Z1kPf
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 10 registers, used 1 barriers, 1024 bytes smem, 360 bytes cmem[0]
        ptxas info    : Compiling entry function 'mm' for 'sm_90a'
        ptxas info    : Function properties for mm
            1128 bytes stack frame, 1632 bytes spill stores, 1608 bytes spill loads
        ptxas info    : Used 255 registers, used 1 barriers, 1128 bytes cumulative stack size
        """
    )
    helper, kernel, mm = parse_ptxas_log(log)
    assert (helper.name, helper.entry, helper.spill_stores, helper.spill_loads) == (
        "_Z6helperv",
        False,
        8,
        4,
    )
    assert (kernel.registers, kernel.shared_memory, kernel.spill_stores) == (10, 1024, 0)
    assert (mm.registers, mm.stack_frame, mm.spill_stores, mm.spill_loads) == (
        255,
        1128,
        1632,
        1608,
    )
    assert mm.shared_memory == 0


# --- no nvcc --------------------------------------------------------------------------------------


def test_report_without_nvcc_compiles_triton_and_skips_cuda(tmp_path):
    """On a machine without the CUDA toolkit (CUDA_HOME pointing nowhere, no nvcc on PATH) the
    command still compiles the Triton kernels with Triton's own ptxas, reports each .cu row as
    skipped with the reason, and exits 0 (`make test` must pass there: README, "a C++ compiler
    suffices")."""
    sources = sorted((REPO_ROOT / "csrc" / "cuda").glob("*.cu"))
    path = os.pathsep.join(
        folder
        for folder in os.environ.get("PATH", "").split(os.pathsep)
        if folder and not Path(folder, "nvcc").exists()
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env |= {"PATH": path, "CUDA_HOME": str(tmp_path / "no-cuda")}
    report = tmp_path / "report.json"
    argv = ["--arch", "90", "--kernel", "_block_chunk_schedule_kernel", "--json", str(report)]
    done = subprocess.run(
        [sys.executable, "-m", "vlm_kernels.tools.gpu_report", *argv, "--log-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(report.read_text())["rows"]
    triton_rows = [row for row in rows if row["source"] == "triton"]
    cuda_rows = [row for row in rows if row["source"] == "cuda"]
    assert triton_rows and all(row["status"] == "ok" for row in triton_rows)
    assert all(row["registers"] for row in triton_rows)  # really compiled: ptxas figures
    assert {Path(row["config"]).name for row in cuda_rows} == {s.name for s in sources}
    for row in cuda_rows:
        assert row["status"] == "skipped" and "nvcc not found" in row["skipped"], row
    if sources:
        assert "SKIPPED" in done.stdout and "nvcc not found" in done.stdout
