"""AutomaticMaskGenerator against the official SamAutomaticMaskGenerator on identical weights.

Random weights give masks that spread over the whole image; a decoder whose logits are scaled up
(x20) and a high mask threshold on both models make them small and many, so that the IoU and
stability filters, NMS, the crop-edge rule and crop NMS all have something to decide.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from samtrain.inference.automatic import (
    AutomaticMaskGenerator,
    crop_boxes,
    masks_to_boxes,
    point_grid,
    uncompressed_rle,
)
from samtrain.models import build_sam, export_sam_checkpoint
from samtrain.models.lora import merge_lora_state
from tests.oracle import build_official_sam, randomise, segment_anything

MASK_THRESHOLD = 12.0
BASE = dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.3)


def sharpen_decoder(model: torch.nn.Module, factor: float = 20.0) -> None:
    """Scale the hypernetworks' last layer: logits x factor (the official and samtrain names agree)."""
    with torch.no_grad():
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(factor)
            mlp.layers[-1].bias.mul_(factor)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The official Sam to samtrain's vit_t spec at 128 px and samtrain's model from its weights."""
    torch.manual_seed(0)
    official = randomise(build_official_sam("vit_t", 128), seed=0)
    sharpen_decoder(official)
    path = tmp_path_factory.mktemp("ckpt") / "official.pth"
    torch.save(official.state_dict(), path)
    ours = build_sam("vit_t", image_size=128, checkpoint=path).eval()
    official.mask_threshold = ours.mask_threshold = MASK_THRESHOLD
    return official, ours


@pytest.fixture(scope="module")
def image():
    """(120, 160, 3): a noisy grey field with coloured rectangles."""
    rng = np.random.default_rng(0)
    img = np.full((120, 160, 3), 128, dtype=np.uint8) + rng.integers(0, 10, (120, 160, 3), dtype=np.uint8)
    colours = [(250, 30, 30), (20, 200, 40), (30, 30, 230), (240, 240, 20)]
    for k in range(8):
        y, x = rng.integers(0, 90), rng.integers(0, 130)
        h, w = rng.integers(10, 40, 2)
        img[y : y + h, x : x + w] = colours[k % 4]
    return img


def assert_same_records(theirs: list[dict], ours: list[dict]) -> None:
    """Same count; each official mask matched (IoU >= 0.99) by ours, with its scores within 1e-4.

    The two models' logits differ by float32 rounding (~1e-6 relative), which now and then moves
    one pixel across a threshold; on the test's small masks (a few thousand pixels) that alone
    moves a stability score by more than 1e-4, so up to two such pixels are allowed besides.
    """
    assert len(ours) == len(theirs)
    masks = np.stack([r["segmentation"] for r in ours]) if ours else np.zeros((0, 1, 1), bool)
    for ref in theirs:
        inter = (masks & ref["segmentation"]).sum(axis=(1, 2))
        union = (masks | ref["segmentation"]).sum(axis=(1, 2))
        iou = inter / np.maximum(union, 1)
        candidates = np.flatnonzero(iou >= 0.99)  # near-duplicates may survive NMS: take the closest score
        assert len(candidates), (ref["bbox"], iou.max())
        match = min(
            (ours[i] for i in candidates), key=lambda r: abs(r["predicted_iou"] - ref["predicted_iou"])
        )
        assert abs(match["predicted_iou"] - ref["predicted_iou"]) <= 1e-4
        assert abs(match["stability_score"] - ref["stability_score"]) <= max(1e-4, 2 / ref["area"])
        np.testing.assert_allclose(match["point_coords"], ref["point_coords"], atol=1e-6)
        assert match["crop_box"] == [int(v) for v in ref["crop_box"]]
        assert match["segmentation"].shape == ref["segmentation"].shape


SETTINGS = {
    "nms": dict(BASE),
    "no_nms": dict(BASE, pred_iou_thresh=0.2, box_nms_thresh=1.0),
    "crops": dict(BASE, stability_score_thresh=0.0, crop_n_layers=1),
    "crops_no_nms": dict(BASE, stability_score_thresh=0.0, crop_n_layers=1, box_nms_thresh=1.0),
    "small_regions": dict(BASE, box_nms_thresh=1.0, min_mask_region_area=60),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_matches_the_official_generator(models, image, setting):
    official, ours = models
    kwargs = SETTINGS[setting]
    theirs = segment_anything.SamAutomaticMaskGenerator(official, **kwargs).generate(image)
    mine = AutomaticMaskGenerator(ours, **kwargs).generate(image)
    assert len(theirs) >= 1  # the setting leaves something to compare
    assert_same_records(theirs, mine)
    if "crops" in setting:
        assert {tuple(r["crop_box"]) for r in mine} != {(0, 0, 160, 120)}  # crops contribute masks


def test_output_modes_agree(models, image):
    _, ours = models
    kwargs = dict(BASE, points_per_side=4)
    binary = AutomaticMaskGenerator(ours, **kwargs).generate(image)
    coco = AutomaticMaskGenerator(ours, output_mode="coco_rle", **kwargs).generate(image)
    raw = AutomaticMaskGenerator(ours, output_mode="uncompressed_rle", **kwargs).generate(image)
    assert len(binary) == len(coco) == len(raw) >= 1
    for b, c, r in zip(binary, coco, raw, strict=True):
        assert isinstance(c["segmentation"]["counts"], str)
        np.testing.assert_array_equal(mask_utils.decode(c["segmentation"]).astype(bool), b["segmentation"])
        h, w = r["segmentation"]["size"]
        from_raw = mask_utils.decode(mask_utils.frPyObjects(r["segmentation"], h, w)).astype(bool)
        np.testing.assert_array_equal(from_raw, b["segmentation"])
        assert b["area"] == c["area"] == int(b["segmentation"].sum())


def test_lora_model_equals_its_merged_export(tmp_path, models, image):
    _, ours = models
    path = tmp_path / "base.pth"
    export_sam_checkpoint(ours, path)
    lora = build_sam("vit_t", image_size=128, checkpoint=path, lora=dict(rank=2, alpha=4)).eval()
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    merged = build_sam("vit_t", image_size=128).eval()
    merged.load_state_dict(merge_lora_state(lora.state_dict()))
    lora.mask_threshold = merged.mask_threshold = MASK_THRESHOLD
    kwargs = dict(BASE, points_per_side=4)
    a = AutomaticMaskGenerator(lora, **kwargs).generate(image)
    b = AutomaticMaskGenerator(merged, **kwargs).generate(image)
    assert len(a) >= 1
    assert_same_records(a, b)


def test_helpers_match_the_official_ones():
    amg = pytest.importorskip("segment_anything.utils.amg")
    np.testing.assert_allclose(point_grid(5), amg.build_point_grid(5))
    for size, layers in (((180, 240), 2), ((301, 97), 1)):
        boxes, layer_ids = amg.generate_crop_boxes(size, layers, 512 / 1500)
        assert [(list(b), i) for b, i in crop_boxes(size, layers, 512 / 1500)] == list(
            zip(boxes, layer_ids, strict=True)
        )
    masks = torch.rand(6, 17, 23) > 0.97
    masks[0] = False
    torch.testing.assert_close(masks_to_boxes(masks), amg.batched_mask_to_box(masks))
    mask = np.random.default_rng(0).random((9, 7)) > 0.5
    assert uncompressed_rle(mask) == amg.mask_to_rle_pytorch(torch.from_numpy(mask)[None])[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(points_per_side=None), "exactly one"),
        (dict(point_grids=[point_grid(2)]), "exactly one"),
        (dict(points_per_side=None, point_grids=[point_grid(2)], crop_n_layers=1), "one per layer"),
        (dict(output_mode="png"), "output_mode"),
        (dict(points_per_batch=0), "points_per_batch"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutomaticMaskGenerator(build_sam("vit_t", image_size=64), **kwargs)


def test_explicit_point_grids_equal_points_per_side(models, image):
    _, ours = models
    kwargs = dict(pred_iou_thresh=0.0, stability_score_thresh=0.3)
    a = AutomaticMaskGenerator(ours, points_per_side=4, **kwargs).generate(image)
    b = AutomaticMaskGenerator(ours, points_per_side=None, point_grids=[point_grid(4)], **kwargs).generate(
        image
    )
    assert_same_records(a, b)


@pytest.mark.skipif(
    not os.environ.get("SAMTRAIN_TEST_VIT_B"),
    reason="vit_b at 1024 px takes minutes on a CPU: set SAMTRAIN_TEST_VIT_B=1",
)
def test_official_variant_through_the_export(tmp_path):
    """vit_b at the official 1024 px: samtrain's export loads into sam_model_registry strictly."""
    ours = randomise(build_sam("vit_b", image_size=1024).eval(), seed=1)
    sharpen_decoder(ours)
    path = export_sam_checkpoint(ours, tmp_path / "vit_b.pth")
    official = segment_anything.sam_model_registry["vit_b"](checkpoint=str(path)).eval()
    official.mask_threshold = ours.mask_threshold = MASK_THRESHOLD
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)
    kwargs = dict(BASE, box_nms_thresh=1.0)
    theirs = segment_anything.SamAutomaticMaskGenerator(official, **kwargs).generate(image)
    assert len(theirs) >= 2
    assert_same_records(theirs, AutomaticMaskGenerator(ours, **kwargs).generate(image))
