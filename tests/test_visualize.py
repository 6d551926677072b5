"""samtrain.visualize: shapes, dtypes, and that things land on the pixels they should."""

from __future__ import annotations

import numpy as np
import pytest

from samtrain import visualize as vis


def blank(h: int = 40, w: int = 50, value: int = 100) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def square_mask(h: int = 40, w: int = 50) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[10:20, 15:30] = True
    return mask


def test_unnormalize_inverts_sam_normalisation_and_crops_the_padding():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    mean, std = np.array(vis.PIXEL_MEAN), np.array(vis.PIXEL_STD)
    padded = np.zeros((3, 32, 32), np.float32)
    padded[:, :24, :32] = ((rgb - mean) / std).transpose(2, 0, 1)
    out = vis.unnormalize_image(padded, (24, 32))
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)
    assert vis.unnormalize_image(padded).shape == (32, 32, 3)
    with pytest.raises(ValueError):
        vis.unnormalize_image(np.zeros((32, 32, 3)))


@pytest.mark.parametrize(("label", "color"), [(1, vis.POSITIVE_COLOR), (0, vis.NEGATIVE_COLOR)])
def test_click_colours_its_pixel(label, color):
    image = blank()
    out = vis.draw_clicks(image, np.array([[12.2, 7.0]]), np.array([label]))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert tuple(out[7, 12]) == color  # row y=7, column x=12
    assert tuple(out[30, 40]) == (100, 100, 100)  # far away: untouched
    assert (image == 100).all()  # the input is not modified


def test_clicks_with_other_labels_are_not_drawn():
    image = blank()
    out = vis.draw_clicks(image, np.array([[5.0, 5.0], [9.0, 9.0]]), np.array([-1, 2]))
    np.testing.assert_array_equal(out, image)


def test_overlay_changes_pixels_only_inside_and_around_the_mask():
    image, mask = blank(), square_mask()
    out = vis.overlay_mask(image, mask, vis.GT_COLOR, alpha=0.5)
    changed = (out != image).any(-1)
    assert changed[mask].all()
    near = np.zeros_like(mask)
    near[9:21, 14:31] = True  # the mask and a 1 px ring (the contour)
    assert not changed[~near].any()


def test_outline_only_changes_the_contour():
    image, mask = blank(), square_mask()
    out = vis.overlay_mask(image, mask, vis.GT_COLOR, fill=False, outline=1)
    changed = (out != image).any(-1)
    assert changed[10, 15] and changed[19, 29]  # corners of the mask
    assert not changed[15, 22]  # its interior
    assert not changed[~mask].any()


def test_overlay_masks_fills_the_prediction_and_outlines_the_truth():
    image = blank()
    pred = np.zeros((40, 50), bool)
    pred[25:35, 5:15] = True
    out = vis.overlay_masks(image, gt=square_mask(), pred=pred)
    assert tuple(out[30, 10]) != (100, 100, 100)  # inside the prediction
    assert tuple(out[10, 20]) == vis.GT_COLOR  # on the truth's contour
    assert tuple(out[15, 22]) == (100, 100, 100)  # inside the truth, not predicted
    np.testing.assert_array_equal(vis.overlay_masks(image), image)
    with pytest.raises(ValueError):
        vis.overlay_mask(image, np.zeros((10, 10), bool), vis.GT_COLOR)


def test_box_is_drawn_on_its_edges():
    out = vis.draw_box(blank(), (10, 5, 30, 25), thickness=1)
    assert tuple(out[5, 20]) == vis.BOX_COLOR and tuple(out[25, 10]) == vis.BOX_COLOR
    assert tuple(out[15, 20]) == (100, 100, 100)


def test_resize_and_pad():
    assert vis.rescale_image(blank(40, 50), 2.0).shape == (80, 100, 3)
    mask = vis.resize_mask(square_mask(), 2.0)
    assert mask.shape == (80, 100) and mask.dtype == bool and mask.sum() == 4 * square_mask().sum()
    padded = vis.pad_to(blank(40, 50), 64, 64, vis.BACKGROUND_COLOR)
    assert padded.shape == (64, 64, 3) and tuple(padded[63, 63]) == vis.BACKGROUND_COLOR
    assert vis.pad_to(square_mask().astype(np.uint8), 64, 64).shape == (64, 64)
    with pytest.raises(ValueError):
        vis.pad_to(blank(40, 50), 32, 64)


def test_label_and_grid_shapes():
    panel = vis.label_panel(blank(40, 50), "1 click IoU 0.73", height=20)
    assert panel.shape == (60, 50, 3) and panel.dtype == np.uint8
    assert (panel[:20] != panel[0, 0]).any()  # some text was drawn
    grid = vis.make_grid([[panel, panel, panel], [blank(30, 20)]], pad=4)
    assert grid.shape == (2 * (60 + 4) + 4, 3 * (50 + 4) + 4, 3)
    np.testing.assert_array_equal(grid[4 : 4 + 60, 4 : 4 + 50], panel)
    with pytest.raises(ValueError):
        vis.make_grid([])
