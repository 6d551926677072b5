"""SamPredictor: bad input gets a clear error; the batched call agrees with single calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samtrain.inference.predictor import SamPredictor
from samtrain.models import build_sam


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    p = SamPredictor(build_sam("vit_t", image_size=64).eval())
    p.set_image(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    return p


def test_outputs(predictor):
    masks, scores, low = predictor.predict(point_coords=np.array([[10, 20]]), point_labels=np.array([1]))
    assert masks.shape == (3, 48, 80) and masks.dtype == bool
    assert scores.shape == (3,) and low.shape == (3, 16, 16)
    logits, _, _ = predictor.predict(box=np.array([0, 0, 40, 30]), multimask_output=False, return_logits=True)
    assert logits.shape == (1, 48, 80) and logits.dtype == np.float32


def test_batched_call_equals_single_calls(predictor):
    coords = np.array([[[10, 20], [70, 5]], [[40, 40], [3, 3]]], dtype=float)
    labels = np.array([[1, 0], [1, 1]])
    masks, scores, low = predictor.predict_batch(coords, labels, multimask_output=True)
    assert masks.shape == (2, 3, 48, 80)
    for i in range(2):
        _, s, lr = predictor.predict(coords[i], labels[i])
        np.testing.assert_allclose(low[i], lr, atol=1e-5)
        np.testing.assert_allclose(scores[i], s, atol=1e-5)


def test_bgr_input_is_flipped(predictor):
    image = np.random.default_rng(1).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    predictor.set_image(image)
    rgb = predictor.get_image_embedding().clone()
    predictor.set_image(np.ascontiguousarray(image[..., ::-1]), image_format="BGR")
    torch.testing.assert_close(predictor.get_image_embedding(), rgb)
    predictor.set_image(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((10, 10, 3), dtype=np.float32), "uint8"),
        (np.zeros((10, 10), dtype=np.uint8), r"\(H, W, 3\)"),
        (np.zeros((10, 10, 4), dtype=np.uint8), r"\(H, W, 3\)"),
        (np.zeros((0, 10, 3), dtype=np.uint8), "empty"),
        ([[1, 2, 3]], "numpy array"),
    ],
)
def test_bad_images(image, match):
    p = SamPredictor(build_sam("vit_t", image_size=64))
    with pytest.raises(ValueError, match=match):
        p.set_image(image)


def test_predict_before_set_image():
    p = SamPredictor(build_sam("vit_t", image_size=64))
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(point_coords=np.array([[1, 1]]), point_labels=np.array([1]))
    with pytest.raises(RuntimeError, match="set_image"):
        p.get_image_embedding()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(point_coords=np.array([[1, 1]])), "together"),
        (dict(point_labels=np.array([1])), "together"),
        (dict(point_coords=np.array([[1, 1]]), point_labels=np.array([1, 0])), "one per point"),
        (dict(point_coords=np.array([1, 1]), point_labels=np.array([1])), r"shape \(T, 2\)"),
        (dict(point_coords=np.array([[1, 1]]), point_labels=np.array([2])), "padding"),
        (dict(point_coords=np.array([[100, 1]]), point_labels=np.array([1])), "outside the 80x48 image"),
        (dict(point_coords=np.array([[-1, 1]]), point_labels=np.array([1])), "outside"),
        (dict(box=np.array([30, 0, 10, 20])), "x2 >= x1"),
        (dict(box=np.array([0, 0, 10])), r"shape \(4,\)"),
        (dict(box=np.array([0, 0, 10, 60])), "outside"),
        (dict(mask_input=np.zeros((1, 8, 8))), "mask_input must have shape"),
    ],
)
def test_bad_prompts(predictor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        predictor.predict(**kwargs)


def test_batch_size_mismatch(predictor):
    with pytest.raises(ValueError, match="different batch sizes"):
        predictor.predict_batch(
            point_coords=np.zeros((2, 1, 2)), point_labels=np.ones((2, 1)), boxes=np.array([[0, 0, 5, 5]])
        )


def test_padding_points_may_lie_anywhere(predictor):
    """Label -1 points are ignored by the model, so only real points are checked against the image."""
    _, padded, _ = predictor.predict(np.array([[10, 20], [-1, -1]]), np.array([1, -1]))
    with pytest.raises(ValueError, match="outside"):
        predictor.predict(np.array([[10, 20], [-1, -1]]), np.array([1, 0]))
    assert padded.shape == (3,)
