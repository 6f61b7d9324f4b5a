"""Run by `make cpu-only-build` (not part of the default test run): the extension built with
VLMK_SKIP_CUDA_BUILD=1 into VLMK_EXTENSION_DIR loads, reports no CUDA, and its kernels are right."""

import glob
import importlib.util
import os

import torch

from vlm_kernels.reference import block_chunk_schedule_reference


def test_cpu_only_extension_loads_and_runs():
    directory = os.environ["VLMK_EXTENSION_DIR"]
    (path,) = glob.glob(os.path.join(directory, "vlm_kernels", "_C*.so"))
    spec = importlib.util.spec_from_file_location("_C", path)
    extension = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extension)
    assert extension.built_with_cuda() is False
    assert not hasattr(extension, "block_chunk_schedule_cuda")
    media_mask = torch.rand(2, 33, 9) < 0.3
    want = block_chunk_schedule_reference(media_mask, 8)
    for function in (extension.block_chunk_schedule_cpu, extension.block_chunk_schedule_cuda_sim):
        got = function(media_mask, 8)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
