"""Peak memory of one concat_project forward on the CPU: ours (backend "cpu") against torch.cat +
F.linear, as ATen-allocator bytes and next to the size of the concat buffer the peer allocates.

Method: torch.profiler with profile_memory=True records every ATen allocation and free during the
call; the memory profiler's timeline (CREATE / DESTROY events, sizes) replayed in time order gives
the peak of live bytes above what existed before the call (the output included). Allocations that
bypass ATen's allocator (oneDNN's own scratch) are not seen here; the benchmark CLI's peak-RSS
column sees them.

    python -m benchmarks.concat_project_memory --shape mllama-projector,llava-2layer --dtype fp32,bf16
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.ops.concat_project import SHAPES, make_inputs, prepare_cat_linear

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def aten_peak_bytes(step) -> int:
    """Peak live bytes ATen allocated during ``step()`` (its result included)."""
    from torch.profiler._memory_profiler import Action, MemoryProfile

    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        profile_memory=True,
        record_shapes=True,
        with_stack=True,
    ) as prof:
        result = step()
        del result
    live = peak = 0
    for _, action, _, size in sorted(MemoryProfile(prof.profiler.kineto_results).timeline):
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="mllama-projector,llava-2layer")
    parser.add_argument("--dtype", default="fp32,bf16")
    args = parser.parse_args()
    import vlm_kernels as vk

    print(
        "| shape | dtype | concat buffer MiB | cat+linear peak MiB | ours (cpu) peak MiB | saved MiB |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for shape_name in args.shape.split(","):
        shape = SHAPES[shape_name]
        for dtype_name in args.dtype.split(","):
            dtype = _DTYPES[dtype_name]
            inputs = make_inputs(shape, "default", dtype, torch.device("cpu"), 0, False)
            t = inputs.tensors
            concat = sum(f.numel() for f in t["features"]) * dtype.itemsize
            peer = aten_peak_bytes(prepare_cat_linear(inputs))
            ours = aten_peak_bytes(
                lambda t=t: vk.concat_project(t["features"], t["weight"], t["bias"], backend="cpu")
            )
            mib = 2**20
            print(
                f"| {shape_name} | {dtype_name} | {concat / mib:.1f} | {peer / mib:.1f} | "
                f"{ours / mib:.1f} | {(peer - ours) / mib:.1f} |"
            )


if __name__ == "__main__":
    main()
