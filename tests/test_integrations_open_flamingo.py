"""apply_vlm_kernels_to_open_flamingo against open_flamingo 2.0.1's real helpers.py classes (tiny random
sizes): PerceiverResampler and GatedCrossAttentionBlock outputs and every parameter's gradient vs the
stock modules, in the immediate and all-previous media modes, with text before the first media,
adjacent media, cached media and no media_locations; revert; classes untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.integration_testing import assert_patched_matches_stock
from vlm_kernels.integrations import (
    apply_vlm_kernels_to_open_flamingo,
    revert_vlm_kernels_to_open_flamingo,
)

helpers = pytest.importorskip(
    "open_flamingo.src.helpers", reason="requirements-nodeps.txt pins open-flamingo"
)

DIM, DIM_VISUAL, HEADS, DIM_HEAD, LATENTS = 32, 24, 4, 8, 5


def gated_block(only_immediate: bool) -> nn.Module:
    block = helpers.GatedCrossAttentionBlock(
        dim=DIM,
        dim_visual=DIM_VISUAL,
        dim_head=DIM_HEAD,
        heads=HEADS,
        only_attend_immediate_media=only_immediate,
    )
    with torch.no_grad():  # the gates start at 0, where the attention would not reach the output
        block.attn_gate.fill_(0.8)
        block.ff_gate.fill_(0.5)
    return block


def media_locations() -> torch.Tensor:
    """Sequence 0: two text tokens before media 1, media 2 and 3 adjacent; sequence 1: media 1 first."""
    locations = torch.zeros(2, 12, dtype=torch.bool)
    locations[0, [2, 6, 7]] = True
    locations[1, [0, 5, 9]] = True
    return locations


def block_inputs(**kwargs) -> dict:
    generator = torch.Generator().manual_seed(3)
    return {
        "x": torch.randn(2, 12, DIM, generator=generator),
        "media": torch.randn(2, 3, LATENTS, DIM_VISUAL, generator=generator),
        **kwargs,
    }


def test_perceiver_resampler_matches_stock():
    resampler = helpers.PerceiverResampler(
        dim=DIM,
        depth=2,
        dim_head=DIM_HEAD,
        heads=HEADS,
        num_latents=LATENTS,
        max_num_media=3,
        max_num_frames=2,
    )
    x = torch.randn(2, 3, 2, 7, DIM)  # (b, T media, F frames, v tokens, D)
    patched = assert_patched_matches_stock(
        "perceiver", resampler, apply_vlm_kernels_to_open_flamingo, {"x": x}, lambda out: out
    )
    assert sum("forward" in m.__dict__ for m in patched.modules()) == 2


@pytest.mark.parametrize("only_immediate", [True, False], ids=["immediate", "all-previous"])
@pytest.mark.parametrize("variant", ["locations", "cached", "no-locations"])
def test_gated_cross_attention_matches_stock(only_immediate, variant):
    kwargs = {
        "locations": {"media_locations": media_locations()},
        "cached": {"media_locations": media_locations(), "use_cached_media": True},
        "no-locations": {"use_cached_media": True},  # stock needs media_locations otherwise
    }[variant]
    assert_patched_matches_stock(
        f"gated xattn {only_immediate} {variant}",
        gated_block(only_immediate),
        apply_vlm_kernels_to_open_flamingo,
        block_inputs(**kwargs),
        lambda out: out,
    )


def test_text_before_the_first_media_follows_each_mode():
    """Immediate: zeroed rows (the block output is x there); all-previous: the mean of all values."""
    inputs = block_inputs(media_locations=media_locations())
    for only_immediate in (True, False):
        attn = gated_block(only_immediate).attn
        apply_vlm_kernels_to_open_flamingo(attn)
        with torch.no_grad():
            out = attn(**inputs)[0, :2]  # tokens before media 1 in sequence 0
            if only_immediate:
                expected = torch.zeros_like(out)
            else:
                _, v = attn.to_kv(inputs["media"][0].reshape(-1, DIM_VISUAL)).chunk(2, dim=-1)
                expected = attn.to_out(v.mean(0)).expand_as(out)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_more_media_locations_than_media_is_an_error():
    attn = gated_block(True).attn
    apply_vlm_kernels_to_open_flamingo(attn)
    inputs = block_inputs(media_locations=media_locations())
    inputs["media"] = inputs["media"][:, :2]
    with pytest.raises(ValueError, match="media holds 2"):
        attn(**inputs)


def test_patch_is_per_instance_touches_no_class_and_reverts():
    classes = (helpers.PerceiverAttention, helpers.MaskedCrossAttention, nn.LayerNorm, nn.Linear)
    forwards = [cls.forward for cls in classes]
    block, other = gated_block(False), gated_block(False)
    inputs = block_inputs(media_locations=media_locations())
    with torch.no_grad():
        before = block(**inputs)
    counts = apply_vlm_kernels_to_open_flamingo(block)
    assert counts == {"perceiver_attention": 0, "masked_cross_attention": 1}
    assert [cls.forward for cls in classes] == forwards
    assert "forward" not in other.attn.__dict__
    assert revert_vlm_kernels_to_open_flamingo(block) == 1
    assert "forward" not in block.attn.__dict__
    with torch.no_grad():
        assert torch.equal(block(**inputs), before)
    with pytest.raises(TypeError, match="PerceiverAttention or MaskedCrossAttention"):
        apply_vlm_kernels_to_open_flamingo(nn.Linear(2, 2))
