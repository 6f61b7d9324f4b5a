"""The tolerance policy itself (tests/attention_testing.py) catches the faults it is there for."""

import pytest
import torch

from tests.attention_testing import check_against_reference, make_case
from vlm_kernels.reference.image_text_attention import (
    image_text_attention_backward_reference,
    image_text_attention_reference,
)


def _reference_kernel(scale_error: float = 1.0):
    """A 'kernel' that is the float32 reference, rounded to the inputs' dtype, with its softmax scale
    multiplied by ``scale_error``."""

    def forward(q, k, v, media_mask, media_len, scale, empty_rows):
        out, lse = image_text_attention_reference(
            q.float(),
            k.float(),
            v.float(),
            media_mask,
            media_len=media_len,
            scale=scale * scale_error,
            empty_rows=empty_rows,
            return_lse=True,
        )
        return out.to(q.dtype), lse.float()

    def backward(grad_out, q, k, v, media_mask, out, lse, media_len, scale, empty_rows):
        grads = image_text_attention_backward_reference(
            *(t.float() for t in (grad_out, q, k, v)),
            media_mask,
            out.float(),
            lse,
            media_len=media_len,
            scale=scale * scale_error,
            empty_rows=empty_rows,
        )
        return tuple(g.to(q.dtype) for g in grads)

    return forward, backward


SHAPES = [(2, 7, 4, 2, 64, 3, 5), (1, 97, 4, 1, 80, 3, 17), (2, 1, 4, 2, 128, 4, 16)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_policy_passes_a_correct_kernel(shape, dtype):
    check_against_reference(make_case(*shape, dtype=dtype), *_reference_kernel())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_policy_catches_a_three_percent_scale_error(shape, dtype):
    """The old absolute bf16 floor (2e-2) let this pass on some of these shapes."""
    case = make_case(*shape, dtype=dtype, mask_kind="all")
    with pytest.raises(AssertionError, match="error"):
        check_against_reference(case, *_reference_kernel(scale_error=1.03))
