import math

import pytest
import torch

from samtrain.interactive.losses import (
    SamLoss,
    dice_loss,
    mask_iou,
    resize_targets,
    sam_loss,
    sigmoid_focal_loss,
)

LN2 = math.log(2.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def square_targets(n: int, size: int = 32) -> torch.Tensor:
    """(n, size, size) bool: squares of growing side at the top-left."""
    targets = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        targets[i, : 4 + 2 * i, : 4 + 2 * i] = True
    return targets


# ----------------------------------------------------------------------------------------------------------
# sigmoid_focal_loss


def test_focal_hand_values_at_zero_logits():
    logits = torch.zeros(3, 4, 4)
    targets = torch.zeros(3, 4, 4, dtype=torch.bool)
    targets[0] = True
    targets[2, :2] = True  # half the pixels
    # p = 0.5: ce = ln 2, (1 - p_t)^2 = 1/4, alpha_t = 0.25 (positive) or 0.75 (negative)
    expected = torch.tensor([0.25, 0.75, 0.5]) * 0.25 * LN2
    assert torch.allclose(sigmoid_focal_loss(logits, targets), expected)


def test_focal_matches_formula_and_keeps_leading_dims():
    g = gen(1)
    logits = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64) * 3
    targets = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64) > 0.5
    t = targets.double()
    p = logits.sigmoid()
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = 0.3 * t + 0.7 * (1 - t)
    expected = (-alpha_t * (1 - p_t) ** 1.5 * p_t.log()).mean(dim=(-2, -1))
    loss = sigmoid_focal_loss(logits, targets, alpha=0.3, gamma=1.5)
    assert loss.shape == (2, 3)
    assert torch.allclose(loss, expected)


def test_focal_is_stable_for_large_logits():
    logits = torch.full((1, 4, 4), -200.0, requires_grad=True)
    loss = sigmoid_focal_loss(logits, torch.ones(1, 4, 4))
    # p_t = sigmoid(-200) ~ 0: loss = alpha * 200 exactly, no inf
    assert torch.allclose(loss, torch.tensor([50.0]))
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert sigmoid_focal_loss(torch.full((4, 4), 200.0), torch.ones(4, 4)) == 0


def test_focal_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        sigmoid_focal_loss(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W\)"):
        sigmoid_focal_loss(torch.zeros(4), torch.zeros(4))


# ----------------------------------------------------------------------------------------------------------
# dice_loss


def test_dice_hand_values():
    targets = torch.zeros(3, 8, 8, dtype=torch.bool)
    targets[:, 2:4, 2:5] = True  # 6 pixels each
    perfect = torch.where(targets[0], 50.0, -50.0)
    disjoint = torch.full((8, 8), -50.0)
    disjoint[6:, 6:] = 50.0  # 4 predicted pixels, none in the target
    zero = torch.zeros(8, 8)  # p = 0.5 on 64 pixels
    loss = dice_loss(torch.stack((perfect, disjoint, zero)), targets)
    expected = torch.tensor([0.0, 1 - 1 / (4 + 6 + 1), 1 - (6 + 1) / (32 + 6 + 1)])
    assert torch.allclose(loss, expected, atol=1e-6)


def test_dice_empty_target_and_prediction_is_zero():
    assert dice_loss(torch.full((1, 8, 8), -50.0), torch.zeros(1, 8, 8)).abs().max() < 1e-6


# ----------------------------------------------------------------------------------------------------------
# mask_iou


def test_mask_iou_hand_values():
    logits = torch.tensor([[[1.0, 1.0], [1.0, -1.0]], [[-1.0, -1.0], [-1.0, -1.0]], [[0.0, 2.0], [0.0, 0.0]]])
    targets = torch.tensor([[[1, 0], [0, 1]], [[0, 0], [0, 0]], [[0, 1], [0, 0]]], dtype=torch.bool)
    iou = mask_iou(logits, targets)
    # 1 shared pixel out of 4; both empty -> 0 (union clamped to 1); logit 0 is not foreground
    assert iou.dtype == torch.float32
    assert iou.tolist() == [0.25, 0.0, 1.0]


def test_mask_iou_has_no_grad_and_thresholds_float_targets():
    logits = torch.tensor([[2.0, -2.0, 2.0]], requires_grad=True)
    iou = mask_iou(logits, torch.tensor([[0.9, 0.6, 0.4]]))
    assert not iou.requires_grad
    assert iou.shape == () and iou.item() == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------------------
# sam_loss


def test_sam_loss_hand_value():
    logits = torch.zeros(1, 1, 4, 4)
    targets = torch.ones(1, 4, 4, dtype=torch.bool)
    out = sam_loss(logits, torch.tensor([[0.5]]), targets)
    focal = 0.25 * 0.25 * LN2
    dice = 1 - (2 * 8 + 1) / (8 + 16 + 1)
    iou = 0.25  # true IoU 0 (logit 0 is background), predicted 0.5
    assert isinstance(out, SamLoss)
    assert out.loss.item() == pytest.approx(20 * focal + dice + iou, rel=1e-6)
    assert out.focal.item() == pytest.approx(focal, rel=1e-6)
    assert out.dice.item() == pytest.approx(dice, rel=1e-6)
    assert out.iou.item() == pytest.approx(iou, rel=1e-6)
    assert out.chosen.tolist() == [0] and out.true_iou.tolist() == [[0.0]]


def multimask_case():
    """Two rows, three outputs: output 1 is exact for row 0, output 2 for row 1."""
    targets = square_targets(2, 16)
    good = torch.where(targets, 8.0, -8.0)
    bad = torch.where(targets, -2.0, 2.0)
    logits = torch.stack(
        (
            torch.stack((bad[0], good[0], torch.zeros(16, 16))),
            torch.stack((bad[1], torch.zeros(16, 16), good[1])),
        )
    )
    return logits, targets


def test_sam_loss_chooses_lowest_mask_loss_and_only_it_gets_gradient():
    logits, targets = multimask_case()
    logits.requires_grad_(True)
    out = sam_loss(logits, torch.full((2, 3), 0.5), targets, iou_weight=0.0)
    assert out.chosen.tolist() == [1, 2]
    out.loss.backward()
    grad_norm = logits.grad.abs().sum(dim=(-2, -1))
    assert (grad_norm[0, [0, 2]] == 0).all() and (grad_norm[1, [0, 1]] == 0).all()
    assert grad_norm[0, 1] > 0 and grad_norm[1, 2] > 0


def test_sam_loss_respects_valid():
    logits, targets = multimask_case()
    valid = torch.tensor([[True, False, True], [True, True, True]])
    out = sam_loss(logits, torch.full((2, 3), 0.5), targets, valid=valid)
    assert out.chosen.tolist() == [2, 2]  # the exact output of row 0 does not count
    # the IoU loss averages the valid outputs only: row 0 -> outputs 0 and 2
    true_iou = out.true_iou
    se = (0.5 - true_iou) ** 2
    expected = ((se[0, 0] + se[0, 2]) / 2 + se[1].mean()) / 2
    assert out.iou.item() == pytest.approx(expected.item(), rel=1e-6)


def test_sam_loss_rows_without_valid_output_are_ignored():
    logits, targets = multimask_case()
    valid = torch.tensor([[False, False, False], [True, True, True]])
    both = sam_loss(logits, torch.full((2, 3), 0.5), targets, valid=valid)
    second = sam_loss(logits[1:], torch.full((1, 3), 0.5), targets[1:])
    assert both.loss.item() == pytest.approx(second.loss.item(), rel=1e-6)


def test_sam_loss_iou_supervision():
    logits, targets = multimask_case()
    iou_pred = torch.tensor([[0.1, 0.8, 0.3], [0.2, 0.6, 0.7]], requires_grad=True)
    all_out = sam_loss(logits, iou_pred, targets, iou_supervision="all")
    chosen_out = sam_loss(logits, iou_pred, targets, iou_supervision="chosen")
    se = (iou_pred.detach() - all_out.true_iou) ** 2
    assert all_out.true_iou[0, 1] == 1 and all_out.true_iou[1, 2] == 1
    assert all_out.iou.item() == pytest.approx(se.mean(1).mean().item(), rel=1e-6)
    assert chosen_out.iou.item() == pytest.approx(((0.2**2 + 0.3**2) / 2), rel=1e-5)
    chosen_out.loss.backward()
    assert iou_pred.grad[0, 0] == 0 and iou_pred.grad[0, 1] != 0
    with pytest.raises(ValueError, match="iou_supervision"):
        sam_loss(logits, iou_pred, targets, iou_supervision="best")


def test_sam_loss_num_masks_normalisation():
    logits, targets = multimask_case()
    iou_pred = torch.full((2, 3), 0.5)
    default = sam_loss(logits, iou_pred, targets).loss
    assert sam_loss(logits, iou_pred, targets, num_masks=2.0).loss == default
    assert sam_loss(logits, iou_pred, targets, num_masks=torch.tensor(8.0)).loss.item() == pytest.approx(
        default.item() / 4
    )
    # clamped to >= 1: a rank whose share is zero cannot divide by zero
    assert sam_loss(logits, iou_pred, targets, num_masks=0).loss.item() == pytest.approx(2 * default.item())


def test_sam_loss_resizes_targets_bilinear_without_antialias():
    targets = torch.zeros(1, 8, 8, dtype=torch.bool)
    targets[0, 0, 0] = targets[0, 0, 1] = targets[0, 1, 0] = True  # 3 of the top-left 2 x 2 block
    targets[0, 4, 4] = targets[0, 4, 5] = True  # 2 of the block at (2, 2)
    targets[0, 7, 7] = True  # a lone pixel
    # without antialiasing, 8 -> 4 bilinear is the 2 x 2 block mean; > 0.5 keeps only the first block
    logits = torch.full((1, 1, 4, 4), -10.0)
    logits[0, 0, 0, 0] = 10.0
    out = sam_loss(logits, torch.ones(1, 1), targets)
    assert out.true_iou.tolist() == [[1.0]]
    assert out.iou.item() == pytest.approx(0.0)
    # the same targets given at the logits' size give the same loss
    small = torch.zeros(1, 4, 4, dtype=torch.bool)
    small[0, 0, 0] = True
    assert sam_loss(logits, torch.ones(1, 1), small).loss == out.loss


def test_resize_has_no_antialias_blur():
    # columns 1, 2, 4: every 2-column pair holds at most one -> the bilinear mean is <= 0.5 everywhere;
    # an antialiased (triangle) filter would give 5/8 at output column 1
    targets = torch.zeros(1, 8, 8, dtype=torch.bool)
    targets[0, :, [1, 2, 4]] = True
    assert not resize_targets(targets, (4, 4)).any()
    out = sam_loss(torch.full((1, 1, 4, 4), -10.0), torch.zeros(1, 1), targets)
    assert out.dice.item() < 1e-3  # empty target, empty prediction


def test_sam_loss_empty_targets_are_finite():
    logits = torch.randn(3, 3, 16, 16, generator=gen(2), requires_grad=True)
    iou_pred = torch.rand(3, 3, generator=gen(3), requires_grad=True)
    out = sam_loss(logits, iou_pred, torch.zeros(3, 32, 32, dtype=torch.bool))
    out.loss.backward()
    assert (
        torch.isfinite(out.loss) and torch.isfinite(logits.grad).all() and torch.isfinite(iou_pred.grad).all()
    )
    assert (out.true_iou == 0).all()
    empty = sam_loss(torch.zeros(0, 3, 16, 16), torch.zeros(0, 3), torch.zeros(0, 16, 16, dtype=torch.bool))
    assert empty.loss.item() == 0


def test_sam_loss_bad_shapes():
    logits = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="mask_logits"):
        sam_loss(logits[0], torch.zeros(2, 3), torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="iou_pred"):
        sam_loss(logits, torch.zeros(2, 1), torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="targets"):
        sam_loss(logits, torch.zeros(2, 3), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="valid"):
        sam_loss(logits, torch.zeros(2, 3), torch.zeros(2, 8, 8), valid=torch.ones(2, 1, dtype=torch.bool))


def test_sam_loss_makes_no_host_sync(monkeypatch):
    logits, targets = multimask_case()
    logits.requires_grad_(True)
    with monkeypatch.context() as mp:

        def fail(*args, **kwargs):
            raise AssertionError("host sync")

        for name in ("item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__", "__float__"):
            mp.setattr(torch.Tensor, name, fail)
        out = sam_loss(logits, torch.full((2, 3), 0.5), torch.nn.functional.pad(targets, (0, 16, 0, 16)))
        out.loss.backward()
    assert logits.grad is not None and out.chosen.shape == (2,)
