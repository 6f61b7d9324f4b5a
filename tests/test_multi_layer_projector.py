"""MultiLayerProjector on the concat_project kernels, and the Mllama loader: its permuted weight against
stack-reshape-cat-linear (what Hugging Face's MllamaVisionModel + multi_modal_projector compute), and
against the real HF modules (a tiny random MllamaVisionModel; no downloads) when transformers is
installed."""

import pytest
import torch
from torch import nn

from vlm_kernels._backends import _extension
from vlm_kernels.nn import MultiLayerProjector
from vlm_kernels.nn.multi_layer_projector import mllama_projector_weight

HAS_CPU_KERNELS = hasattr(_extension()[0], "concat_project_fwd_cpu")


def _hf_style(final, intermediates, linear):
    """Mllama's vision output and projector: the intermediate layers stacked on a last axis and
    flattened (feature-major interleave), concatenated after the final hidden state, one Linear."""
    stacked = torch.stack(intermediates, dim=-1).reshape(*final.shape[:-1], -1)
    return linear(torch.cat([final, stacked], dim=-1))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_mllama_matches_stack_reshape_cat_linear(backend, dtype):
    if backend == "cpu" and not HAS_CPU_KERNELS:
        pytest.skip("vlm_kernels._C without the concat_project CPU kernels")
    hidden, layers, out_features = 24, 5, 40
    linear = nn.Linear(hidden * (1 + layers), out_features).to(dtype)
    final = torch.randn(2, 1, 3, 7, hidden, dtype=dtype)  # [B, I, T, N, D]
    intermediates = [torch.randn_like(final) for _ in range(layers)]
    projector = MultiLayerProjector.from_mllama(linear, hidden, layers, backend=backend)
    assert projector.weight.dtype == dtype and projector.in_features == (hidden,) * 6
    ours = projector([final, *intermediates])
    with torch.no_grad():
        expected = _hf_style(final, intermediates, linear)
    tol = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}
    torch.testing.assert_close(ours, expected, **tol[dtype])


def test_mllama_weight_permutation_is_the_interleave():
    """Column D + k * D + d of the permuted weight is column D + d * L + k of Mllama's; the final
    hidden state's block is unchanged; the input is not modified."""
    hidden, layers = 4, 3
    weight = torch.arange(2 * hidden * (1 + layers), dtype=torch.float32).reshape(2, -1)
    before = weight.clone()
    permuted = mllama_projector_weight(weight, hidden, layers)
    assert torch.equal(weight, before)
    assert torch.equal(permuted[:, :hidden], weight[:, :hidden])
    for k in range(layers):
        for d in range(hidden):
            assert torch.equal(
                permuted[:, hidden + k * hidden + d], weight[:, hidden + d * layers + k]
            )
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        mllama_projector_weight(weight[:, :-1], hidden, layers)


def test_gradients_reach_the_parameters_and_every_source():
    projector = MultiLayerProjector((8, 16, 4), 12)
    features = [torch.randn(3, 5, d, requires_grad=True) for d in (8, 16, 4)]
    projector(features).square().sum().backward()
    for tensor in (*features, projector.weight, projector.bias):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_wrong_feature_widths_are_rejected():
    projector = MultiLayerProjector((8, 16), 12)
    with pytest.raises(ValueError, match=r"\(8, 16\)"):
        projector([torch.randn(3, 8), torch.randn(3, 8)])


def test_matches_the_real_hf_mllama_projector():
    """A tiny random MllamaVisionModel (2 tiles, 3 intermediate layers) and its Linear projector:
    the final hidden state (the first D columns of HF's output) and the intermediate layers' hidden
    states captured from HF's encoder (padding removed as HF does) through ``from_mllama`` give
    HF's ``multi_modal_projector(vision_model(...).last_hidden_state)``."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MllamaVisionConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_global_layers=1,
        attention_heads=4,
        intermediate_size=64,
        image_size=28,
        patch_size=14,
        max_num_tiles=2,
        intermediate_layers_indices=[0, 2, 3],
        vision_output_dim=32 * 4,
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
    )
    torch.manual_seed(0)
    vision = transformers.MllamaVisionModel(config).eval()
    linear = nn.Linear(config.vision_output_dim, 48)
    encoder_states = {}

    def keep_hidden_states(module, args, output):
        encoder_states["hidden_states"] = output.hidden_states

    vision.transformer.register_forward_hook(keep_hidden_states)
    pixels = torch.randn(1, 1, 2, 3, 28, 28)  # [B, images, tiles, C, H, W]
    with torch.no_grad():
        hf_states = vision(
            pixel_values=pixels,
            aspect_ratio_ids=torch.tensor([[2]]),
            aspect_ratio_mask=torch.ones(1, 1, 2, dtype=torch.long),
        ).last_hidden_state  # [1, 1, 2, 5, 128]
        expected = linear(hf_states)
    tokens = hf_states.shape[-2]  # 2x2 patches + CLS; HF pads each tile to a multiple of 8 tokens
    intermediates = [
        encoder_states["hidden_states"][i]
        .reshape(1, 2, -1, 32)[:, :, :tokens]
        .reshape(1, 1, 2, tokens, 32)
        for i in config.intermediate_layers_indices
    ]
    projector = MultiLayerProjector.from_mllama(linear, 32, 3)
    with torch.no_grad():
        ours = projector([hf_states[..., :32], *intermediates])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
