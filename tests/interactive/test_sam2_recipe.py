"""SAM 2's prompt simulation and loss in simulate_interaction: counted frequencies, click regions,
keyed draws, object scores."""

from __future__ import annotations

import pytest
import torch

from samtrain.interactive.keyed_random import KeyedRandom
from samtrain.interactive.prompts import jitter_boxes, mask_keys, sample_initial_prompts, step_generators
from samtrain.interactive.simulate import (
    NO_OBJECT_LOGIT,
    LossWeights,
    PromptRecipe,
    Prompts,
    corrective_clicks,
    first_prompts,
    simulate_interaction,
)

SAM2_PROMPTS = dict(
    point_prob=0.5,
    choice_scope="step",
    box_noise="uniform",
    pad_boxes=True,
    num_click_passes=7,
    num_mask_only_passes=0,
    gt_click_prob=0.1,
    empty_mask_click="background",
)
SAM2_LOSS = dict(full_resolution=True, iou_error="l1", object_score=1.0, pass_reduction="sum")


def inner_and_outer(n: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """gt (n, size, size): a centred square; pred: a larger square around it, so the error region
    is false positives only (clicks from it are negative, clicks from the truth positive)."""
    gt = torch.zeros(n, size, size, dtype=torch.bool)
    gt[:, 6:10, 6:10] = True
    pred = torch.zeros_like(gt)
    pred[:, 3:13, 3:13] = True
    return gt, pred


def keys(n: int, offset: int = 0) -> torch.Tensor:
    return mask_keys(torch.arange(offset, offset + n), torch.arange(n))


def test_ground_truth_clicks_per_mask_frequency_and_regions():
    n = 4000
    gt, pred = inner_and_outer(n)
    recipe = PromptRecipe(gt_click_prob=0.1)
    structural, per_mask = step_generators(0, 0, keys(n))
    valid = torch.ones_like(gt)
    points, labels = corrective_clicks(gt, pred, recipe, structural, per_mask, valid)
    x, y = points[:, 0, 0].long(), points[:, 0, 1].long()
    rows = torch.arange(n)
    positive = labels[:, 0] == 1
    assert gt[rows[positive], y[positive], x[positive]].all()  # from the truth: inside the mask
    negative = ~positive
    assert (pred & ~gt)[rows[negative], y[negative], x[negative]].all()  # from the error region
    assert 0.085 < positive.float().mean() < 0.115  # 0.1; binomial sd 0.005


def test_ground_truth_click_per_step_is_one_coin_for_every_mask():
    gt, pred = inner_and_outer(6)
    recipe = PromptRecipe(gt_click_prob=0.1, choice_scope="step")
    from_gt = []
    for step in range(600):
        structural, per_mask = step_generators(1, step, keys(6))
        _, labels = corrective_clicks(gt, pred, recipe, structural, per_mask, torch.ones_like(gt))
        assert labels.min() == labels.max()  # the whole step draws from one region
        from_gt.append(bool(labels[0, 0] == 1))
    assert 0.06 < sum(from_gt) / 600 < 0.14  # 0.1; sd 0.012


def test_without_ground_truth_clicks_nothing_extra_is_drawn():
    """SAM's path: gt_click_prob 0 draws exactly what sample_error_points draws."""
    gt, pred = inner_and_outer(5)
    structural, per_mask = step_generators(2, 3, keys(5))
    corrective_clicks(gt, pred, PromptRecipe(), structural, per_mask, torch.ones_like(gt))
    assert per_mask.draws == 1


def test_box_or_point_per_step_frequency_and_padding():
    gt, _ = inner_and_outer(5)
    recipe = PromptRecipe(**SAM2_PROMPTS)
    boxes = 0
    for step in range(400):
        structural, per_mask = step_generators(0, step, keys(5))
        prompts = first_prompts(gt, recipe, structural, per_mask, torch.ones_like(gt))
        if (prompts.labels[:, 0] == 2).all():
            boxes += 1
            assert prompts.labels.tolist() == [[2, 3, -1]] * 5  # SAM 2 pads every prompt
        else:
            assert prompts.labels.tolist() == [[1, -1]] * 5
    assert 0.42 < boxes / 400 < 0.58  # prob_to_use_box_input_for_train 0.5; sd 0.025


def test_uniform_box_noise_is_bounded_by_a_tenth_of_the_side_and_twenty_pixels():
    n = 3000
    boxes = torch.tensor([[100.0, 100.0, 150.0, 400.0]]).repeat(n, 1)  # w 50 -> bound 5; h 300 -> bound 20
    noisy = jitter_boxes(
        boxes, image_size=(1024, 1024), generator=KeyedRandom(torch.arange(n), salt=1), distribution="uniform"
    )
    offset = noisy - boxes
    bound = torch.tensor([5.0, 20.0, 5.0, 20.0])
    assert (offset.abs() <= bound).all()
    assert (offset.abs().amax(0) > 0.98 * bound).all()  # it reaches the bound
    # uniform on [-b, b]: mean |offset| is b / 2 (a gaussian clamped at 20 px would not be)
    torch.testing.assert_close(offset.abs().mean(0) / bound, torch.full((4,), 0.5), atol=0.03, rtol=0)
    with pytest.raises(ValueError, match="box noise distribution"):
        jitter_boxes(
            boxes, image_size=(8, 8), generator=KeyedRandom(torch.arange(n), salt=1), distribution="x"
        )


def test_the_first_click_on_an_empty_mask_is_negative_on_the_background():
    gt, _ = inner_and_outer(4)
    gt[1] = False
    valid = torch.zeros_like(gt)
    valid[:, :12, :12] = True
    recipe = PromptRecipe(point_prob=1.0, empty_mask_click="background")
    structural, per_mask = step_generators(0, 0, keys(4))
    prompts = first_prompts(gt, recipe, structural, per_mask, valid)
    assert prompts.labels[:, 0].tolist() == [1, 0, 1, 1]
    x, y = prompts.coords[1, 0].long().tolist()
    assert valid[1, y, x]
    sam = sample_initial_prompts(gt, point_prob=1.0, generator=step_generators(0, 0, keys(4))[1])
    assert torch.equal(prompts.coords[[0, 2, 3]], sam[0][[0, 2, 3]])  # the other masks are untouched


def test_recipe_refuses_padded_boxes_mixed_with_points_per_mask():
    with pytest.raises(ValueError, match="pad_boxes"):
        PromptRecipe(pad_boxes=True, point_prob=0.5)
    PromptRecipe(pad_boxes=True, point_prob=0.0)
    with pytest.raises(ValueError, match="choice_scope"):
        PromptRecipe(choice_scope="rank")
    with pytest.raises(ValueError, match="iou_error"):
        LossWeights(iou_error="huber")
    with pytest.raises(ValueError, match="pass_reduction"):
        LossWeights(pass_reduction="max")


# ----------------------------------------------------------------------------------------------------------
# simulate_interaction with object scores


class ScoringDecoder:
    """A decoder whose outputs depend on the pass: fixed random logits, IoUs and object scores per
    pass (leaves with gradient), recording every pass's prompts."""

    def __init__(
        self, n: int, size: int, passes: int, scores: torch.Tensor, with_scores: bool = True
    ) -> None:
        g = torch.Generator().manual_seed(0)
        self.logits = [
            torch.randn(n, 4, size // 4, size // 4, generator=g).requires_grad_() for _ in range(passes)
        ]
        self.ious = [torch.rand(n, 4, generator=g).requires_grad_() for _ in range(passes)]
        self.scores = [scores.clone().requires_grad_() for _ in range(passes)]
        self.with_scores = with_scores
        self.calls: list[Prompts] = []

    def __call__(self, prompts: Prompts):
        i = len(self.calls)
        self.calls.append(Prompts(prompts.coords.clone(), prompts.labels.clone(), prompts.mask_input))
        if not self.with_scores:
            return self.logits[i], self.ious[i]
        return self.logits[i], self.ious[i], self.scores[i]


def run(decoder, gt, recipe: PromptRecipe, weights: LossWeights, key_offset: int = 0, step: int = 4):
    return simulate_interaction(
        decoder,
        gt,
        valid=torch.ones_like(gt),
        mask_keys=keys(gt.shape[0], key_offset),
        seed=7,
        step=step,
        recipe=recipe,
        loss_weights=weights,
        num_masks=gt.shape[0],
    )


def test_absent_objects_are_fed_back_empty_and_take_no_mask_gradient():
    gt, _ = inner_and_outer(3)
    scores = torch.tensor([[2.0], [-1.0], [0.5]])  # mask 1: the head says "no object"
    decoder = ScoringDecoder(3, 16, passes=8, scores=scores)
    result = run(decoder, gt, PromptRecipe(**SAM2_PROMPTS), LossWeights(**SAM2_LOSS))
    assert result.num_passes == len(decoder.calls) == 8  # 1 + 7 corrective clicks
    fed_back = decoder.calls[1].mask_input
    assert (fed_back[1] == NO_OBJECT_LOGIT).all() and (fed_back[[0, 2]] > NO_OBJECT_LOGIT).all()
    assert (decoder.calls[1].labels[1, -1] == 1).item()  # nothing predicted: the click is positive
    result.loss.backward()
    grad = decoder.logits[0].grad
    assert not grad[1].any() and grad[[0, 2]].abs().sum() > 0
    assert decoder.scores[0].grad[1] != 0  # the object-score loss still trains the head there
    assert "object_score" in result.logs and "iou_l1" in result.logs


def test_the_object_score_loss_enters_with_its_weight_and_the_passes_are_summed():
    gt, _ = inner_and_outer(4)
    gt[2] = False  # an empty target
    scores = torch.tensor([[1.0], [3.0], [0.7], [-0.2]])
    recipe = PromptRecipe(**SAM2_PROMPTS)
    with_score = run(ScoringDecoder(4, 16, 8, scores), gt, recipe, LossWeights(**SAM2_LOSS))
    doubled = run(
        ScoringDecoder(4, 16, 8, scores), gt, recipe, LossWeights(**{**SAM2_LOSS, "object_score": 2.0})
    )
    per_pass_bce = (
        torch.nn.functional.binary_cross_entropy_with_logits(
            scores[:, 0], gt.flatten(1).any(1).float(), reduction="sum"
        )
        / 4
    )
    torch.testing.assert_close(with_score.logs["object_score"], 8 * per_pass_bce)  # summed over 8 passes
    # float32 differences of totals ~50: atol 1e-4
    torch.testing.assert_close(
        doubled.loss - with_score.loss, with_score.logs["object_score"], rtol=0, atol=1e-4
    )
    mean = run(
        ScoringDecoder(4, 16, 8, scores), gt, recipe, LossWeights(**{**SAM2_LOSS, "pass_reduction": "mean"})
    )
    torch.testing.assert_close(mean.loss * 8, with_score.loss)


def test_object_scores_asked_for_but_not_returned_is_a_clear_error():
    gt, _ = inner_and_outer(2)
    decoder = ScoringDecoder(2, 16, 8, torch.zeros(2, 1), with_scores=False)
    with pytest.raises(ValueError, match="object-score head"):
        run(decoder, gt, PromptRecipe(**SAM2_PROMPTS), LossWeights(**SAM2_LOSS))


@pytest.mark.parametrize("scope", ["mask", "step"])
def test_sam2_draws_follow_the_mask_keys_not_the_batch(scope):
    """Half the batch (one DDP rank) draws exactly the clicks the whole batch draws for its masks."""
    gt, _ = inner_and_outer(6)
    gt[:, 2:4, 2:5] = True  # a second blob so that error clicks vary
    recipe = PromptRecipe(
        **{**SAM2_PROMPTS, "choice_scope": scope, "gt_click_prob": 0.3, "pad_boxes": scope == "step"}
    )
    scores = torch.ones(6, 1)
    whole = ScoringDecoder(6, 16, 8, scores)
    run(whole, gt, recipe, LossWeights(**SAM2_LOSS))
    half = ScoringDecoder(3, 16, 8, scores[3:])
    half.logits = [x[3:].detach().requires_grad_() for x in whole.logits]
    half.ious = [x[3:].detach().requires_grad_() for x in whole.ious]
    simulate_interaction(
        half,
        gt[3:],
        valid=torch.ones_like(gt[3:]),
        mask_keys=keys(6)[3:],
        seed=7,
        step=4,
        recipe=recipe,
        loss_weights=LossWeights(**SAM2_LOSS),
        num_masks=6,
    )
    for full_call, half_call in zip(whole.calls, half.calls, strict=True):
        assert torch.equal(full_call.coords[3:], half_call.coords)
        assert torch.equal(full_call.labels[3:], half_call.labels)
