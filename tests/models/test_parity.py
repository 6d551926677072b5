"""samtrain against the official segment-anything implementation on identical random weights.

What README.md states is asserted here: embeddings, low-res logits and IoU scores agree to 1e-5
(measured at most 6e-6, 4e-6 and 5e-7 on this fixture), and the masks are identical: a pixel may
differ only where the official logit lies within 1e-5 of the threshold (none does here)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from samtrain.inference.predictor import SamPredictor
from samtrain.models import build_sam, export_sam_checkpoint
from tests.oracle import build_official_sam, official_and_samtrain, segment_anything

VARIANT, IMAGE_SIZE = "vit_t", 160  # grid 10 with window 8: windows need padding
ATOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return official_and_samtrain(VARIANT, IMAGE_SIZE, tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    # Non-square, not a multiple of 16, with structure so the masks are not trivial.
    img = rng.integers(0, 256, size=(100, 150, 3), dtype=np.uint8)
    img[20:70, 40:110] = (250, 30, 30)
    return img


@pytest.fixture(scope="module")
def predictors(models, image):
    official, ours = models
    theirs = segment_anything.SamPredictor(official)
    mine = SamPredictor(ours)
    theirs.set_image(image)
    mine.set_image(image)
    return theirs, mine


def test_image_embedding_matches(predictors):
    theirs, mine = predictors
    torch.testing.assert_close(mine.get_image_embedding(), theirs.get_image_embedding(), atol=ATOL, rtol=0)


def test_input_geometry_matches(predictors):
    theirs, mine = predictors
    assert mine.input_size == theirs.input_size
    assert mine.original_size == theirs.original_size


PROMPTS = {
    "one_point": dict(point_coords=np.array([[75.0, 45.0]]), point_labels=np.array([1])),
    "points_with_negatives": dict(
        point_coords=np.array([[75.0, 45.0], [10.0, 90.0], [140.0, 5.0]]), point_labels=np.array([1, 0, 0])
    ),
    "point_and_padding": dict(
        point_coords=np.array([[75.0, 45.0], [0.0, 0.0]]), point_labels=np.array([1, -1])
    ),
    "box": dict(box=np.array([38.0, 18.0, 112.0, 72.0])),
    "box_and_point": dict(
        point_coords=np.array([[60.0, 40.0]]),
        point_labels=np.array([0]),
        box=np.array([38.0, 18.0, 112.0, 72.0]),
    ),
}


def assert_identical_masks(theirs, masks: np.ndarray, kwargs: dict) -> None:
    """``masks`` equal the official ones wherever the official logit is not within ATOL of 0."""
    ref_logits = theirs.predict(**kwargs, return_logits=True)[0]
    ref_masks = ref_logits > theirs.model.mask_threshold
    assert masks.shape == ref_masks.shape
    differ = masks != ref_masks
    assert not differ[np.abs(ref_logits) > ATOL].any(), f"{differ.sum()} pixels differ"


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_prediction_matches(predictors, prompt, multimask):
    theirs, mine = predictors
    kwargs = dict(PROMPTS[prompt], multimask_output=multimask)
    _, ref_scores, ref_low = theirs.predict(**kwargs)
    masks, scores, low = mine.predict(**kwargs)
    np.testing.assert_allclose(low, ref_low, atol=ATOL, rtol=0)
    np.testing.assert_allclose(scores, ref_scores, atol=ATOL, rtol=0)
    assert masks.shape == (len(scores), 100, 150)
    assert_identical_masks(theirs, masks, kwargs)


@pytest.mark.parametrize("multimask", [True, False])
def test_mask_input_matches(predictors, multimask):
    theirs, mine = predictors
    _, _, low = theirs.predict(**PROMPTS["one_point"], multimask_output=False)
    kwargs = dict(PROMPTS["points_with_negatives"], mask_input=low, multimask_output=multimask)
    _, ref_scores, ref_low = theirs.predict(**kwargs)
    masks, scores, low_ours = mine.predict(**kwargs)
    np.testing.assert_allclose(low_ours, ref_low, atol=ATOL, rtol=0)
    np.testing.assert_allclose(scores, ref_scores, atol=ATOL, rtol=0)
    assert_identical_masks(theirs, masks, kwargs)


def test_batched_boxes_match_one_by_one(predictors):
    theirs, mine = predictors
    boxes = np.array([[38.0, 18.0, 112.0, 72.0], [0.0, 0.0, 60.0, 99.0], [80.0, 30.0, 149.0, 90.0]])
    _masks, scores, low = mine.predict_batch(boxes=boxes, multimask_output=False)
    for i, box in enumerate(boxes):
        _, ref_scores, ref_low = theirs.predict(box=box, multimask_output=False)
        np.testing.assert_allclose(low[i], ref_low, atol=ATOL, rtol=0)
        np.testing.assert_allclose(scores[i], ref_scores, atol=ATOL, rtol=0)


def test_official_forward_matches(models, image):
    official, ours = models
    x = torch.as_tensor(image).permute(2, 0, 1).float()
    x = torch.nn.functional.interpolate(x[None], size=(107, 160), mode="bilinear")[0]
    record = {
        "image": x,
        "original_size": (100, 150),
        "point_coords": torch.tensor([[[70.0, 40.0]], [[20.0, 90.0]]]),
        "point_labels": torch.tensor([[1], [1]]),
    }
    ref = official([record], multimask_output=True)[0]
    out = ours([record], multimask_output=True)[0]
    torch.testing.assert_close(out["low_res_logits"], ref["low_res_logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["iou_predictions"], ref["iou_predictions"], atol=ATOL, rtol=0)
    assert torch.equal(out["masks"], ref["masks"])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_export_loads_strict_into_official(models, tmp_path, suffix):
    official, ours = models
    path = export_sam_checkpoint(ours, tmp_path / f"export{suffix}")
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, weights_only=True)
    fresh = build_official_sam(VARIANT, IMAGE_SIZE)
    fresh.load_state_dict(state, strict=True)
    for name, value in official.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value, atol=0, rtol=0, msg=name)
    reloaded = build_sam(VARIANT, image_size=IMAGE_SIZE, checkpoint=path)
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value, atol=0, rtol=0, msg=name)


def test_export_at_another_size_loads_strict_into_official_built_there(models, tmp_path):
    """The official registry builds at 1024 px; exporting with image_size resamples the encoder's
    position tensors so a model trained at another size loads there strictly."""
    _, ours = models
    size = 2 * IMAGE_SIZE
    path = export_sam_checkpoint(ours, tmp_path / "export.pth", image_size=size)
    state = torch.load(path, weights_only=True)
    fresh = build_official_sam(VARIANT, size)
    fresh.load_state_dict(state, strict=True)
    assert fresh.image_encoder.pos_embed.shape[1:3] == (size // 16, size // 16)
    same = ours.state_dict()
    for name, value in fresh.mask_decoder.state_dict().items():
        torch.testing.assert_close(value, same[f"mask_decoder.{name}"], atol=0, rtol=0, msg=name)
    assert ours.image_encoder.pos_embed.shape[1:3] == (IMAGE_SIZE // 16, IMAGE_SIZE // 16)


def test_export_at_another_size_needs_the_variant(models, tmp_path):
    _, ours = models
    anonymous = copy.copy(ours)
    anonymous.variant = None
    with pytest.raises(ValueError, match="needs the model's variant"):
        export_sam_checkpoint(anonymous, tmp_path / "export.pth", image_size=2 * IMAGE_SIZE)
