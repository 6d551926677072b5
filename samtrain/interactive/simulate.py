"""The simulated interaction of one training step (SAM paper, arXiv 2304.02643, appendix A).

Pass 0 prompts every mask with a positive point or a jittered box; then the click schedule runs
8 passes that add a click drawn uniformly from the error region of the previous prediction and
2 that add none. Every pass after the first feeds the previous low-res logits back as the mask
prompt. Single-point prompts get the multimask outputs (the loss on the best of them), the others
the single output; the output with the highest predicted IoU is fed back and clicked on.

The same loop runs SAM 2's image recipe (``PromptRecipe`` / ``LossWeights`` fields, defaults SAM's;
docs/sam2_training.md): 7 corrective clicks, some from the ground truth, per-step coins, and with a
decoder that returns object-score logits, SAM 2's hard "no object" masks and its object-score loss.

The model enters only through ``decode``, a callable from the prompts of all masks to their
low-res logits and IoU predictions, so any implementation of SAM's decoder (samtrain's batched
``Sam.decode_masks``, the official modules called per image) runs the same recipe with the same
draws. Nothing here knows about Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from samtrain.frame import masks_in_frame
from samtrain.interactive.losses import IOU_ERRORS, SamLoss, sam2_loss, sam_loss
from samtrain.interactive.prompts import (
    BOX_NOISE,
    click_schedule,
    sample_error_points,
    sample_initial_prompts,
    step_generators,
)
from samtrain.models.sam.prompt_encoder import BOX_TOP_LEFT, NEGATIVE, PADDING, POSITIVE

GT_MASK_LOGIT = 10.0  # magnitude of the logits that stand for a ground-truth mask prompt
# The logit SAM 2 writes over every pixel of a mask whose object score says "no object" (sam2's
# NO_OBJ_SCORE): the mask is empty, fed back as such, and takes no mask-loss gradient.
NO_OBJECT_LOGIT = -1024.0


CHOICE_SCOPES = ("mask", "step")
EMPTY_MASK_CLICKS = ("centre", "background")
PASS_REDUCTIONS = ("mean", "sum")


@dataclass
class PromptRecipe:
    """How prompts are simulated during training (defaults: the SAM paper; ``conf/prompts/sam2.yaml``
    holds SAM 2's, docs/sam2_training.md maps each field to its sam2 config key)."""

    point_prob: float = 0.5
    box_noise_std: float = 0.1
    box_noise_max: float = 20.0
    num_click_passes: int = 8
    num_mask_only_passes: int = 2
    # Probability that a step's first pass also receives each mask's ground truth as the mask
    # prompt (a structural choice: the same on every rank).
    gt_mask_prob: float = 0.0
    # Probability that a corrective click is drawn uniformly from the ground truth (a positive
    # click inside the mask) instead of the error region (SAM 2: 0.1).
    gt_click_prob: float = 0.0
    # Who shares the point-or-box and the ground-truth-click coins: "mask" (each mask draws its own
    # from its key) or "step" (one coin per step for every mask of the global batch, SAM 2).
    choice_scope: str = "mask"
    # "gaussian" (SAM) or "uniform" (SAM 2), see prompts.jitter_boxes.
    box_noise: str = "gaussian"
    # Box prompts carry a padding point after their corners too (SAM 2 always pads); needs every
    # mask of a step to get the same kind of prompt (point_prob 0 or 1, or choice_scope "step").
    pad_boxes: bool = False
    # The first click of a point prompt on an empty mask: "centre" (a positive click at the image
    # centre) or "background" (a negative click uniform on the image, SAM 2).
    empty_mask_click: str = "centre"

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("choice_scope", self.choice_scope, CHOICE_SCOPES),
            ("empty_mask_click", self.empty_mask_click, EMPTY_MASK_CLICKS),
            ("box_noise", self.box_noise, BOX_NOISE),
        ):
            if value not in choices:
                raise ValueError(f"prompts.{name}: unknown value {value!r}; expected one of {choices}")
        for name in ("point_prob", "gt_mask_prob", "gt_click_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"prompts.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.pad_boxes and self.choice_scope == "mask" and 0.0 < self.point_prob < 1.0:
            raise ValueError(
                "prompts.pad_boxes needs every mask of a step to get the same kind of prompt (a padded box "
                "and a point prompt have different token counts): set prompts.choice_scope=step, or "
                f"point_prob to 0 or 1 (it is {self.point_prob})"
            )


@dataclass
class LossWeights:
    """The loss of every pass and how passes add up (defaults: SAM's; ``conf/model/loss/sam2.yaml``
    holds SAM 2's)."""

    focal: float = 20.0
    dice: float = 1.0
    iou: float = 1.0
    iou_supervision: str = "all"
    # False: low-res logits against downsampled targets (SAM); True: logits upsampled to S.
    full_resolution: bool = False
    # The IoU head's error: "mse" (SAM) or "l1" (SAM 2's iou_use_l1_loss).
    iou_error: str = "mse"
    # Weight of the object-score loss (SAM 2's loss_class); > 0 asks the decoder for object
    # scores, and masks with an empty target then take no mask, dice or IoU loss.
    object_score: float = 0.0
    object_score_focal_alpha: float = -1.0
    object_score_focal_gamma: float = 0.0
    # How the passes of a step add up: "mean" (SAM) or "sum" (SAM 2).
    pass_reduction: str = "mean"

    def __post_init__(self) -> None:
        if self.iou_error not in IOU_ERRORS:
            raise ValueError(
                f"loss.iou_error: unknown value {self.iou_error!r}; expected one of {IOU_ERRORS}"
            )
        if self.pass_reduction not in PASS_REDUCTIONS:
            raise ValueError(
                f"loss.pass_reduction: unknown value {self.pass_reduction!r}; expected one of {PASS_REDUCTIONS}"
            )
        if self.object_score < 0:
            raise ValueError(f"loss.object_score must be >= 0, got {self.object_score}")

    @property
    def wants_object_scores(self) -> bool:
        return self.object_score > 0


@dataclass
class Prompts:
    """The prompts of every mask for one decoder pass."""

    coords: torch.Tensor  # (N, T, 2) (x, y) in the model-input frame
    labels: torch.Tensor  # (N, T)
    mask_input: torch.Tensor | None  # (N, 1, S/4, S/4) logits fed back, detached


# prompts -> low-res logits (N, M, S/4, S/4) and IoU predictions (N, M), and for a model with an
# object-score head (SAM 2) optionally object-score logits (N, 1); output 0 is the single-mask
# output, 1: the multimask outputs.
Decode = Callable[[Prompts], tuple[torch.Tensor, ...]]


@dataclass
class Interaction:
    """What one step's interaction produced: the loss (the mean over passes) and its parts."""

    loss: torch.Tensor  # () with graph, unless every pass was backpropagated on its own
    logs: dict[str, torch.Tensor]  # detached scalars: loss, focal, dice, iou_mse, mIoU_first, mIoU_last
    num_passes: int


def masks_to_prompt_logits(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Ground-truth masks (N, S, S) bool -> mask-prompt logits (N, 1, S/4, S/4) in [-10, 10],
    from the area fraction each low-res cell covers."""
    fraction = F.interpolate(masks[:, None].float(), size=size, mode="area")
    return (2 * fraction - 1) * GT_MASK_LOGIT


def output_candidates(labels: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """labels (N, T) -> (N, num_outputs) bool: the multimask outputs (1:) for a single-point
    prompt, the single-mask output (0) for everything else."""
    is_click = (labels == NEGATIVE) | (labels == POSITIVE)
    single_point = (is_click.sum(1) == 1) & ~(labels >= BOX_TOP_LEFT).any(1)
    is_multi = torch.arange(num_outputs, device=labels.device) > 0
    return torch.where(single_point[:, None], is_multi, ~is_multi)


def chosen_output(logits: torch.Tensor, iou_pred: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The output each mask continues from, the candidate with the highest predicted IoU:
    logits (N, M, h, w) -> detached (N, 1, h, w)."""
    best = iou_pred.detach().masked_fill(~candidates, float("-inf")).argmax(1)
    return logits.detach()[torch.arange(len(best), device=best.device), best].unsqueeze(1)


def pass_loss(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    gt_masks: torch.Tensor,
    candidates: torch.Tensor,
    *,
    weights: LossWeights,
    num_masks: torch.Tensor | float,
    object_scores: torch.Tensor | None = None,
) -> SamLoss:
    """The loss of one pass: logits (N, M, h, w), iou_pred (N, M), gt (N, S, S), candidates (N, M),
    object_scores (N, 1) or None. SAM's (:func:`sam_loss`) unless the weights ask for an L1 IoU error
    or an object-score loss, then SAM 2's (:func:`sam2_loss`)."""
    if weights.full_resolution:
        logits = F.interpolate(logits, size=gt_masks.shape[-2:], mode="bilinear", align_corners=False)
    common = dict(
        valid=candidates,
        focal_weight=weights.focal,
        dice_weight=weights.dice,
        iou_weight=weights.iou,
        iou_supervision=weights.iou_supervision,
        num_masks=num_masks,
    )
    if weights.iou_error == "mse" and not weights.wants_object_scores:
        return sam_loss(logits, iou_pred, gt_masks, **common)
    return sam2_loss(
        logits,
        iou_pred,
        gt_masks,
        object_score_logits=object_scores if weights.wants_object_scores else None,
        object_score_weight=weights.object_score,
        iou_error_kind=weights.iou_error,
        object_score_alpha=weights.object_score_focal_alpha,
        object_score_gamma=weights.object_score_focal_gamma,
        **common,
    )


def suppress_absent_objects(logits: torch.Tensor, object_scores: torch.Tensor | None) -> torch.Tensor:
    """SAM 2's hard object decision: every output of a mask whose object-score logit is <= 0
    becomes :data:`NO_OBJECT_LOGIT` everywhere. logits (N, M, h, w), object_scores (N, 1) or None."""
    if object_scores is None:
        return logits
    present = object_scores[:, :, None, None] > 0
    return torch.where(
        present, logits, torch.full((), NO_OBJECT_LOGIT, dtype=logits.dtype, device=logits.device)
    )


def split_outputs(
    outputs: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A decode's result -> (logits, iou_pred, object_scores or None)."""
    if len(outputs) == 2:
        return outputs[0], outputs[1], None
    if len(outputs) == 3:
        return outputs[0], outputs[1], outputs[2]
    raise ValueError(
        f"decode must return (logits, iou_pred[, object_score_logits]), got {len(outputs)} values"
    )


def chosen_iou(result: SamLoss) -> torch.Tensor:
    """() the mean true IoU of the output each mask's loss was taken on."""
    if result.true_iou.numel() == 0:
        return result.true_iou.new_zeros(())
    return result.true_iou.gather(1, result.chosen[:, None]).mean()


def first_prompts(
    gt_masks: torch.Tensor,
    recipe: PromptRecipe,
    structural: torch.Generator,
    per_mask,
    valid: torch.Tensor,
) -> Prompts:
    """Pass 0: a positive point or a jittered box per mask (and, with probability
    ``gt_mask_prob`` for the whole step, the ground truth as the mask prompt). With
    ``choice_scope="step"`` one coin decides point or box for every mask of the step."""
    point_prob = recipe.point_prob
    if recipe.choice_scope == "step" and 0.0 < point_prob < 1.0:
        point_prob = float(torch.rand((), generator=structural, device=gt_masks.device) < point_prob)
    coords, labels = sample_initial_prompts(
        gt_masks,
        point_prob=point_prob,
        generator=per_mask,
        box_noise_std=recipe.box_noise_std,
        box_noise_max=recipe.box_noise_max,
        box_noise=recipe.box_noise,
    )
    if recipe.empty_mask_click == "background":
        coords, labels = click_background_of_empty_masks(coords, labels, gt_masks, per_mask, valid)
    if recipe.pad_boxes and point_prob == 0.0:  # every prompt is a box: [top-left, bottom-right, pad]
        coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
        labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), PADDING)], dim=1)
    mask_input = None
    if (
        recipe.gt_mask_prob > 0
        and torch.rand((), generator=structural, device=gt_masks.device) < recipe.gt_mask_prob
    ):
        low_res = gt_masks.shape[-1] // 4
        mask_input = masks_to_prompt_logits(gt_masks, (low_res, low_res))
    return Prompts(coords=coords, labels=labels, mask_input=mask_input)


def click_background_of_empty_masks(
    coords: torch.Tensor, labels: torch.Tensor, gt_masks: torch.Tensor, per_mask, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM 2's first click on an empty mask: a negative click uniform on the image (inside
    ``valid``) instead of the point prompt's positive click. coords (N, T, 2), labels (N, T)."""
    background, negative = sample_error_points(
        gt_masks, gt_masks, method="uniform", generator=per_mask, valid=valid
    )
    replace = (labels[:, 0] == POSITIVE) & ~gt_masks.flatten(1).any(1)
    coords = coords.clone()
    labels = labels.clone()
    coords[:, 0] = torch.where(replace[:, None], background[:, 0], coords[:, 0])
    labels[:, 0] = torch.where(replace, negative[:, 0], labels[:, 0])
    return coords, labels


def corrective_clicks(
    gt_masks: torch.Tensor,
    pred_masks: torch.Tensor,
    recipe: PromptRecipe,
    structural: torch.Generator,
    per_mask,
    valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per mask, (N, 1, 2) points and (N, 1) labels: uniform in the error region of the
    prediction, or with probability ``gt_click_prob`` (one coin per mask, or per step with
    ``choice_scope="step"``) uniform in the ground truth (SAM 2's ``prob_to_sample_from_gt``)."""
    if recipe.gt_click_prob <= 0:
        return sample_error_points(gt_masks, pred_masks, method="uniform", generator=per_mask, valid=valid)
    if recipe.choice_scope == "step":
        from_gt = bool(torch.rand((), generator=structural, device=gt_masks.device) < recipe.gt_click_prob)
        reference = torch.zeros_like(pred_masks) if from_gt else pred_masks
        return sample_error_points(gt_masks, reference, method="uniform", generator=per_mask, valid=valid)
    from_gt = per_mask.rand(1)[:, 0] < recipe.gt_click_prob  # (N,)
    error_point, error_label = sample_error_points(
        gt_masks, pred_masks, method="uniform", generator=per_mask, valid=valid
    )
    gt_point, gt_label = sample_error_points(
        gt_masks, torch.zeros_like(pred_masks), method="uniform", generator=per_mask, valid=valid
    )
    return (
        torch.where(from_gt[:, None, None], gt_point, error_point),
        torch.where(from_gt[:, None], gt_label, error_label),
    )


def simulate_interaction(
    decode: Decode,
    gt_masks: torch.Tensor,
    *,
    valid: torch.Tensor,
    mask_keys: torch.Tensor,
    seed: int,
    step: int,
    recipe: PromptRecipe | None = None,
    loss_weights: LossWeights | None = None,
    num_masks: torch.Tensor | float | None = None,
    backward_pass: Callable[[torch.Tensor], None] | None = None,
) -> Interaction:
    """Runs the 1 + clicks + mask-only passes of one step over every mask at once.

    Args:
        decode: the decoder (see :data:`Decode`).
        gt_masks: (N, S, S) bool, the targets in the model-input frame.
        valid: (N, S, S) bool, each mask's image region (clicks never land in the padding).
        mask_keys: (N,) int64 identities (``prompts.mask_keys``): every per-mask draw follows them.
        seed, step: with the keys, seed every draw (``prompts.step_generators``).
        recipe, loss_weights: the SAM paper's by default.
        num_masks: the loss normaliser (the mean mask count per rank under DDP; default N).
        backward_pass: called with each pass's loss as soon as it is known (per-pass backward);
            the returned loss is then detached.
    """
    recipe = recipe or PromptRecipe()
    weights = loss_weights or LossWeights()
    num_masks = max(gt_masks.shape[0], 1) if num_masks is None else num_masks
    structural, per_mask = step_generators(seed, step, mask_keys)
    prompts = first_prompts(gt_masks, recipe, structural, per_mask, valid)
    schedule = [
        False,
        *click_schedule(
            num_click_passes=recipe.num_click_passes,
            num_mask_only_passes=recipe.num_mask_only_passes,
            generator=structural,
        ),
    ]
    results: list[SamLoss] = []
    pred_masks = None
    for adds_click in schedule:
        if adds_click:
            point, label = corrective_clicks(gt_masks, pred_masks, recipe, structural, per_mask, valid)
            prompts.coords = torch.cat([prompts.coords, point], dim=1)
            prompts.labels = torch.cat([prompts.labels, label], dim=1)
        logits, iou_pred, object_scores = split_outputs(decode(prompts))
        if weights.wants_object_scores and object_scores is None:
            raise ValueError(
                f"loss.object_score={weights.object_score} needs object-score logits, but the decoder returned "
                "none (a SAM 1 model has no object-score head; set loss.object_score=0)"
            )
        logits = suppress_absent_objects(logits, object_scores)
        candidates = output_candidates(prompts.labels, logits.shape[1])
        result = pass_loss(
            logits,
            iou_pred,
            gt_masks,
            candidates,
            weights=weights,
            num_masks=num_masks,
            object_scores=object_scores,
        )
        if backward_pass is not None:
            backward_pass(result.loss)
            result.loss = result.loss.detach()
        results.append(result)
        prompts.mask_input = chosen_output(logits, iou_pred, candidates)
        pred_masks = masks_in_frame(prompts.mask_input, valid)
    return Interaction(
        loss=reduce_passes([r.loss for r in results], weights.pass_reduction),
        logs=interaction_logs(results, weights),
        num_passes=len(schedule),
    )


def reduce_passes(values: list[torch.Tensor], reduction: str) -> torch.Tensor:
    """() the passes' values added up: their mean (SAM) or their sum (SAM 2)."""
    stacked = torch.stack(values)
    return stacked.sum() if reduction == "sum" else stacked.mean()


def interaction_logs(results: list[SamLoss], weights: LossWeights | None = None) -> dict[str, torch.Tensor]:
    """Detached scalars over the passes, reduced as the loss is (``weights.pass_reduction``): the
    loss and its parts; the chosen outputs' true IoU at the first and the last pass."""
    weights = weights or LossWeights()

    def reduce(name: str) -> torch.Tensor:
        return reduce_passes([getattr(r, name) for r in results], weights.pass_reduction).detach()

    logs = {
        "loss": reduce("loss"),
        "focal": reduce("focal"),
        "dice": reduce("dice"),
        ("iou_mse" if weights.iou_error == "mse" else "iou_l1"): reduce("iou"),
        "mIoU_first": chosen_iou(results[0]).detach(),
        "mIoU_last": chosen_iou(results[-1]).detach(),
    }
    if weights.wants_object_scores:
        logs["object_score"] = reduce("object_score")
    return logs
