"""SAM 2's loss (samtrain.interactive.losses.sam2_loss) against the official sam2 training loss."""

import importlib
import sys
import types

import pytest
import torch

from samtrain.interactive.losses import Sam2Loss, object_score_loss, sam2_loss, sam_loss

WEIGHTS = {"loss_mask": 20.0, "loss_dice": 1.0, "loss_iou": 1.0, "loss_class": 1.0}  # the 2.1 configs


def official_loss_module():
    """sam2's ``training.loss_fns``. Its only tie to the trainer is one constant
    (``CORE_LOSS_KEY``); the trainer imports ``tensordict``, which the oracle install lacks, so
    without it the constant comes from a stand-in module with the trainer's value."""
    pytest.importorskip("sam2")
    pytest.importorskip("training")
    try:
        importlib.import_module("training.trainer")
    except ModuleNotFoundError:
        stand_in = types.ModuleType("training.trainer")
        stand_in.CORE_LOSS_KEY = "core_loss"
        sys.modules["training.trainer"] = stand_in
    return importlib.import_module("training.loss_fns")


def random_case(n: int, size: int, seed: int, empty: int = 0):
    """logits (n, 4, size, size), ious (n, 4), object scores (n, 1), targets (n, size, size) bool with
    the first ``empty`` targets empty; all float64-free float32 leaves."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, 4, size, size, generator=g) * 3).requires_grad_()
    ious = torch.rand(n, 4, generator=g).requires_grad_()
    scores = torch.randn(n, 1, generator=g).requires_grad_()
    targets = torch.rand(n, size, size, generator=g) > 0.6
    targets[:empty] = False
    return logits, ious, scores, targets


def official(module, outputs, ious, scores, targets, *, supervise_all_iou, l1, pred_obj_scores):
    """The official loss of one step: outputs (N, M, H, W) are the outputs it sees (M = 3 or 1)."""
    loss = module.MultiStepMultiMasksAndIous(
        weight_dict=dict(WEIGHTS),
        supervise_all_iou=supervise_all_iou,
        iou_use_l1_loss=l1,
        pred_obj_scores=pred_obj_scores,
        focal_gamma_obj_score=0.0,
        focal_alpha_obj_score=-1.0,
    )
    outs = {
        "multistep_pred_multimasks_high_res": [outputs],
        "multistep_pred_ious": [ious],
        "multistep_object_score_logits": [scores],
    }
    return loss([outs], targets[None].float())


CASES = [  # (n, size, empty targets, multimask, supervise_all_iou, l1, object scores)
    (5, 16, 0, True, True, True, True),
    (5, 16, 2, True, True, True, True),
    (3, 24, 1, False, True, True, True),
    (4, 16, 1, True, False, False, True),
    (4, 20, 0, False, False, False, False),
    (6, 16, 3, True, True, False, False),
    (2, 16, 2, True, True, True, True),  # every target empty
]


@pytest.mark.parametrize("n,size,empty,multimask,all_iou,l1,with_scores", CASES)
def test_sam2_loss_equals_official(n, size, empty, multimask, all_iou, l1, with_scores):
    module = official_loss_module()
    logits, ious, scores, targets = random_case(n, size, seed=n * 100 + size + empty, empty=empty)
    seen = slice(1, 4) if multimask else slice(0, 1)
    expected = official(
        module,
        logits[:, seen],
        ious[:, seen],
        scores,
        targets,
        supervise_all_iou=all_iou,
        l1=l1,
        pred_obj_scores=with_scores,
    )
    valid = torch.zeros(n, 4, dtype=torch.bool)
    valid[:, seen] = True
    ours = sam2_loss(
        logits,
        ious,
        targets,
        object_score_logits=scores if with_scores else None,
        valid=valid,
        iou_error_kind="l1" if l1 else "mse",
        iou_supervision="all" if all_iou else "chosen",
        num_masks=n,
    )
    assert isinstance(ours, Sam2Loss)
    pairs = {"loss_mask": ours.focal, "loss_dice": ours.dice, "loss_iou": ours.iou, "core_loss": ours.loss}
    if with_scores:
        pairs["loss_class"] = ours.object_score
    for key, value in pairs.items():
        torch.testing.assert_close(
            value, torch.as_tensor(expected[key]).float(), rtol=1e-6, atol=1e-7, msg=key
        )

    ours_grads = torch.autograd.grad(ours.loss, (logits, ious, scores), allow_unused=True)
    expected_grads = torch.autograd.grad(expected["core_loss"], (logits, ious, scores), allow_unused=True)
    for mine, theirs in zip(ours_grads, expected_grads, strict=True):
        if theirs is None:
            assert mine is None or not mine.any()
        else:
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-8)


def test_sam2_loss_summed_over_steps_equals_official_multistep():
    module = official_loss_module()
    steps = [random_case(4, 16, seed=s, empty=1) for s in range(3)]
    targets = steps[0][3]
    loss = module.MultiStepMultiMasksAndIous(
        weight_dict=dict(WEIGHTS), supervise_all_iou=True, iou_use_l1_loss=True, pred_obj_scores=True
    )
    outs = {
        "multistep_pred_multimasks_high_res": [
            s[0][:, 1:] if i == 0 else s[0][:, :1] for i, s in enumerate(steps)
        ],
        "multistep_pred_ious": [s[1][:, 1:] if i == 0 else s[1][:, :1] for i, s in enumerate(steps)],
        "multistep_object_score_logits": [s[2] for s in steps],
    }
    expected = loss([outs], targets[None].float())["core_loss"]
    total = 0
    for i, (logits, ious, scores, _) in enumerate(steps):
        valid = torch.zeros(4, 4, dtype=torch.bool)
        valid[:, 1:] = i == 0
        valid[:, 0] = i != 0
        total = (
            total
            + sam2_loss(logits, ious, targets, object_score_logits=scores, valid=valid, num_masks=4).loss
        )
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-7)


def test_empty_target_takes_only_the_object_score_loss():
    logits, ious, scores, targets = random_case(3, 16, seed=7, empty=1)
    result = sam2_loss(logits, ious, targets, object_score_logits=scores, num_masks=3)
    grad_logits, grad_ious = torch.autograd.grad(result.loss, (logits, ious))
    assert not grad_logits[0].any() and not grad_ious[0].any()
    assert grad_logits[1:].abs().sum() > 0 and grad_ious[1:].abs().sum() > 0
    # the class loss is binary cross-entropy against "the target has a pixel"
    present = torch.tensor([False, True, True])
    bce = (
        torch.nn.functional.binary_cross_entropy_with_logits(scores[:, 0], present.float(), reduction="sum")
        / 3
    )
    torch.testing.assert_close(result.object_score, bce.detach())
    torch.testing.assert_close(object_score_loss(scores, present).sum() / 3, bce)


def test_sam2_loss_without_object_scores_and_mse_equals_sam_loss():
    logits, ious, _, targets = random_case(4, 16, seed=3)
    valid = torch.ones(4, 4, dtype=torch.bool)
    valid[:, 0] = False
    ours = sam2_loss(logits, ious, targets, valid=valid, iou_error_kind="mse", num_masks=4)
    theirs = sam_loss(logits, ious, targets, valid=valid, num_masks=4)
    torch.testing.assert_close(ours.loss, theirs.loss)
    assert torch.equal(ours.chosen, theirs.chosen)
    assert ours.object_score == 0


def test_sam2_loss_bad_arguments():
    logits, ious, scores, targets = random_case(2, 8, seed=0)
    with pytest.raises(ValueError, match="iou_error"):
        sam2_loss(logits, ious, targets, iou_error_kind="huber")
    with pytest.raises(ValueError, match=r"object_score_logits must have shape \(N, 1\)"):
        sam2_loss(logits, ious, targets, object_score_logits=scores[:, 0])
    with pytest.raises(ValueError, match="iou_supervision"):
        sam2_loss(logits, ious, targets, iou_supervision="best")
