"""NaN and inf in q/k/v reach the output on every backend, as they do through SDPA (issue 7).

A kernel that skips invisible work must not also skip bad values: a query row holding NaN, or a NaN in
a key or value the row can see, makes that row NaN (a diverging training run must show, not read as
zeros). NaN in a chunk no row of a query block sees is never loaded (the chunk-skipping tests poison
such chunks), and a row never *needs* NaN from a key it cannot see: the dense reference multiplies
those by a zero probability (0 * NaN = NaN), the skipping kernels do not, so that part is allowed,
not required. The backward: a NaN query row gives a NaN dq row.
"""

import pytest
import torch

import vlm_kernels as vk
from tests.devices import TEST_DEVICE, backends_for
from vlm_kernels.reference import image_text_attention_reference, perceiver_attention_reference

BATCH, QUERY_LEN, HEADS_Q, HEADS_KV, HEAD_DIM, CHUNKS, MEDIA_LEN = 2, 40, 4, 2, 64, 3, 24
DECODE_LEN = 3  # Lq <= 16 takes the split-KV decode path on the GPU backends


def _inputs(query_len, dtype):
    shape_kv = (BATCH, CHUNKS * MEDIA_LEN, HEADS_KV, HEAD_DIM)
    q = torch.randn(BATCH, query_len, HEADS_Q, HEAD_DIM, device=TEST_DEVICE).to(dtype)
    k = torch.randn(shape_kv, device=TEST_DEVICE).to(dtype)
    v = torch.randn(shape_kv, device=TEST_DEVICE).to(dtype)
    # First half of the text sees chunk 0, second half chunk 1; nobody sees chunk 2.
    mask = torch.zeros(BATCH, query_len, CHUNKS, dtype=torch.bool, device=TEST_DEVICE)
    mask[:, : query_len // 2 + 1, 0] = True
    mask[:, query_len // 2 + 1 :, 1] = True
    return q, k, v, mask


# (tensor, index into it, value); rows of the first half see key 5 (chunk 0), row 1 is in that half.
POISONS = {
    "nan-q": ("q", (1, 1, 2, 7), float("nan")),
    "inf-q": ("q", (1, 1, 2, 7), float("inf")),
    "nan-k": ("k", (0, 5, 1, 3), float("nan")),
    "inf-k": ("k", (0, 5, 1, 3), float("-inf")),
    "nan-v": ("v", (0, 5, 1, 3), float("nan")),
    "nan-k-unseen-chunk": ("k", (0, 2 * MEDIA_LEN + 1, 0, 0), float("nan")),
}


def _touched_rows(name, index, mask, query_len):
    """[B, Lq, Hq, 1] bool: the output rows that see the poisoned element."""
    touched = torch.zeros(BATCH, query_len, HEADS_Q, 1, dtype=torch.bool, device=mask.device)
    group = HEADS_Q // HEADS_KV
    if name == "q":
        touched[index[0], index[1], index[2]] = True
    else:
        b, key, kv_head = index[:3]
        heads = slice(kv_head * group, (kv_head + 1) * group)
        touched[b, :, heads] = mask[b, :, key // MEDIA_LEN, None, None]
    return touched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("query_len", [QUERY_LEN, DECODE_LEN])
@pytest.mark.parametrize("poison", sorted(POISONS))
@pytest.mark.parametrize("backend", backends_for("image_text_attention"))
def test_bad_values_reach_the_rows_that_see_them(backend, poison, query_len, dtype):
    q, k, v, mask = _inputs(query_len, dtype)
    name, index, value = POISONS[poison]
    tensors = {"q": q, "k": k, "v": v}
    tensors[name][index] = value
    out = vk.image_text_attention(q, k, v, mask, media_len=MEDIA_LEN, backend=backend)
    ref = image_text_attention_reference(
        q.double(), k.double(), v.double(), mask, media_len=MEDIA_LEN
    )

    required = ref.isnan() & _touched_rows(name, index, mask, query_len)
    assert out.isnan()[required].all(), f"{backend}: NaN lost in rows that see the bad value"
    # No NaN where the dense reference has none, and the clean rows stay right.
    assert not (out.isnan() & ~ref.isnan()).any(), f"{backend}: NaN where the reference has none"
    clean = ~ref.isnan()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.double()[clean], ref[clean], atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", backends_for("image_text_attention"))
def test_nan_query_row_gives_nan_gradient(backend):
    q, k, v, mask = _inputs(QUERY_LEN, torch.float32)
    q[1, 1, 2, 7] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = vk.image_text_attention(*leaves, mask, media_len=MEDIA_LEN, backend=backend)
    grad_out = torch.randn_like(out)
    grad_out[1, 1] = 0  # even with a zero cotangent on that row (0 * NaN = NaN, as autograd does)
    dq, _, _ = torch.autograd.grad(out, leaves, grad_out)
    assert dq[1, 1, 2].isnan().all(), f"{backend}: NaN query row gave a finite dq"
    assert not dq[0].isnan().any(), f"{backend}: NaN leaked into another sequence's dq"


# ---- perceiver_attention -------------------------------------------------------------------------------
# The same guarantees: a NaN/inf in q, or in a key/value a row can see (a real media token or a latent),
# reaches that row; a padded media token is never needed (the reference masks its score, so a NaN key
# there must not leak; a NaN value there is allowed, not required: 0 * NaN in the dense reference).

PERCEIVER_MEDIA, PERCEIVER_LATENTS = 40, 6
PADDED_INSIDE, PADDED_TAIL = 10, 35  # item 1 pads token 10 (inside a key tile) and tokens 30..39


def _perceiver_inputs(dtype):
    def randn(length):
        return torch.randn(BATCH, length, HEADS_KV, HEAD_DIM, device=TEST_DEVICE).to(dtype)

    q = torch.randn(BATCH, PERCEIVER_LATENTS, HEADS_Q, HEAD_DIM, device=TEST_DEVICE).to(dtype)
    tensors = {
        "q": q,
        "k_media": randn(PERCEIVER_MEDIA),
        "v_media": randn(PERCEIVER_MEDIA),
        "k_latents": randn(PERCEIVER_LATENTS),
        "v_latents": randn(PERCEIVER_LATENTS),
    }
    mask = torch.ones(BATCH, PERCEIVER_MEDIA, dtype=torch.bool, device=TEST_DEVICE)
    mask[1, PADDED_INSIDE] = False
    mask[1, 30:] = False
    return tensors, mask


PERCEIVER_POISONS = {
    "nan-q": ("q", (1, 3, 2, 7), float("nan")),
    "inf-q": ("q", (1, 3, 2, 7), float("inf")),
    "nan-k_media": ("k_media", (0, 5, 1, 3), float("nan")),
    "inf-k_media": ("k_media", (0, 5, 1, 3), float("-inf")),
    "nan-v_media": ("v_media", (1, 5, 0, 3), float("nan")),
    "nan-k_latents": ("k_latents", (1, 2, 0, 3), float("nan")),
    "nan-v_latents": ("v_latents", (0, 4, 1, 3), float("nan")),
    "nan-k_media-padded-inside": ("k_media", (1, PADDED_INSIDE, 0, 0), float("nan")),
    "nan-k_media-padded-tail": ("k_media", (1, PADDED_TAIL, 1, 0), float("nan")),
}


def _perceiver_touched_rows(name, index, mask):
    """[B, Nl, Hq, 1] bool: the output rows that see the poisoned element."""
    touched = torch.zeros(BATCH, PERCEIVER_LATENTS, HEADS_Q, 1, dtype=torch.bool)
    group = HEADS_Q // HEADS_KV
    if name == "q":
        touched[index[0], index[1], index[2]] = True
    elif name.endswith("latents") or mask[index[0], index[1]]:
        touched[index[0], :, index[2] * group : (index[2] + 1) * group] = True
    return touched.to(mask.device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("poison", sorted(PERCEIVER_POISONS))
@pytest.mark.parametrize("backend", backends_for("perceiver_attention"))
def test_perceiver_bad_values_reach_the_rows_that_see_them(backend, poison, dtype):
    tensors, mask = _perceiver_inputs(dtype)
    name, index, value = PERCEIVER_POISONS[poison]
    tensors[name][index] = value
    out = vk.perceiver_attention(**tensors, media_padding_mask=mask, backend=backend)
    ref = perceiver_attention_reference(
        **{key: t.double() for key, t in tensors.items()}, media_padding_mask=mask
    )
    required = ref.isnan() & _perceiver_touched_rows(name, index, mask)
    assert out.isnan()[required].all(), f"{backend}: NaN lost in rows that see the bad value"
    assert not (out.isnan() & ~ref.isnan()).any(), f"{backend}: NaN where the reference has none"
    clean = ~ref.isnan()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.double()[clean], ref[clean], atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", backends_for("perceiver_attention"))
def test_perceiver_nan_query_row_gives_nan_gradient(backend):
    tensors, mask = _perceiver_inputs(torch.float32)
    tensors["q"][1, 3, 2, 7] = float("nan")
    leaves = {key: t.clone().requires_grad_() for key, t in tensors.items()}
    out = vk.perceiver_attention(**leaves, media_padding_mask=mask, backend=backend)
    grad_out = torch.randn_like(out)
    grad_out[1, 3] = 0  # even with a zero cotangent on that row (0 * NaN = NaN, as autograd does)
    dq, *_ = torch.autograd.grad(out, list(leaves.values()), grad_out)
    assert dq[1, 3, 2].isnan().all(), f"{backend}: NaN query row gave a finite dq"
    assert not dq[0].isnan().any(), f"{backend}: NaN leaked into another item's dq"
