# Two entry points on a fresh machine: `make demo` and `make test`. Each creates .venv (Python 3.11) from
# requirements.txt when it is missing or older than requirements.txt, then builds the extension
# incrementally (ninja), then runs.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2
# pytest workers: the interpreter/emulator cases are CPU-bound, one worker per core.
PYTEST_WORKERS ?= 2

.PHONY: demo test build lint format ctest gpu-report gpu-check pytest cpu-only-build bench clean \
	gpu-report-no-nvcc gpu-report-triton36

$(STAMP): requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

# `setup.py build_ext --inplace` puts vlm_kernels/_C*.so next to the sources (the repo is on sys.path
# when run from here, and the .pth of `pip install -e` covers other directories); ninja keeps it
# incremental. The editable install adds only the metadata and the .pth (VLMK_METADATA_ONLY, setup.py):
# pip's own build of the extension would compile every source again in a temporary tree.
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace
	test -f $(VENV)/.editable || (VLMK_METADATA_ONLY=1 $(PY) -m pip install -q -e . --no-build-isolation --no-deps \
		&& touch $(VENV)/.editable)

demo: build
	$(PY) -m model demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $$(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $$(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')

# The SIMT emulator's own C++ tests.
ctest: $(STAMP)
	cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=$(abspath $(PY)) > /dev/null
	cmake --build build/cmake
	cd build/cmake && ctest --output-on-failure

# Every Triton kernel at every config and every .cu kernel, compiled for sm_80 and sm_90 with no GPU;
# fails on a compile error, a register spill or too much shared memory.
gpu-report: build
	$(PY) -m vlm_kernels.tools.gpu_report --json build/gpu_report.json

# On a machine with a CUDA GPU whose Python already has torch >= 2.11 and triton >= 3.6 (no .venv, no
# network): build for the local arch, run the tests on the GPU, every Triton config, the benchmarks;
# report in $(GPU_CHECK_OUT) (the device tool's $$OUT when set). `--dry-run` of the same is in pytest.
GPU_PYTHON ?= python3
GPU_CHECK_OUT ?= $(if $(OUT),$(OUT),build/gpu-check)
gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m vlm_kernels.tools.gpu_check --out $(GPU_CHECK_OUT)

# The compile report with nvcc out of reach (CUDA_HOME pointing nowhere, no nvcc on PATH), on two
# kernels: the Triton rows still compile (Triton carries its own ptxas), the .cu rows are reported as
# skipped with the reason, and the command exits 0 -- what a machine without the CUDA toolkit sees.
gpu-report-no-nvcc: $(STAMP)
	CUDA_HOME=/nonexistent PATH="$$(printf '%s' "$$PATH" | tr ':' '\n' | \
		while read -r dir; do [ -x "$$dir/nvcc" ] || printf '%s:' "$$dir"; done)" \
		$(PY) -m vlm_kernels.tools.gpu_report --kernel _block_chunk_schedule_kernel \
		--kernel 'image_text_attention_decode_combine*' --json build/gpu_report_no_nvcc.json \
		--log-dir build/ptxas-no-nvcc

# The lent GPU machine runs Triton 3.6 (DESIGN §4): its compile report (Triton rows) and the launcher,
# schedule and every-config float32 attention tests through 3.6's interpreter, with triton 3.6.0
# installed (--no-deps) into build/triton36 and put ahead of .venv's 3.8 on PYTHONPATH: torch 2.14.1 with
# triton 3.6, without a second torch install. Measured (2-core EPYC): ~10 s to install, ~55 s for the report
# (588 rows, 2 jobs), ~55 s for the tests.
TRITON36 := build/triton36
$(TRITON36)/.installed: $(STAMP)
	$(PY) -m pip install -q --no-deps --target $(TRITON36) triton==3.6.0
	touch $@

gpu-report-triton36: $(TRITON36)/.installed
	PYTHONPATH=$(TRITON36) $(PY) -c 'import triton; assert triton.__version__.startswith("3.6."), triton.__file__'
	PYTHONPATH=$(TRITON36) $(PY) -m vlm_kernels.tools.gpu_report --no-cuda \
		--json build/gpu_report_triton36.json --log-dir build/ptxas-triton36
	PYTHONPATH=$(TRITON36) $(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) \
		tests/test_triton_launch.py tests/test_triton_block_chunk_schedule.py \
		tests/test_image_text_attention_triton.py tests/test_perceiver_attention_triton.py \
		-k "test_triton_launch or test_triton_block_chunk_schedule or fp32-config"

pytest: build
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

# pytest also runs the emulator's ctest (tests/test_simt_ctest.py) and the GPU compile report
# (tests/test_gpu_report.py), so `ctest` and `gpu-report` are not run a second time here.
test: lint pytest

# Proves the CPU-only build (VLMK_SKIP_CUDA_BUILD=1) compiles and its kernels run, in a separate tree.
cpu-only-build: $(STAMP)
	VLMK_SKIP_CUDA_BUILD=1 $(PY) setup.py -q build_ext --build-temp build/cpu-only/temp --build-lib build/cpu-only/lib
	VLMK_EXTENSION_DIR=build/cpu-only/lib $(PY) -m pytest -q tests/cpu_only_build_check.py

# The README's image_text_attention table (CPU backend vs SDPA / compiled Flex / SDPA per run).
bench: build
	$(PY) -m benchmarks --op image_text_attention --shape mllama-11b --mask 1of4,all --dtype fp32,bf16 \
		--mode fwd --repeats 5 --providers vk-cpu,sdpa,flex,sdpa_runs

clean:
	rm -rf build vlm_kernels/_C*.so *.egg-info
