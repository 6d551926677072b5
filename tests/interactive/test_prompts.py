import math

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage
from torchvision.ops import masks_to_boxes as tv_masks_to_boxes

from samtrain.interactive.prompts import (
    click_schedule,
    jitter_boxes,
    mask_keys,
    masks_to_boxes,
    sample_error_points,
    sample_initial_prompts,
    sample_points_in_masks,
    step_generators,
)


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def random_masks(n: int, size: int = 32, *, seed: int = 0) -> torch.Tensor:
    """(n, size, size) bool: unions of random rectangles plus speckle, some of them empty."""
    g = gen(seed)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    corners = torch.randint(0, size, (n, 3, 4), generator=g)
    for i in range(n):
        for x1, y1, x2, y2 in corners[i].tolist():
            masks[i, min(y1, y2) : max(y1, y2) + 1, min(x1, x2) : max(x1, x2) + 1] = True
    speckle = torch.rand(n, size, size, generator=g) < 0.05
    masks ^= speckle
    masks[::7] = False  # a few empty masks
    return masks


def pixel_values(masks: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """masks (N, H, W), points (N, 2) integral (x, y) -> (N,) mask value at each point."""
    x, y = points.long().unbind(-1)
    return masks[torch.arange(masks.shape[0]), y, x]


def chi_square(counts: torch.Tensor) -> float:
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


# ----------------------------------------------------------------------------------------------------------
# sample_points_in_masks


def test_points_lie_inside_their_masks():
    masks = random_masks(64)
    points = sample_points_in_masks(masks, generator=gen(1))
    assert points.shape == (64, 2) and points.dtype == torch.float32
    assert torch.equal(points, points.round())
    nonempty = masks.flatten(1).any(1)
    assert pixel_values(masks, points)[nonempty].all()


def test_empty_mask_gives_image_centre():
    masks = torch.zeros(2, 32, 48, dtype=torch.bool)
    masks[1, 5, 7] = True
    points = sample_points_in_masks(masks, generator=gen())
    assert points.tolist() == [[24.0, 16.0], [7.0, 5.0]]


def test_points_are_uniform_over_the_mask():
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[3:6, 2:6] = True  # 12 pixels, L-shaped with the next line
    mask[6:8, 2] = True
    masks = mask.expand(7000, 16, 16)
    points = sample_points_in_masks(masks, generator=gen(3)).long()
    flat = points[:, 1] * 16 + points[:, 0]
    counts = torch.bincount(flat, minlength=256).float()
    inside = mask.flatten()
    assert counts[~inside].sum() == 0
    # chi-square with 13 degrees of freedom: 34.5 is the 0.1% quantile
    assert chi_square(counts[inside]) < 34.5


def test_points_same_seed_same_output():
    masks = random_masks(16)
    a = sample_points_in_masks(masks, generator=gen(5))
    b = sample_points_in_masks(masks, generator=gen(5))
    c = sample_points_in_masks(masks, generator=gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ----------------------------------------------------------------------------------------------------------
# boxes


def test_masks_to_boxes_hand_case_and_empty():
    masks = torch.zeros(3, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 9, 11] = True
    boxes = masks_to_boxes(masks)
    assert boxes.dtype == torch.float32
    assert boxes.tolist() == [[3.0, 2.0, 8.0, 4.0], [11.0, 9.0, 11.0, 9.0], [0.0, 0.0, 0.0, 0.0]]


def test_masks_to_boxes_matches_torchvision():
    masks = random_masks(40, 48, seed=2)
    nonempty = masks.flatten(1).any(1)
    boxes = masks_to_boxes(masks)
    assert torch.equal(boxes[nonempty], tv_masks_to_boxes(masks[nonempty]).float())
    assert (boxes[~nonempty] == 0).all()


def test_jitter_stays_within_noise_bound_and_image():
    g = gen(7)
    xy1 = torch.randint(0, 60, (500, 2), generator=g).float()
    xy2 = xy1 + torch.randint(0, 60, (500, 2), generator=g).float()
    boxes = torch.cat((xy1, xy2.clamp(max=63)), 1)
    jittered = jitter_boxes(boxes, image_size=(64, 96), noise_std=1.0, noise_max=5.0, generator=gen(8))
    delta = (jittered - boxes).abs()
    assert delta.max() <= 5.0 + 1e-5
    assert delta.max() > 4.9  # the clamp is active with noise_std=1
    assert (jittered[:, 0::2] >= 0).all() and (jittered[:, 0::2] <= 95).all()
    assert (jittered[:, 1::2] >= 0).all() and (jittered[:, 1::2] <= 63).all()
    assert (jittered[:, 0] <= jittered[:, 2]).all() and (jittered[:, 1] <= jittered[:, 3]).all()


def test_jitter_std_scales_with_box_side_and_clips_to_image():
    boxes = torch.tensor([[100.0, 200.0, 140.0, 400.0]]).expand(4000, 4)
    jittered = jitter_boxes(boxes, image_size=(1000, 1000), noise_std=0.1, noise_max=1000.0, generator=gen(9))
    std = (jittered - boxes).std(0)
    # sides: w = 40, h = 200 -> std 4 for x, 20 for y
    assert torch.allclose(std, torch.tensor([4.0, 20.0, 4.0, 20.0]), rtol=0.08)
    corner = torch.tensor([[0.0, 0.0, 31.0, 31.0]])
    clipped = jitter_boxes(corner.expand(200, 4), image_size=(32, 32), noise_std=0.5, generator=gen(9))
    assert clipped.min() == 0 and clipped.max() == 31


def test_jitter_bad_input():
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        jitter_boxes(torch.zeros(3, 2), image_size=(8, 8), generator=gen())
    with pytest.raises(ValueError, match="Generator"):
        jitter_boxes(torch.zeros(3, 4), image_size=(8, 8), generator=None)


# ----------------------------------------------------------------------------------------------------------
# sample_initial_prompts


def test_initial_prompts_all_points():
    masks = random_masks(30, seed=3)
    masks[::7] = True  # no empty masks here
    coords, labels = sample_initial_prompts(masks, point_prob=1.0, generator=gen(1))
    assert coords.shape == (30, 2, 2) and coords.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert (labels == torch.tensor([1, -1])).all()
    assert (coords[:, 1] == 0).all()
    assert pixel_values(masks, coords[:, 0]).all()


def test_initial_prompts_all_boxes():
    masks = random_masks(30, seed=4)
    masks[::7] = True
    coords, labels = sample_initial_prompts(masks, point_prob=0.0, generator=gen(1), box_noise_max=3.0)
    assert (labels == torch.tensor([2, 3])).all()
    boxes = coords.flatten(1)
    assert ((boxes - masks_to_boxes(masks)).abs() <= 3.0 + 1e-5).all()
    assert (boxes[:, :2] <= boxes[:, 2:]).all()
    assert not torch.equal(boxes, masks_to_boxes(masks))  # the noise is there


def test_initial_prompts_mix_and_choice_generator():
    masks = random_masks(400, seed=5)
    _, labels = sample_initial_prompts(masks, generator=gen(1))
    is_point = labels[:, 0] == 1
    assert 0.4 < is_point.float().mean() < 0.6
    assert (labels[is_point] == torch.tensor([1, -1])).all()
    assert (labels[~is_point] == torch.tensor([2, 3])).all()
    # the point-or-box choice follows choice_generator alone
    _, rank0 = sample_initial_prompts(masks, generator=gen(10), choice_generator=gen(2))
    _, rank1 = sample_initial_prompts(masks[:200], generator=gen(11), choice_generator=gen(2))
    assert torch.equal(rank0[:200], rank1)
    _, other = sample_initial_prompts(masks, generator=gen(10), choice_generator=gen(3))
    assert not torch.equal(rank0, other)


def test_initial_prompts_same_seed_same_output():
    masks = random_masks(20, seed=6)
    a = sample_initial_prompts(masks, generator=gen(4))
    b = sample_initial_prompts(masks, generator=gen(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_initial_prompts_bad_input():
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        sample_initial_prompts(torch.zeros(4, 4, dtype=torch.bool), generator=gen())
    with pytest.raises(ValueError, match="point_prob"):
        sample_initial_prompts(torch.zeros(1, 4, 4, dtype=torch.bool), point_prob=1.5, generator=gen())
    with pytest.raises(ValueError, match="bool"):
        sample_initial_prompts(torch.zeros(1, 4, 4), generator=gen())


# ----------------------------------------------------------------------------------------------------------
# sample_error_points, "uniform"


def test_uniform_error_clicks_land_in_the_error_with_the_right_label():
    gt = random_masks(200, seed=7)
    pred = random_masks(200, seed=8)
    points, labels = sample_error_points(gt, pred, "uniform", gen(2))
    assert points.shape == (200, 1, 2) and labels.shape == (200, 1) and labels.dtype == torch.int64
    at_gt = pixel_values(gt, points[:, 0])
    at_pred = pixel_values(pred, points[:, 0])
    has_error = (gt ^ pred).flatten(1).any(1)
    assert has_error.sum() > 150
    positive = labels[:, 0] == 1
    assert (at_gt & ~at_pred)[has_error & positive].all()
    assert (~at_gt & at_pred)[has_error & ~positive].all()
    assert positive.any() and (~positive).any()


def test_uniform_error_clicks_are_uniform_over_fn_and_fp():
    gt = torch.zeros(16, 16, dtype=torch.bool)
    pred = torch.zeros(16, 16, dtype=torch.bool)
    gt[2:4, 2:7] = True  # 10 FN pixels
    pred[10:13, 3:13] = True  # 30 FP pixels
    gt[0, 0] = pred[0, 0] = True  # agreement, never clicked
    n = 8000
    points, labels = sample_error_points(gt.expand(n, 16, 16), pred.expand(n, 16, 16), "uniform", gen(3))
    assert abs(labels.float().mean() - 0.25) < 0.02
    flat = (points[:, 0, 1] * 16 + points[:, 0, 0]).long()
    counts = torch.bincount(flat, minlength=256).float()
    error = (gt ^ pred).flatten()
    assert counts[~error].sum() == 0
    # chi-square with 39 degrees of freedom: 72.1 is the 0.1% quantile
    assert chi_square(counts[error]) < 72.1


def test_uniform_agreement_clicks_background_negative():
    gt = torch.zeros(3, 8, 8, dtype=torch.bool)
    gt[0, 2:6, 2:6] = True
    gt[2] = True  # all foreground, predicted perfectly: pixel (0, 0), label 0
    points, labels = sample_error_points(gt, gt.clone(), "uniform", gen(4))
    assert (labels == 0).all()
    assert not pixel_values(gt[:2], points[:2, 0]).any()
    assert points[2].tolist() == [[0.0, 0.0]]


def test_uniform_error_clicks_same_seed_same_output():
    gt, pred = random_masks(32, seed=9), random_masks(32, seed=10)
    a = sample_error_points(gt, pred, "uniform", gen(5))
    b = sample_error_points(gt, pred, "uniform", gen(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # Without a generator (DESIGN.md's call) the draw uses torch's global generator.
    torch.manual_seed(3)
    c = sample_error_points(gt, pred, "uniform")
    torch.manual_seed(3)
    d = sample_error_points(gt, pred, "uniform")
    assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])
    error = gt ^ pred
    rows, cols = c[0][:, 0, 1].long(), c[0][:, 0, 0].long()
    has_error = error.flatten(1).any(1)
    assert has_error.any()
    assert error[torch.arange(len(gt)), rows, cols][has_error].all()


def test_agreement_clicks_stay_inside_the_valid_region():
    """A perfect prediction on a padded image: the negative click falls on the image's background,
    never in the right/bottom padding, whichever method."""
    n, size = 200, 16
    valid = torch.zeros(n, size, size, dtype=torch.bool)
    valid[:, :10, :12] = True  # the image; the rest is padding
    gt = torch.zeros(n, size, size, dtype=torch.bool)
    gt[:, 2:6, 3:8] = True
    pred = gt.clone()
    pred[:, 12:, 13:] = True  # a "false positive" in the padding is no error
    for method, generator in (("uniform", gen(6)), ("center", None)):
        points, labels = sample_error_points(gt, pred, method, generator, valid=valid)
        assert (labels == 0).all()
        assert pixel_values(valid, points[:, 0]).all(), method
        assert not pixel_values(gt, points[:, 0]).any(), method
    # Without it the padding counts as background (the masks alone do not know where the image ends).
    points, _ = sample_error_points(gt, gt.clone(), "uniform", gen(6))
    assert not pixel_values(valid, points[:, 0]).all()


def test_error_clicks_inside_the_valid_region_keep_their_labels():
    gt, pred = random_masks(100, seed=11), random_masks(100, seed=12)
    valid = torch.zeros(32, 32, dtype=torch.bool)
    valid[:20, :25] = True  # broadcast over the masks
    points, labels = sample_error_points(gt, pred, "uniform", gen(7), valid=valid)
    inside = pixel_values(valid.expand_as(gt), points[:, 0])
    has_error = ((gt ^ pred) & valid).flatten(1).any(1)
    assert inside[has_error].all()
    at_gt, at_pred = pixel_values(gt, points[:, 0]), pixel_values(pred, points[:, 0])
    assert torch.equal(labels[has_error, 0] == 1, (at_gt & ~at_pred)[has_error])


def test_error_points_bad_input():
    gt = torch.zeros(2, 8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="same shape"):
        sample_error_points(gt, torch.zeros(2, 8, 9, dtype=torch.bool), "center")
    with pytest.raises(ValueError, match="unknown method"):
        sample_error_points(gt, gt, "random", gen())
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        sample_error_points(gt[0], gt[0], "center")
    with pytest.raises(ValueError, match="valid must be a bool"):
        sample_error_points(gt, gt, "center", valid=torch.ones(8, 8))
    with pytest.raises(ValueError, match="does not broadcast"):
        sample_error_points(gt, gt, "center", valid=torch.ones(3, 8, 8, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------------------
# sample_error_points, "center"


def test_center_square_false_negative_clicks_its_centre():
    gt = torch.zeros(1, 32, 40, dtype=torch.bool)
    gt[0, 10:19, 20:29] = True  # 9 x 9 square, centre (row 14, col 24)
    points, labels = sample_error_points(gt, torch.zeros_like(gt), "center")
    assert points.tolist() == [[[24.0, 14.0]]] and labels.tolist() == [[1]]
    # same as a direct OpenCV computation
    padded = np.pad(gt[0].numpy(), 1).astype(np.uint8)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    rows, cols = np.nonzero(dist == dist.max())
    assert (cols[0], rows[0]) == (24, 14) and dist.max() == 5.0


def test_center_larger_false_positive_gives_negative_click():
    gt = torch.zeros(1, 32, 32, dtype=torch.bool)
    pred = torch.zeros(1, 32, 32, dtype=torch.bool)
    gt[0, 1:4, 1:4] = True  # FN: 3 x 3
    pred[0, 15:26, 10:21] = True  # FP: 11 x 11, centre (row 20, col 15)
    points, labels = sample_error_points(gt, pred, "center")
    assert points.tolist() == [[[15.0, 20.0]]] and labels.tolist() == [[0]]


def test_center_ties_are_negative_and_padding_counts_as_background():
    gt = torch.zeros(1, 16, 16, dtype=torch.bool)
    pred = torch.zeros(1, 16, 16, dtype=torch.bool)
    gt[0, 0:3, 0:3] = True  # FN at the corner: max distance 2 thanks to the padding
    pred[0, 8:11, 8:11] = True  # FP 3 x 3: max distance 2 too -> negative (strictly larger needed)
    points, labels = sample_error_points(gt, pred, "center")
    assert points.tolist() == [[[9.0, 9.0]]] and labels.tolist() == [[0]]


def test_center_agreement_clicks_background_maximum():
    gt = torch.zeros(2, 16, 16, dtype=torch.bool)
    gt[0, :, :8] = True  # background = right half, 16 x 8
    gt[1] = True  # no background at all
    points, labels = sample_error_points(gt, gt.clone(), "center")
    assert labels.tolist() == [[0], [0]]
    # right half, padded: distance 4 at cols 11-12 (to col 7 and the pad col 16), first row with
    # distance >= 4 from top/bottom pads is row 3
    assert points.tolist() == [[[11.0, 3.0]], [[0.0, 0.0]]]


def _reference_center(gt: np.ndarray, pred: np.ndarray) -> tuple[tuple[int, int], int]:
    """RITM rule with scipy's exact EDT, one mask at a time."""

    def dist(region):
        return ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]

    fn, fp = dist(gt & ~pred), dist(~gt & pred)
    if fn.max() == 0 and fp.max() == 0:
        fn, fp, positive = np.zeros_like(fn), dist(~gt), False
    else:
        positive = fn.max() > fp.max()
    chosen = fn if positive else fp
    if chosen.max() == 0:
        return (0, 0), 0
    rows, cols = np.nonzero(chosen == chosen.max())
    return (int(cols[0]), int(rows[0])), int(positive)


def test_center_matches_scipy_reference_on_random_masks():
    gt, pred = random_masks(40, seed=11), random_masks(40, seed=12)
    pred[5] = gt[5]  # some agreement cases
    points, labels = sample_error_points(gt, pred, "center")
    for i in range(40):
        xy, label = _reference_center(gt[i].numpy(), pred[i].numpy())
        assert points[i, 0].tolist() == [float(xy[0]), float(xy[1])], i
        assert labels[i, 0].item() == label, i


# ----------------------------------------------------------------------------------------------------------
# click_schedule, step_generators


@pytest.mark.parametrize(("clicks", "mask_only"), [(8, 2), (5, 3), (4, 0), (0, 1), (3, 1)])
def test_click_schedule_counts(clicks, mask_only):
    for seed in range(20):
        schedule = click_schedule(
            num_click_passes=clicks, num_mask_only_passes=mask_only, generator=gen(seed)
        )
        assert len(schedule) == clicks + mask_only
        assert sum(schedule) == clicks
        if mask_only:
            assert schedule[-1] is False


def test_click_schedule_middle_pass_position_is_random():
    positions = set()
    for seed in range(200):
        schedule = click_schedule(generator=gen(seed))
        positions.add(schedule[:-1].index(False))
    assert positions == set(range(9))


def test_click_schedule_bad_counts():
    with pytest.raises(ValueError, match=">= 0"):
        click_schedule(num_click_passes=-1, generator=gen())


def _initial_and_click(masks: torch.Tensor, keys: torch.Tensor, step: int = 100):
    _, per_mask = step_generators(17, step, keys)
    coords, labels = sample_initial_prompts(masks, generator=per_mask)
    points, clicks = sample_error_points(masks, torch.zeros_like(masks), "uniform", per_mask)
    return coords, labels, points, clicks


def test_step_generators_follow_each_mask_not_its_rank_or_position():
    masks = random_masks(5, seed=3)
    ids, image_index = torch.tensor([7, 9]), torch.tensor([0, 0, 0, 1, 1])
    together = _initial_and_click(masks, mask_keys(ids, image_index))
    # two "ranks", one image each, see the same numbers as the single process holding both
    rank0 = _initial_and_click(masks[:3], mask_keys(ids[:1], image_index[:3]))
    rank1 = _initial_and_click(masks[3:], mask_keys(ids[1:], image_index[3:] - 1))
    swapped = _initial_and_click(masks[[3, 4, 0, 1, 2]], mask_keys(ids.flip(0), 1 - image_index.flip(0)))
    for whole, first, second, reordered in zip(together, rank0, rank1, swapped, strict=True):
        assert torch.equal(whole, torch.cat([first, second]))
        assert torch.equal(whole, reordered[[2, 3, 4, 0, 1]])


def test_mask_keys_distinguish_images_and_ordinals():
    keys = mask_keys(torch.tensor([7, 9, 8]), torch.tensor([0, 0, 1, 1, 1, 2]))
    assert keys.dtype == torch.int64 and len(set(keys.tolist())) == 6
    assert torch.equal(keys[:1], mask_keys(torch.tensor([7]), torch.tensor([0])))


def test_step_generators_are_deterministic_and_step_dependent():
    masks = random_masks(8, seed=4)
    keys = mask_keys(torch.arange(8), torch.arange(8))
    for a, b in zip(_initial_and_click(masks, keys), _initial_and_click(masks, keys), strict=True):
        assert torch.equal(a, b)  # a resumed run draws the same
    assert not torch.equal(_initial_and_click(masks, keys)[2], _initial_and_click(masks, keys, step=101)[2])
    schedules = [click_schedule(generator=step_generators(1, step, keys)[0]) for step in range(40)]
    assert schedules[3] == click_schedule(generator=step_generators(1, 3, keys[:2])[0])
    assert len({tuple(s) for s in schedules}) > 1


# ----------------------------------------------------------------------------------------------------------
# no host synchronisation on the training path


def _forbid_host_sync(mp: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("host sync on the training path")

    for name in ("item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__", "__float__"):
        mp.setattr(torch.Tensor, name, fail)


def test_training_samplers_make_no_host_sync(monkeypatch):
    masks, pred = random_masks(16, seed=13), random_masks(16, seed=14)
    with monkeypatch.context() as mp:
        _forbid_host_sync(mp)
        with pytest.raises(AssertionError, match="host sync"):
            masks.sum().item()  # the patch is active
        sample_points_in_masks(masks, generator=gen())
        masks_to_boxes(masks)
        sample_initial_prompts(masks, generator=gen(), choice_generator=gen(1))
        points, labels = sample_error_points(masks, pred, "uniform", gen())
        _, per_mask = step_generators(3, 4, mask_keys(torch.arange(4), torch.arange(4).repeat_interleave(4)))
        sample_initial_prompts(masks, generator=per_mask)
        sample_error_points(masks, pred, "uniform", per_mask)
    assert points.shape == (16, 1, 2) and labels.shape == (16, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_samplers_make_no_cuda_sync():
    masks = random_masks(16, seed=15).cuda()
    pred = random_masks(16, seed=16).cuda()
    structural, per_mask = step_generators(0, 0, torch.arange(16, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample_initial_prompts(masks, generator=per_mask, choice_generator=structural)
        points, labels = sample_error_points(masks, pred, "uniform", per_mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert points.device.type == "cuda" and labels.device.type == "cuda"
    at_error = pixel_values((masks ^ pred).cpu(), points[:, 0].cpu())
    assert at_error[(masks ^ pred).flatten(1).any(1).cpu()].all()
    assert math.isfinite(points.sum().item())
