"""The mask builders on worked examples (the spec's own examples, computed by hand)."""

import pytest
import torch

from vlm_kernels import masks

IMG = 99


def test_mllama_processor_example():
    # <i1><i2>These are two dogs.<i3>This is a cat.
    ids = torch.tensor([IMG, IMG, 1, 2, 3, 4, 5, IMG, 6, 7, 8, 9, 10])
    mask = masks.from_image_token_ids(ids, IMG)
    assert mask.shape == (1, 13, 3) and mask.dtype == torch.bool
    expected = torch.zeros(13, 3, dtype=torch.bool)
    expected[0, 0] = True  # token 0 (<i1>) sees image 1 only
    expected[1:7, 0:2] = True  # tokens 1-6 see images 1 and 2
    expected[7:, 2] = True  # tokens 7 onward see only image 3
    assert torch.equal(mask[0], expected)


def test_mllama_text_before_first_image_sees_nothing_and_single_image_to_end():
    ids = torch.tensor([[5, 6, IMG, 7, 8]])
    mask = masks.from_image_token_ids(ids, IMG)
    assert torch.equal(mask[0, :, 0], torch.tensor([False, False, True, True, True]))


def test_mllama_separate_images_each_until_next():
    ids = torch.tensor([[IMG, 1, 2, IMG, 3, IMG, 4]])
    mask = masks.from_image_token_ids(ids, IMG)[0]
    assert mask[:, 0].tolist() == [True, True, True, False, False, False, False]
    assert mask[:, 1].tolist() == [False, False, False, True, True, False, False]
    assert mask[:, 2].tolist() == [False, False, False, False, False, True, True]


def test_mllama_batch_padding_tiles_and_num_media():
    ids = torch.tensor([[IMG, 1, 2, 0], [1, IMG, IMG, 2]])
    mask = masks.from_image_token_ids(ids, IMG, num_media=3, tiles_per_image=2)
    assert mask.shape == (2, 4, 6)
    # row 0: one image, its two tiles visible from token 0 on; images 2 and 3 absent
    assert mask[0, :, 0].all() and mask[0, :, 1].all() and not mask[0, :, 2:].any()
    # row 1: a group of two adjacent images; token 1 sees image 1, tokens 2-3 see both
    assert mask[1, 0].sum() == 0
    assert mask[1, 1].tolist() == [True, True, False, False, False, False]
    assert mask[1, 2].tolist() == [True, True, True, True, False, False]
    assert torch.equal(mask[1, 3], mask[1, 2])
    with pytest.raises(ValueError, match="num_media=1"):
        masks.from_image_token_ids(ids, IMG, num_media=1)


def test_mllama_no_images_and_empty():
    mask = masks.from_image_token_ids(torch.tensor([[1, 2, 3]]), IMG)
    assert mask.shape == (1, 3, 0)
    assert masks.from_image_token_ids(torch.zeros(2, 0, dtype=torch.long), IMG).shape == (2, 0, 0)
    with pytest.raises(TypeError, match="input_ids"):
        masks.from_image_token_ids(torch.zeros(2, 3), IMG)


def test_flamingo_immediate_and_all_previous():
    # tokens:            t0     <m1>   t2    <m2>   t4
    locations = torch.tensor([[False, True, False, True, False]])
    immediate = masks.from_media_locations(locations, only_immediate=True)
    previous = masks.from_media_locations(locations, only_immediate=False)
    assert immediate.shape == previous.shape == (1, 5, 2)
    assert immediate[0].tolist() == [
        [False, False],  # text before any media sees nothing
        [True, False],
        [True, False],
        [False, True],
        [False, True],
    ]
    assert previous[0].tolist() == [
        [False, False],
        [True, False],
        [True, False],
        [True, True],
        [True, True],
    ]
    assert masks.from_media_locations(locations, num_media=4).shape == (1, 5, 4)
    with pytest.raises(TypeError, match="bool"):
        masks.from_media_locations(locations.long())


def test_hf_cross_attention_mask_and_additive():
    hf = torch.zeros(1, 3, 2, 2, dtype=torch.long)  # [B, S, I, T]
    hf[0, 1, 0, :] = 1
    hf[0, 2, 1, 0] = 1  # image 2 has only one real tile
    media_mask = masks.from_hf_cross_attention_mask(hf)
    assert media_mask.shape == (1, 3, 4)
    assert media_mask[0].tolist() == [
        [False, False, False, False],
        [True, True, False, False],
        [False, False, True, False],
    ]
    additive = masks.to_additive(media_mask, media_len=2, dtype=torch.float32)
    assert additive.shape == (1, 1, 3, 8)
    floor = torch.finfo(torch.float32).min
    assert (additive[0, 0, 0] == 0).all()  # empty row: all 0, as Mllama makes it
    assert additive[0, 0, 1].tolist() == [0, 0, 0, 0, floor, floor, floor, floor]
    assert additive[0, 0, 2].tolist() == [floor] * 4 + [0, 0] + [floor] * 2
