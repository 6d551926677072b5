import pytest
import torch

from samtrain.interactive.metrics import (
    InteractiveMetrics,
    failures,
    iou_calibration_error,
    miou_at_clicks,
    number_of_clicks,
    threshold_name,
)

# Four objects, K = 5 clicks, with NoC / NoF worked out by hand below.
SCRIPTED = torch.tensor(
    [
        [0.50, 0.86, 0.88, 0.91, 0.95],  # NoC@85 = 2, NoC@90 = 4
        [0.90, 0.70, 0.95, 0.95, 0.95],  # exactly 0.9 counts as reached: NoC@85 = NoC@90 = 1
        [0.10, 0.20, 0.30, 0.84, 0.89],  # 0.85 at the last click (NoC@85 = 5), never 0.9: NoC@90 = K = 5
        [0.86, 0.86, 0.86, 0.86, 0.86],  # NoC@85 = 1, never 0.9: NoC@90 = 5, a failure at 90
    ]
)


def test_perfect_predictor():
    ious = torch.ones(6, 9)
    assert number_of_clicks(ious, 0.9).tolist() == [1] * 6
    assert not failures(ious).any()
    assert miou_at_clicks(ious, [1])[1].item() == 1.0


def test_predictor_that_never_reaches_the_threshold():
    ious = torch.linspace(0.1, 0.89, 7).expand(3, 7)
    noc = number_of_clicks(ious, 0.9)
    assert noc.dtype == torch.int64
    assert noc.tolist() == [7, 7, 7]
    assert failures(ious, 0.9).tolist() == [True, True, True]
    # 0.1 + i * 0.13166: 0.1, 0.23, 0.36, 0.49, 0.63 -> 0.5 is first reached at click 5
    assert number_of_clicks(ious, 0.5).tolist() == [5, 5, 5]


def test_scripted_curves():
    assert number_of_clicks(SCRIPTED, 0.85).tolist() == [2, 1, 5, 1]
    assert number_of_clicks(SCRIPTED, 0.9).tolist() == [4, 1, 5, 5]
    assert failures(SCRIPTED, 0.9).tolist() == [False, False, True, True]
    assert failures(SCRIPTED, 0.85).tolist() == [False, False, False, False]  # row 2 made it at click K
    miou = miou_at_clicks(SCRIPTED, [1, 3, 5])
    assert miou[1].item() == pytest.approx((0.5 + 0.9 + 0.1 + 0.86) / 4)
    assert miou[3].item() == pytest.approx((0.88 + 0.95 + 0.3 + 0.86) / 4)
    assert miou[5].item() == pytest.approx((0.95 + 0.95 + 0.89 + 0.86) / 4)


def test_miou_rejects_clicks_beyond_the_curve():
    with pytest.raises(ValueError, match="clicks must lie"):
        miou_at_clicks(SCRIPTED, [1, 9])
    with pytest.raises(ValueError, match="shape"):
        number_of_clicks(torch.ones(4), 0.9)


def test_iou_calibration_error():
    value = iou_calibration_error(torch.tensor([0.5, 1.0]), torch.tensor([0.7, 0.4]))
    assert value.item() == pytest.approx(0.4)


def test_threshold_name():
    assert [threshold_name(t) for t in (0.85, 0.9, 0.5)] == ["85", "90", "50"]


def test_compute_on_scripted_curves():
    metric = InteractiveMetrics()
    metric.update(SCRIPTED)
    out = metric.compute()
    # K = 5: no mIoU@9; no box or IoU-head inputs: no box_mIoU, no iou_calibration.
    assert set(out) == {"mIoU@1", "mIoU@3", "mIoU@5", "NoC@85", "NoC@90", "NoF@90"}
    assert out["NoC@85"].item() == pytest.approx((2 + 1 + 5 + 1) / 4)
    assert out["NoC@90"].item() == pytest.approx((4 + 1 + 5 + 5) / 4)
    assert out["NoF@90"].item() == 2
    assert out["mIoU@1"].item() == pytest.approx((0.5 + 0.9 + 0.1 + 0.86) / 4)
    assert out["mIoU@3"].item() == pytest.approx((0.88 + 0.95 + 0.3 + 0.86) / 4)


def test_two_updates_equal_the_concatenation():
    gen = torch.Generator().manual_seed(0)
    curves = torch.rand(10, 9, generator=gen).cummax(dim=1).values
    box_ious = torch.rand(10, generator=gen)
    pred_ious = torch.rand(10, generator=gen)

    split = InteractiveMetrics(clicks=(1, 2, 9), noc_thresholds=(0.5, 0.9), nof_thresholds=(0.5, 0.9))
    split.update(curves[:3], box_ious=box_ious[:3], pred_ious=pred_ious[:3])
    split.update(curves[3:], box_ious=box_ious[3:], pred_ious=pred_ious[3:])
    whole = InteractiveMetrics(clicks=(1, 2, 9), noc_thresholds=(0.5, 0.9), nof_thresholds=(0.5, 0.9))
    whole.update(curves, box_ious=box_ious, pred_ious=pred_ious)
    got, expected = split.compute(), whole.compute()

    keys = {
        "mIoU@1",
        "mIoU@2",
        "mIoU@9",
        "NoC@50",
        "NoC@90",
        "NoF@50",
        "NoF@90",
        "box_mIoU",
        "iou_calibration",
    }
    assert set(got) == set(expected) == keys
    for key in keys:
        torch.testing.assert_close(got[key], expected[key], msg=key)
    torch.testing.assert_close(got["mIoU@2"], curves[:, 1].mean())
    torch.testing.assert_close(got["NoC@50"], number_of_clicks(curves, 0.5).float().mean())
    torch.testing.assert_close(got["box_mIoU"], box_ious.mean())
    # true IoUs default to the first-click IoU of the curves
    torch.testing.assert_close(got["iou_calibration"], (pred_ious - curves[:, 0]).abs().mean())


def test_only_given_inputs_are_reported():
    metric = InteractiveMetrics()
    metric.update(
        box_ious=torch.tensor([0.5, 0.7]), pred_ious=torch.tensor([0.5]), true_ious=torch.tensor([0.25])
    )
    out = metric.compute()
    assert set(out) == {"box_mIoU", "iou_calibration"}
    assert out["box_mIoU"].item() == pytest.approx(0.6)
    assert out["iou_calibration"].item() == pytest.approx(0.25)


def test_short_curves_report_only_reachable_clicks():
    metric = InteractiveMetrics()
    metric.update(torch.full((2, 3), 0.95))
    out = metric.compute()
    assert {k for k in out if k.startswith("mIoU")} == {"mIoU@1", "mIoU@3"}
    assert out["NoC@90"].item() == 1.0 and out["NoF@90"].item() == 0


def test_curves_of_different_lengths_are_rejected():
    metric = InteractiveMetrics()
    metric.update(torch.ones(2, 5))
    with pytest.raises(ValueError, match="K=3"):
        metric.update(torch.ones(2, 3))
    with pytest.raises(ValueError, match="true_ious"):
        metric.update(pred_ious=torch.ones(2))


def test_reset_clears_the_states():
    metric = InteractiveMetrics()
    metric.update(torch.zeros(2, 5))
    metric.reset()
    metric.update(torch.ones(2, 5))
    assert metric.compute()["mIoU@1"].item() == 1.0


def test_merged_states_equal_the_concatenation():
    """merge_state reduces the states the way a DDP sync does (dist_reduce_fx="cat")."""
    curves = torch.rand(8, 5, generator=torch.Generator().manual_seed(1))
    first, second, whole = InteractiveMetrics(), InteractiveMetrics(), InteractiveMetrics()
    first.update(curves[:5], box_ious=curves[:5, 0])
    second.update(curves[5:], box_ious=curves[5:, 0])
    whole.update(curves, box_ious=curves[:, 0])
    first.merge_state(second)
    got, expected = first.compute(), whole.compute()
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key)


# ------------------------------------------------------------------------------------------------
# The benchmark summary: RITM's NoF, box mIoU by COCO size, oracle, Boundary IoU, calibration

import numpy as np  # noqa: E402

from samtrain.interactive.metrics import (  # noqa: E402
    boundary_iou,
    coco_size,
    mask_boundary,
    protocol_summary,
    ritm_failures,
)


def test_ritm_nof_counts_noc_equal_to_the_limit():
    """Object 2 reaches 0.85 only at click K: RITM counts it at 85, the other definition does not."""
    assert ritm_failures(SCRIPTED, 0.85).tolist() == [False, False, True, False]
    assert failures(SCRIPTED, 0.85).tolist() == [False, False, False, False]
    assert (
        ritm_failures(SCRIPTED, 0.9).tolist()
        == failures(SCRIPTED, 0.9).tolist()
        == [False, False, True, True]
    )


def test_protocol_summary_by_hand():
    ious = np.array(SCRIPTED.tolist(), dtype=np.float64).round(2)  # 0.90 exactly, not float32's 0.8999...
    out = protocol_summary(
        ious,
        clicks=[1, 5, 9],
        box_ious=np.array([0.2, 0.4, 0.6, 0.8]),
        areas=np.array([10, 32**2 - 1, 32**2, 96**2]),
        oracle_ious=np.array([0.6, 0.9, 0.2, 0.9]),
        pred_ious=np.array([0.5, 1.0, 0.2, 0.86]),
        boundary_ious={5: np.array([0.5, 0.5, 0.0, 1.0])},
    )
    assert set(out) == {
        "mIoU@1", "mIoU@5", "NoC@85", "NoC@90", "NoF@85", "NoF@90", "box_mIoU", "box_mIoU_small",
        "box_mIoU_medium", "box_mIoU_large", "oracle_mIoU@1", "iou_calibration", "boundary_mIoU@5",
    }  # fmt: skip
    assert out["mIoU@1"] == pytest.approx((0.5 + 0.9 + 0.1 + 0.86) / 4)
    assert out["NoC@85"] == pytest.approx((2 + 1 + 5 + 1) / 4) and out["NoC@90"] == pytest.approx(
        (4 + 1 + 5 + 5) / 4
    )
    assert (out["NoF@85"], out["NoF@90"]) == (1.0, 2.0)
    assert (out["box_mIoU_small"], out["box_mIoU_medium"], out["box_mIoU_large"]) == pytest.approx(
        (0.3, 0.6, 0.8)
    )
    assert out["oracle_mIoU@1"] == pytest.approx(0.65)
    assert out["iou_calibration"] == pytest.approx((0.0 + 0.1 + 0.1 + 0.0) / 4)
    assert out["boundary_mIoU@5"] == pytest.approx(0.5)
    other = protocol_summary(ious, nof_definition="never_reached")
    assert (other["NoF@85"], other["NoF@90"]) == (0.0, 2.0)
    with pytest.raises(ValueError, match="nof_definition"):
        protocol_summary(ious, nof_definition="sometimes")
    assert coco_size(np.array([1023, 1024, 9215, 9216])).tolist() == ["small", "medium", "medium", "large"]


def test_boundary_iou_by_hand():
    """A 20 x 20 square in a 50 x 50 image: d = round(0.02 * 70.7) = 1, so its band is its 76
    outline pixels (the erosion by one 3 x 3 step)."""
    gt = np.zeros((1, 50, 50), dtype=bool)
    gt[0, 10:30, 10:30] = True
    band = mask_boundary(gt)
    assert band.sum() == 20 * 20 - 18 * 18
    assert not band[0, 11:29, 11:29].any()
    assert boundary_iou(gt, gt).tolist() == [1.0]
    shifted = np.roll(gt, 1, axis=2)
    pb, gb = mask_boundary(shifted)[0], band[0]
    assert boundary_iou(shifted, gt)[0] == pytest.approx((pb & gb).sum() / (pb | gb).sum())
    assert (pb & gb).sum() == 2 * 19  # the top and bottom rows share 19 columns; the sides none
    assert boundary_iou(shifted, gt)[0] == pytest.approx(38 / (76 + 76 - 38))
    assert boundary_iou(np.zeros_like(gt), gt).tolist() == [0.0]
    edge = np.zeros((1, 50, 50), dtype=bool)
    edge[0, :, :5] = True  # the image border counts as background: the band runs along it too
    assert mask_boundary(edge)[0, :, 0].all()
    big = np.zeros((1, 400, 300), dtype=bool)
    big[0, 100:300, 50:250] = True  # d = round(0.02 * 500) = 10 steps: a 10 px band
    assert mask_boundary(big).sum() == 200 * 200 - 180 * 180
