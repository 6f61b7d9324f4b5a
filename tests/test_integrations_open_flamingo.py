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


@pytest.mark.parametrize("backend", [None, "reference"])
def test_our_resampler_module_equals_the_real_one_on_its_state_dict(backend):
    """vlm_kernels.nn.PerceiverResampler (on the perceiver_attention kernels with backend=None)
    loads the real OpenFlamingo PerceiverResampler's state dict as it is and computes the same
    output and input gradient."""
    from vlm_kernels.nn import PerceiverResampler

    torch.manual_seed(0)
    sizes = dict(dim=32, depth=2, dim_head=16, heads=2, num_latents=4, max_num_media=3)
    theirs = helpers.PerceiverResampler(**sizes, max_num_frames=3, ff_mult=2)
    with torch.no_grad():
        for param in theirs.parameters():
            param.normal_(0, 0.2)  # O(1) random weights: every path reaches the output
    ours = PerceiverResampler(**sizes, max_num_frames=3, ff_mult=2, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 2, 3, 5, 32)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
    torch.testing.assert_close(out_ours, out_theirs, atol=2e-5, rtol=1e-4)
    cotangent = torch.randn_like(out_theirs)
    (grad_ours,) = torch.autograd.grad(out_ours, x_ours, cotangent)
    (grad_theirs,) = torch.autograd.grad(out_theirs, x_theirs, cotangent)
    torch.testing.assert_close(grad_ours, grad_theirs, atol=5e-5, rtol=1e-4)
