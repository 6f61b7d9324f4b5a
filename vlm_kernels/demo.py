"""`make demo`: every op on example inputs with every backend that can run here, and a table of how each
backend agrees with the reference and how long it took.

    python -m vlm_kernels.demo [--dtype fp32|bf16|fp16] [--repeats N]

(Until the thin VLM of model/ lands, this is the package's main job.)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import vlm_kernels as vk
from vlm_kernels._backends import _runs_on

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _examples(dtype: torch.dtype) -> dict[str, tuple[str, Callable[[str], object]]]:
    """op -> (shape description, call(backend)); small Mllama/CLIP/Flamingo-like shapes."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    pixels = torch.randint(0, 256, (2, 3, 224, 224), generator=g, dtype=torch.uint8)
    patch_weight, patch_bias = randn(768, 3, 16, 16) * 0.02, randn(768)
    cls, pos = randn(768), randn(197, 768) * 0.02
    mean = torch.tensor([0.481, 0.458, 0.408])
    std = torch.tensor([0.269, 0.261, 0.276])
    features = [randn(2, 577, 1024) for _ in range(3)]
    project_weight = randn(4096, 3 * 1024) * 0.02
    media_len, chunks = 1601, 4
    q, k, v = (
        randn(1, 256, 32, 128),
        randn(1, chunks * media_len, 8, 128),
        randn(1, chunks * media_len, 8, 128),
    )
    runs = torch.arange(256) * chunks // 256  # text split into 4 runs, each seeing one image
    media_mask = (runs[:, None] == torch.arange(chunks))[None]
    latents_q, latents_kv = randn(4, 64, 8, 64), randn(4, 64, 8, 64)
    media_kv = randn(4, 3 * 257, 8, 64)
    padding = torch.ones(4, 3 * 257, dtype=torch.bool)
    padding[:, -10:] = False
    return {
        "patch_embed": (
            "uint8 [2, 3, 224, 224], P=16, D=768, CLS+pos, fused normalization",
            lambda b: vk.patch_embed(
                pixels,
                patch_weight,
                patch_bias,
                cls_token=cls,
                pos_embed=pos,
                pixel_mean=mean,
                pixel_std=std,
                backend=b,
            ),
        ),
        "concat_project": (
            "3 x [2, 577, 1024] -> 4096",
            lambda b: vk.concat_project(features, project_weight, backend=b),
        ),
        "image_text_attention": (
            "q [1, 256, 32, 128], 4 images x 1601 tokens, GQA 32/8, 1 of 4 visible",
            lambda b: vk.image_text_attention(q, k, v, media_mask, media_len=media_len, backend=b),
        ),
        "perceiver_attention": (
            "64 latents, 3 frames x 257 tokens, 8 heads x 64, padding",
            lambda b: vk.perceiver_attention(
                latents_q,
                media_kv,
                media_kv,
                latents_kv,
                latents_kv,
                media_padding_mask=padding,
                backend=b,
            ),
        ),
        "block_chunk_schedule": (
            "mask [1, 256, 4], block_q=64",
            lambda b: vk.block_chunk_schedule(media_mask, 64, backend=b),
        ),
    }


def _max_error(got, want) -> float:
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    return max(
        (g.double() - w.double()).abs().max().item() if g.numel() else 0.0
        for g, w in zip(got, want, strict=True)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="fp32", help="floating dtype of the examples"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed calls per (op, backend); the median is shown"
    )
    args = parser.parse_args(argv)

    status = vk.available_backends()
    print(
        f"vlm_kernels {vk.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| backend | available | what / why not |\n|---|---|---|")
    for name in vk.BACKENDS:
        why = status["notes"].get(name) or status["reasons"].get(name, "")
        print(f"| {name} | {'yes' if status[name] else 'no'} | {why} |")

    print(
        f"\n| op | example ({args.dtype}) | backend | median ms | max abs err vs reference |\n|---|---|---|---|---|"
    )
    device = torch.device("cpu")
    for op, (shape, call) in _examples(DTYPES[args.dtype]).items():
        reference = call("reference")
        for backend in vk.op_backends(op):
            if not status[backend] or not _runs_on(backend, device):
                continue
            result = call(backend)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                call(backend)
                times.append((time.perf_counter() - start) * 1e3)
            print(
                f"| {op} | {shape} | {backend} | {statistics.median(times):.1f} | "
                f"{_max_error(result, reference):.2e} |"
            )
        missing = [b for b in vk.BACKENDS if b not in vk.op_backends(op)]
        if missing:
            print(f"| {op} | | {', '.join(missing)} | kernel lands in its op issue | |")


if __name__ == "__main__":
    main()
