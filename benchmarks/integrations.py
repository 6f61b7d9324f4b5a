"""Patched vs unpatched models through vlm_kernels.integrations, on this machine, random weights.

    python -m benchmarks.integrations [--repeats 5] [--out benchmarks/results/integrations.md]

Rows: a small-but-not-trivial Mllama (forward, forward + backward, greedy generate() = prefill +
decode with the cache), a CLIP ViT-B/16-sized vision model and an OpenFlamingo perceiver resampler
(ViT-L-sized media features) plus a gated cross-attention block. Each row times the stock model and a
deep copy patched in place (same weights) in rounds (one call of each per round, after one warm-up
round), median of ``repeats``, and reports the ratio stock / patched (> 1: the patch is faster). The
backend each op resolves to here is printed with the table: the integrations call the ops with
``backend=None``, so the figures follow whatever kernels this checkout has.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import platform
from collections.abc import Callable

import torch

import vlm_kernels as vk
from benchmarks.timing import time_interleaved
from vlm_kernels.integrations import (
    apply_vlm_kernels_to_clip,
    apply_vlm_kernels_to_mllama,
    apply_vlm_kernels_to_open_flamingo,
)

CPU = torch.device("cpu")


def _mllama():
    import transformers

    vision = dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_global_layers=2,
        attention_heads=4,
        vision_output_dim=256 * 3,
        image_size=224,  # 16 x 16 patches of 14: 257 tokens per tile
        patch_size=14,
        max_num_tiles=4,
        intermediate_layers_indices=[1, 3],
    )
    text = dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=2000,
        cross_attention_layers=[2, 5],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    config = transformers.MllamaConfig(
        vision_config=vision, text_config=text, image_token_index=1999
    )
    model = transformers.MllamaForConditionalGeneration._from_config(
        config, attn_implementation="sdpa"
    ).eval()
    batch, seq, images, tiles = 1, 128, 1, 4
    mask = torch.zeros(batch, seq, images, tiles, dtype=torch.long)
    mask[:, 8:, 0, :] = 1  # 8 text tokens before the image
    inputs = {
        "input_ids": torch.randint(4, 1990, (batch, seq)),
        "pixel_values": torch.randn(batch, images, tiles, 3, 224, 224),
        "aspect_ratio_ids": torch.tensor([[6]]),  # 2 x 2 tiles
        "aspect_ratio_mask": torch.ones(batch, images, tiles, dtype=torch.long),
        "cross_attention_mask": mask,
    }
    return model, inputs


def _clip():
    import transformers

    config = transformers.CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=16,
    )
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(config).eval()
    return model, {"pixel_values": torch.randn(4, 3, 224, 224)}


def _perceiver():
    from open_flamingo.src.helpers import PerceiverResampler

    torch.manual_seed(0)
    model = PerceiverResampler(dim=1024, depth=6, dim_head=64, heads=8, num_latents=64).eval()
    return model, {"x": torch.randn(4, 1, 1, 257, 1024)}


def _gated_xattn():
    from open_flamingo.src.helpers import GatedCrossAttentionBlock

    torch.manual_seed(0)
    model = GatedCrossAttentionBlock(
        dim=2048, dim_visual=1024, dim_head=64, heads=8, only_attend_immediate_media=True
    ).eval()
    locations = torch.zeros(2, 256, dtype=torch.bool)
    locations[:, [4, 100, 180]] = True
    inputs = {
        "x": torch.randn(2, 256, 2048),
        "media": torch.randn(2, 3, 64, 1024),
        "media_locations": locations,
    }
    return model, inputs


def _output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _modes(model, inputs) -> dict[str, Callable[[], object]]:
    def forward():
        with torch.no_grad():
            model(**inputs)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        _output(model(**inputs)).float().square().mean().backward()

    return {"forward": forward, "forward + backward": forward_backward}


def _generate(model, inputs) -> Callable[[], object]:
    def step():
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=3)

    return step


ROWS = [
    # (model, API, build, apply, with generate)
    (
        "Mllama (tiny-but-real: ViT 4+2 layers d256, 4 tiles x 257 tok; LM 6 layers d512, 128 tok)",
        "apply_vlm_kernels_to_mllama",
        _mllama,
        apply_vlm_kernels_to_mllama,
        True,
    ),
    (
        "CLIP ViT-B/16 vision (12 layers d768, batch 4 x 224^2)",
        "apply_vlm_kernels_to_clip",
        _clip,
        apply_vlm_kernels_to_clip,
        False,
    ),
    (
        "OpenFlamingo PerceiverResampler (6 layers d1024, 64 latents, batch 4 x 257 media tokens)",
        "apply_vlm_kernels_to_open_flamingo",
        _perceiver,
        apply_vlm_kernels_to_open_flamingo,
        False,
    ),
    (
        "OpenFlamingo GatedCrossAttentionBlock (d2048, 3 media x 64 latents, batch 2 x 256 tokens)",
        "apply_vlm_kernels_to_open_flamingo",
        _gated_xattn,
        apply_vlm_kernels_to_open_flamingo,
        False,
    ),
]


def resolved_backends() -> dict[str, str]:
    """The backend each op's auto dispatch picks here for float32 CPU tensors."""
    ops = ("patch_embed", "concat_project", "image_text_attention", "perceiver_attention")
    tables = {op: importlib.import_module(f"vlm_kernels.ops.{op}").TABLE for op in ops}
    return {name: table._backend(CPU, "auto", torch.float32) for name, table in tables.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, float32. Auto backends here: "
        + ", ".join(f"{op} -> {backend}" for op, backend in resolved_backends().items()),
        "",
        "| model | API | mode | stock ms | patched ms | speed-up |",
        "|---|---|---|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for title, api, build, apply, with_generate in ROWS:
        stock, inputs = build()
        patched = copy.deepcopy(stock)
        apply(patched)
        modes = {
            name: (fn, _modes(patched, inputs)[name]) for name, fn in _modes(stock, inputs).items()
        }
        if with_generate:
            modes["generate (prefill + 16 decode)"] = (
                _generate(stock, inputs),
                _generate(patched, inputs),
            )
        for mode, (stock_step, patched_step) in modes.items():
            # in rounds (timing.time_interleaved): the machine's drift reaches both alike
            timings = time_interleaved([stock_step, patched_step], CPU, 1, args.repeats)
            for measured in timings:
                if isinstance(measured, Exception):
                    raise measured
            stock_ms, patched_ms = (measured.median_ms for measured in timings)
            line = (
                f"| {title} | `{api}` | {mode} | {stock_ms:.1f} | {patched_ms:.1f} | "
                f"{stock_ms / patched_ms:.2f}x |"
            )
            lines.append(line)
            print(line, flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(__doc__.splitlines()[0] + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    vk.available_backends()  # import the extension before timing
    main()
