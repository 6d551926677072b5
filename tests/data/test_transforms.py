"""SamTransform: SAM's exact eval preprocessing, aligned train augmentation, mask filtering."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from samtrain.data import SamResizeCrop, SamTransform
from samtrain.data.rle import RleMasks
from samtrain.frame import PIXEL_MEAN, PIXEL_STD, resize_longest_side, resized_shape
from tests.data_builders import coco_rle

MEAN = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
STD = torch.tensor(PIXEL_STD).view(3, 1, 1)


def normalised(rgb) -> torch.Tensor:
    """A 0-255 RGB colour after SAM normalisation: float (3, 1, 1)."""
    return (torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) - MEAN) / STD


def denormalised(image: torch.Tensor) -> np.ndarray:
    """(3, S, S) normalised -> float (S, S, 3) in 0-255."""
    return (image * STD + MEAN).permute(1, 2, 0).numpy()


def sample_with_boxes(
    h: int, w: int, boxes: list[tuple], colours: list[tuple], background=(128, 128, 128)
) -> dict:
    """An image with coloured boxes (y0, y1, x0, x1) and their masks (later boxes on top)."""
    image = np.empty((h, w, 3), np.uint8)
    image[:] = background
    masks = np.zeros((len(boxes), h, w), bool)
    for k, ((y0, y1, x0, x1), colour) in enumerate(zip(boxes, colours, strict=True)):
        image[y0:y1, x0:x1] = colour
        masks[:k, y0:y1, x0:x1] = False
        masks[k, y0:y1, x0:x1] = True
    return {"image": image, "masks": masks, "image_id": 7}


def test_resized_shape_rounds_half_up():
    assert resized_shape(100, 160, 64) == (40, 64)
    assert resized_shape(85, 128, 64) == (43, 64)  # 42.5 -> 43 (round() would give 42)
    assert resized_shape(1, 1000, 64) == (1, 64)  # never 0


def test_eval_rectangle_lands_at_scaled_coordinates_and_padding_is_zero():
    red, grey = (200, 30, 60), (128, 128, 128)
    sample = sample_with_boxes(100, 160, [(20, 60, 30, 90)], [red], background=grey)
    out = SamTransform(image_size=64)(sample)  # scale 0.4: rows 20..60 -> 8..24, cols 30..90 -> 12..36
    assert out["image"].shape == (3, 64, 64) and out["image"].dtype == torch.float32
    assert out["masks"].shape == (1, 64, 64) and out["masks"].dtype == torch.bool
    assert out["input_size"].tolist() == [40, 64] and out["original_size"].tolist() == [100, 160]
    assert out["input_size"].dtype == torch.int64 and out["image_id"] == 7

    expected_mask = torch.zeros(64, 64, dtype=torch.bool)
    expected_mask[8:24, 12:36] = True
    assert torch.equal(out["masks"][0], expected_mask)
    image = out["image"]  # bilinear: the rectangle's outermost pixels blend with the background
    torch.testing.assert_close(image[:, 9:23, 13:35], normalised(red).expand(3, 14, 22), atol=1e-4, rtol=0)
    torch.testing.assert_close(image[:, 26:40, :], normalised(grey).expand(3, 14, 64), atol=1e-4, rtol=0)
    assert (image[:, 40:, :] == 0).all()  # padding is 0 after normalisation


def test_eval_image_is_the_predictors_preprocessing():
    """Validation sees the pixels inference sees: samtrain.frame.resize_longest_side (PIL bilinear, as the
    official SamPredictor), SAM's normalisation, zero padding."""
    image = np.random.default_rng(0).integers(0, 256, size=(100, 150, 3), dtype=np.uint8)
    out = SamTransform(image_size=64)({"image": image, "masks": np.zeros((0, 100, 150), bool), "image_id": 1})
    resized = torch.from_numpy(np.array(resize_longest_side(image, 64))).permute(2, 0, 1).float()
    h, w = out["input_size"].tolist()
    assert (h, w) == tuple(resized.shape[1:]) == (43, 64)
    torch.testing.assert_close(out["image"][:, :h, :w], (resized - MEAN) / STD, atol=1e-4, rtol=0)
    assert (out["image"][:, h:] == 0).all()


def test_train_resize_stays_cv2():
    image = np.random.default_rng(0).integers(0, 256, size=(100, 150, 3), dtype=np.uint8)
    sample = {"image": image, "masks": np.zeros((0, 100, 150), bool), "image_id": 1}
    transform = SamTransform(image_size=64, train=True, scale_range=None, hflip_prob=0.0)
    out = transform(sample, rng=np.random.default_rng(0))
    resized = cv2.resize(image, (64, 43), interpolation=cv2.INTER_AREA)
    expected = (torch.from_numpy(resized).permute(2, 0, 1).float() - MEAN) / STD
    torch.testing.assert_close(out["image"][:, :43], expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="predictor_resize"):
        SamResizeCrop(64, scale_range=(0.5, 2.0), predictor_resize=True)


def test_eval_half_pixel_size_follows_sam_rounding():
    sample = sample_with_boxes(85, 128, [(0, 85, 0, 128)], [(10, 20, 30)])
    out = SamTransform(image_size=64, max_mask_fraction=1.0)(sample)
    assert out["input_size"].tolist() == [43, 64]
    assert out["masks"][0, :43].all() and not out["masks"][0, 43:].any()
    assert (out["image"][:, 43:] == 0).all() and (out["image"][:, :43] != 0).all()


def test_eval_without_resize_is_plain_normalisation():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(50, 64, 3), dtype=np.uint8)
    out = SamTransform(image_size=64)({"image": image, "masks": np.zeros((0, 50, 64), bool), "image_id": 1})
    expected = (torch.from_numpy(image).permute(2, 0, 1).float() - MEAN) / STD
    torch.testing.assert_close(out["image"][:, :50], expected, atol=1e-4, rtol=0)
    assert out["masks"].shape == (0, 64, 64)  # K = 0 is allowed


def colour_region(image: torch.Tensor, colour: tuple) -> np.ndarray:
    """Pixels of the (denormalised) image within 40 of the colour in every channel: bool (S, S)."""
    return (np.abs(denormalised(image) - np.array(colour)) < 40).all(axis=2)


def aligned(mask: np.ndarray, region: np.ndarray) -> bool:
    """The mask is where the colour is, up to one pixel of interpolation at the edges: the
    mask's interior (nonempty) is coloured and every coloured pixel is in the mask's 1-px dilation."""
    kernel = np.ones((3, 3), np.uint8)
    inner = cv2.erode(mask.astype(np.uint8), kernel).astype(bool)
    outer = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)
    return bool(inner.any() and region[inner].all() and not (region & ~outer).any())


@pytest.mark.parametrize("scale_range", [(0.5, 2.0), (1.6, 2.0)])
def test_train_masks_follow_the_image(scale_range):
    red, green = (250, 10, 10), (10, 250, 10)
    sample = sample_with_boxes(
        72, 96, [(10, 40, 6, 30), (30, 62, 60, 90)], [red, green], background=(60, 60, 200)
    )
    transform = SamTransform(image_size=64, train=True, scale_range=scale_range, hflip_prob=0.5)
    red_left_of_green, checked = set(), 0
    for seed in range(16):
        out = transform(sample, rng=np.random.default_rng(seed))
        masks = out["masks"].numpy()
        regions = [colour_region(out["image"], c) for c in (red, green)]
        for mask in masks:  # a crop may cut a box away or to a sliver; others must sit on their colour
            if cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).any():
                assert any(aligned(mask, region) for region in regions), f"seed {seed}: mask off its object"
                checked += 1
        if len(masks) == 2:
            cols = [np.nonzero(m.any(axis=0))[0].mean() for m in masks]
            red_left_of_green.add(bool(cols[0] < cols[1]))
        h, w = out["input_size"].tolist()
        assert not out["masks"][:, h:].any() and not out["masks"][:, :, w:].any()
        assert (out["image"][:, h:] == 0).all() and (out["image"][:, :, w:] == 0).all()
    assert checked >= 16
    assert red_left_of_green == {True, False}  # some samples were flipped, some not


def test_train_large_scale_jitter_crops_and_shrinks():
    sample = sample_with_boxes(72, 96, [(10, 40, 6, 30)], [(250, 10, 10)])
    transform = SamTransform(image_size=64, train=True, scale_range=(0.1, 2.0), hflip_prob=0.0)
    sizes = [transform(sample, rng=np.random.default_rng(s))["input_size"].tolist() for s in range(30)]
    assert [64, 64] in sizes  # enlarged past S and cropped
    assert any(max(hw) < 32 for hw in sizes)  # shrunk
    for h, w in sizes:
        assert h <= 64 and w <= 64


def test_colour_jitter_changes_colours_not_masks():
    sample = sample_with_boxes(64, 64, [(10, 40, 6, 30)], [(250, 10, 10)])
    plain = SamTransform(image_size=64, train=True, scale_range=None, hflip_prob=0.0)
    jitter = SamTransform(image_size=64, train=True, scale_range=None, hflip_prob=0.0, color_jitter=0.4)
    a, b = plain(sample, rng=np.random.default_rng(0)), jitter(sample, rng=np.random.default_rng(0))
    assert torch.equal(a["masks"], b["masks"])
    assert not torch.allclose(a["image"], b["image"])


def test_large_empty_and_small_masks_are_dropped():
    h = w = 64
    masks = np.zeros((5, h, w), bool)
    masks[0, :62, :] = True  # 96.9% of the image: dropped
    masks[1, :32, :] = True  # 50%: kept
    masks[3, 5, 5] = True  # 1 px: dropped when min_mask_area = 4
    masks[4, 10:14, 10:14] = True  # 16 px: kept; masks[2] is empty: dropped
    sample = {"image": np.zeros((h, w, 3), np.uint8), "masks": masks, "image_id": 3}
    out = SamTransform(image_size=64, min_mask_area=4)(sample)
    assert torch.equal(out["masks"], torch.from_numpy(masks[[1, 4]]))
    out = SamTransform(image_size=64, max_mask_fraction=1.0)(sample)
    assert torch.equal(out["masks"], torch.from_numpy(masks[[0, 1, 3, 4]]))


def many_masks_sample(k: int = 10) -> dict:
    masks = np.zeros((k, 64, 64), bool)
    for i in range(k):
        masks[i, 6 * i : 6 * i + 4, 6 * i : 6 * i + 4] = True
    return {"image": np.zeros((64, 64, 3), np.uint8), "masks": list(masks), "image_id": 11}


def kept_indices(out: dict) -> list[int]:
    """Which of many_masks_sample's masks survived (each has a unique diagonal position)."""
    return [int(m.nonzero()[0, 0]) // 6 for m in out["masks"]]


def test_at_most_max_masks_random_subset():
    sample = many_masks_sample()
    transform = SamTransform(image_size=64, train=True, max_masks=3, scale_range=None, hflip_prob=0.0)
    subsets = set()
    for seed in range(8):
        kept = kept_indices(transform(sample, rng=np.random.default_rng(seed)))
        assert len(kept) == 3 and len(set(kept)) == 3
        subsets.add(tuple(kept))
    assert len(subsets) > 1


def test_eval_subset_is_the_same_every_time():
    sample = many_masks_sample()
    transform = SamTransform(image_size=64, max_masks=4)
    first = kept_indices(transform(sample))
    assert len(first) == 4 and kept_indices(transform(sample)) == first
    assert len(SamTransform(image_size=64, max_masks=None)(sample)["masks"]) == 10


@pytest.mark.parametrize("encoded", [False, True], ids=["decoded", "rle"])
def test_eval_subset_depends_on_the_image_id_only_whatever_rng_is_passed(encoded):
    """The loaders pass an rng seeded by (seed, epoch, index): eval must ignore it, else val/resized_mIoU
    scores another subset of an image's masks every epoch."""
    sample = many_masks_sample()
    if encoded:
        masks = np.stack(sample["masks"])
        sample = {**sample, "masks": RleMasks.from_segmentations([coco_rle(m) for m in masks], 64, 64)}
    transform = SamTransform(image_size=64, max_masks=4)
    subsets = {tuple(kept_indices(transform(sample, rng=np.random.default_rng(s)))) for s in range(8)}
    assert subsets == {tuple(kept_indices(transform(sample)))}
    other_ids = {tuple(kept_indices(transform({**sample, "image_id": i}))) for i in range(8)}
    assert len(other_ids) > 1  # still a random subset, keyed by the image
    assert len(kept_indices(transform({**sample, "image_id": -5}))) == 4  # any int id


def test_state_dict_round_trip_repeats_the_stream():
    sample = sample_with_boxes(72, 96, [(10, 40, 6, 30)], [(250, 10, 10)])
    torch.manual_seed(0)
    transform = SamTransform(image_size=64, train=True, color_jitter=0.2)
    transform(sample)
    state = transform.state_dict()
    expected = transform(sample)
    fresh = SamTransform(image_size=64, train=True, color_jitter=0.2)
    fresh.load_state_dict(state)
    got = fresh(sample)
    assert torch.equal(got["image"], expected["image"]) and torch.equal(got["masks"], expected["masks"])
    assert not torch.equal(transform(sample)["image"], expected["image"])  # the stream moves on


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="scale_range"):
        SamTransform(image_size=64, scale_range=(2.0, 0.5))
    with pytest.raises(ValueError, match="max_mask_fraction"):
        SamTransform(image_size=64, max_mask_fraction=0.0)
    with pytest.raises(ValueError, match=r"expected uint8 \(H, W, 3\)"):
        SamTransform(image_size=64)({"image": np.zeros((8, 8), np.uint8), "masks": [], "image_id": 1})
    with pytest.raises(ValueError, match="do not match the image"):
        SamTransform(image_size=64)(
            {"image": np.zeros((8, 8, 3), np.uint8), "masks": np.zeros((1, 8, 9)), "image_id": 1}
        )


def test_train_without_masks():
    sample = {"image": np.zeros((40, 56, 3), np.uint8), "masks": np.zeros((0, 40, 56), bool), "image_id": 2}
    transform = SamTransform(image_size=64, train=True, hflip_prob=1.0, color_jitter=0.3)
    out = transform(sample, rng=np.random.default_rng(0))
    assert out["masks"].shape == (0, 64, 64) and out["image"].shape == (3, 64, 64)


def test_square_frame_eval_image_is_sam2s_preprocessing():
    """frame="square" (SAM 2.1): validation sees the pixels Sam2.preprocess makes of the original
    (both sides resized to S, antialiased bilinear), no padding; masks resized the same way."""
    from samtrain.models import build_sam

    model = build_sam("sam2.1_hiera_n", image_size=64)
    sample = sample_with_boxes(100, 150, [(10, 60, 20, 140)], [(250, 10, 10)])
    out = SamTransform(image_size=64, frame="square")(sample)
    assert out["input_size"].tolist() == [64, 64]
    expected = model.preprocess(torch.from_numpy(sample["image"]).permute(2, 0, 1)[None].float())[0]
    torch.testing.assert_close(out["image"], expected, atol=1e-4, rtol=0)
    mask = out["masks"][0].numpy()
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    assert (rows.min(), rows.max() + 1) == (round(10 * 64 / 100), round(60 * 64 / 100))  # each side its scale
    assert (cols.min(), cols.max() + 1) == (round(20 * 64 / 150), round(140 * 64 / 150))


def test_square_frame_train_jitter_scales_the_square():
    sample = sample_with_boxes(72, 96, [(10, 40, 6, 30)], [(250, 10, 10)])
    transform = SamTransform(image_size=64, train=True, scale_range=(0.1, 2.0), frame="square")
    sizes = [transform(sample, rng=np.random.default_rng(s))["input_size"].tolist() for s in range(30)]
    assert all(h == w for h, w in sizes)  # shrunk: a smaller square; enlarged: cropped to S x S
    assert [64, 64] in sizes and any(max(hw) < 32 for hw in sizes)
    with pytest.raises(ValueError, match="frame must be one of"):
        SamTransform(image_size=64, frame="letterbox")
