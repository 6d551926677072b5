"""SamPredictor on a Sam2 against the official SAM2ImagePredictor on identical random weights, at the
original resolution: identical masks (but for pixels whose logit lies within 1e-4 of the threshold),
logits, scores and low-res logits within 1e-4, for points, a box,
points plus a box, a mask input, and one point with a single output (dynamic multimask via
stability)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samtrain.inference.predictor import SamPredictor
from tests.models.sam2.oracle import official_and_samtrain

VARIANT, IMAGE_SIZE = "sam2.1_hiera_n", 128
ATOL = 1e-4


@pytest.fixture(scope="module")
def predictors(tmp_path_factory):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    official, _, ours = official_and_samtrain(VARIANT, IMAGE_SIZE, tmp_path_factory.mktemp("ckpt"))
    theirs = SAM2ImagePredictor(official)
    grid = IMAGE_SIZE // 4
    theirs._bb_feat_sizes = [(grid, grid), (grid // 2, grid // 2), (grid // 4, grid // 4)]  # set for 1024 px
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(90, 150, 3), dtype=np.uint8)  # not square, not a multiple of 32
    image[20:70, 40:110] = (250, 30, 30)
    mine = SamPredictor(ours)
    theirs.set_image(image)
    mine.set_image(image)
    return theirs, mine


def test_image_features_match(predictors):
    theirs, mine = predictors
    features = mine.get_image_embedding()
    torch.testing.assert_close(features.image_embed, theirs._features["image_embed"], atol=ATOL, rtol=0)
    levels = (features.high_res_s0, features.high_res_s1)
    for level, official in zip(levels, theirs._features["high_res_feats"], strict=True):
        torch.testing.assert_close(level, official, atol=ATOL, rtol=0)
    assert mine.input_size == (IMAGE_SIZE, IMAGE_SIZE) and mine.original_size == (90, 150)


PROMPTS = {
    "points": dict(point_coords=np.array([[75.0, 45.0], [20.0, 80.0]]), point_labels=np.array([1, 0])),
    "box": dict(box=np.array([30.0, 15.0, 120.0, 75.0])),
    "points_and_box": dict(
        point_coords=np.array([[75.0, 45.0]]),
        point_labels=np.array([0]),
        box=np.array([30.0, 15.0, 120.0, 75.0]),
    ),
    "padding_label": dict(point_coords=np.array([[75.0, 45.0], [0.0, 0.0]]), point_labels=np.array([1, -1])),
}


def _compare(theirs, mine, **prompt):
    """Masks identical wherever the official logit is more than ATOL from the threshold (the two
    models' logits differ by float rounding, which can flip a pixel lying on it), logits,
    scores and low-res logits within ATOL."""
    want = theirs.predict(**prompt)
    got = mine.predict(**prompt)
    for name, a, b in zip(("masks", "scores", "low_res"), got, want, strict=True):
        assert a.shape == b.shape, name
    want_logits = theirs.predict(**prompt, return_logits=True)[0]
    np.testing.assert_allclose(mine.predict(**prompt, return_logits=True)[0], want_logits, atol=ATOL, rtol=0)
    decided = np.abs(want_logits - theirs.mask_threshold) > ATOL
    np.testing.assert_array_equal(got[0][decided], want[0][decided].astype(bool))
    np.testing.assert_allclose(got[1], want[1], atol=ATOL, rtol=0)
    np.testing.assert_allclose(got[2], want[2], atol=ATOL, rtol=0)
    assert 0 < got[0].sum() < got[0].size, "trivial masks would prove nothing"
    return got


@pytest.mark.parametrize("name", sorted(PROMPTS))
@pytest.mark.parametrize("multimask_output", [True, False])
def test_prompts_match(predictors, name, multimask_output):
    theirs, mine = predictors
    _compare(theirs, mine, **PROMPTS[name], multimask_output=multimask_output)


def test_one_point_single_output_goes_through_the_stability_rule(predictors):
    theirs, mine = predictors
    masks, scores, _ = _compare(
        theirs,
        mine,
        point_coords=np.array([[75.0, 45.0]]),
        point_labels=np.array([1]),
        multimask_output=False,
    )
    assert masks.shape == (1, 90, 150) and scores.shape == (1,)


def test_mask_input_matches(predictors):
    theirs, mine = predictors
    prompt = dict(point_coords=np.array([[75.0, 45.0]]), point_labels=np.array([1]))
    _, scores, low_res = theirs.predict(**prompt, multimask_output=True)
    mask_input = low_res[np.argmax(scores)][None]
    _compare(theirs, mine, **prompt, mask_input=mask_input, multimask_output=False)
    _compare(theirs, mine, mask_input=mask_input, multimask_output=True)


def test_logits_match(predictors):
    theirs, mine = predictors
    want, _, _ = theirs.predict(**PROMPTS["points"], return_logits=True)
    got, _, _ = mine.predict(**PROMPTS["points"], return_logits=True)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_ritm_protocol_on_a_sam2_matches_the_official_predictor(predictors):
    """samtrain's click protocol on a Sam2 (its square frame, its low-res clamp fed back) and the
    official SAM2ImagePredictor driven through the test's reference protocol give the same clicks and
    IoUs per click (to 1e-5) on the fixture's 90 x 150 image."""
    from samtrain.interactive.protocols import evaluate_sample
    from tests.interactive.test_protocols import objects_for, reference_protocol

    theirs, mine = predictors
    hw, clicks = (90, 150), 4
    image = np.zeros((*hw, 3), dtype=np.uint8)
    image[20:70, 40:110] = (250, 30, 30)
    gt = objects_for(hw)
    theirs.set_image(image)
    result = evaluate_sample(mine.model, image, gt, max_clicks=clicks)

    def official_predict(t, coords, labels, mask_input, multimask):
        return theirs.predict(
            point_coords=coords.astype(np.float64),
            point_labels=labels,
            mask_input=mask_input,
            multimask_output=multimask,
            return_logits=True,
        )

    for i in range(len(gt)):
        ref_clicks, ref_ious = reference_protocol(official_predict, gt[i], clicks)
        ours = [
            ((int(x), int(y)), int(lab))
            for (x, y), lab in zip(result.clicks.coords[i], result.clicks.labels[i], strict=True)
        ]
        assert ours == [((int(x), int(y)), lab) for (x, y), lab in ref_clicks], i
        np.testing.assert_allclose(result.clicks.ious[i], ref_ious, atol=1e-5)
