"""The simulated interaction of a training step, as a function of any decode callable."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from bench.common import synthetic_batch
from samtrain.frame import valid_regions
from samtrain.interactive.prompts import mask_keys
from samtrain.interactive.simulate import (
    LossWeights,
    PromptRecipe,
    Prompts,
    output_candidates,
    simulate_interaction,
)
from samtrain.lightning.sam_module import SamModule


def test_output_candidates():
    labels = torch.tensor([[1, -1, -1], [2, 3, -1], [1, -1, 0], [2, 3, 1], [0, -1, -1]])
    expected = torch.tensor(
        [
            [False, True, True, True],  # one positive point: the multimask outputs
            [True, False, False, False],  # a box
            [True, False, False, False],  # two points
            [True, False, False, False],  # box and a click
            [False, True, True, True],  # one negative point is still a single point
        ]
    )
    assert torch.equal(output_candidates(labels, 4), expected)


class ScriptedDecoder:
    """A decoder that returns fixed logits and records the prompts of every pass."""

    def __init__(self, logits: torch.Tensor, iou_pred: torch.Tensor) -> None:
        self.logits, self.iou_pred = logits, iou_pred
        self.calls: list[Prompts] = []

    def __call__(self, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append(Prompts(prompts.coords.clone(), prompts.labels.clone(), prompts.mask_input))
        return self.logits, self.iou_pred


def scripted_run(recipe: PromptRecipe, *, logits: torch.Tensor, iou_pred: torch.Tensor, gt: torch.Tensor):
    decoder = ScriptedDecoder(logits, iou_pred)
    n, size = gt.shape[0], gt.shape[-1]
    result = simulate_interaction(
        decoder,
        gt,
        valid=torch.ones(n, size, size, dtype=torch.bool),
        mask_keys=mask_keys(torch.arange(n), torch.arange(n)),
        seed=3,
        step=5,
        recipe=recipe,
        loss_weights=LossWeights(),
    )
    return result, decoder.calls


def square_masks(n: int, size: int = 64) -> torch.Tensor:
    gt = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        gt[i, 8 + i : 30 + i, 10 : 40 - i] = True
    return gt


def test_the_schedule_adds_one_click_per_click_pass_and_feeds_back_the_chosen_output():
    recipe = PromptRecipe(num_click_passes=3, num_mask_only_passes=2)
    gt = square_masks(3)
    logits = torch.randn(3, 4, 16, 16)
    iou_pred = torch.tensor([[0.1, 0.9, 0.2, 0.3]]).repeat(3, 1)
    result, calls = scripted_run(recipe, logits=logits, iou_pred=iou_pred, gt=gt)
    assert result.num_passes == len(calls) == 6
    tokens = [c.labels.shape[1] for c in calls]
    assert tokens[0] == 2 and tokens[-1] == 2 + 3  # the first prompt's two tokens, then 3 clicks
    assert all(b - a in (0, 1) for a, b in itertools.pairwise(tokens))
    assert calls[0].mask_input is None
    for previous, call in itertools.pairwise(calls):
        # Fed back: the best multimask output (1, by the IoU head) after a single point, else output 0.
        multimask = ~output_candidates(previous.labels, 4)[:, 0]
        expected = torch.where(multimask[:, None, None, None], logits[:, 1:2], logits[:, :1])
        assert torch.equal(call.mask_input, expected)
    assert set(result.logs) == {"loss", "focal", "dice", "iou_mse", "mIoU_first", "mIoU_last"}


def test_the_draws_follow_seed_step_and_mask_identity_only():
    recipe = PromptRecipe(num_click_passes=2, num_mask_only_passes=1)
    gt = square_masks(4)
    logits, iou_pred = torch.randn(4, 4, 16, 16), torch.rand(4, 4)
    _, first = scripted_run(recipe, logits=logits, iou_pred=iou_pred, gt=gt)
    _, again = scripted_run(recipe, logits=logits, iou_pred=iou_pred, gt=gt)
    _, half = scripted_run(recipe, logits=logits[:2], iou_pred=iou_pred[:2], gt=gt[:2])
    for a, b, h in zip(first, again, half, strict=True):
        assert torch.equal(a.coords, b.coords) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.coords[:2], h.coords) and torch.equal(a.labels[:2], h.labels)


def test_per_pass_backward_sees_every_pass_loss_and_the_loss_is_detached():
    recipe = PromptRecipe(num_click_passes=2, num_mask_only_passes=1)
    gt = square_masks(2)
    logits = torch.randn(2, 4, 16, 16, requires_grad=True)
    iou_pred = torch.rand(2, 4, requires_grad=True)
    seen = []
    decoder = ScriptedDecoder(logits, iou_pred)
    result = simulate_interaction(
        decoder,
        gt,
        valid=torch.ones(2, 64, 64, dtype=torch.bool),
        mask_keys=torch.arange(2),
        seed=0,
        step=0,
        recipe=recipe,
        backward_pass=lambda loss: seen.append(loss.requires_grad),
    )
    assert seen == [True] * result.num_passes
    assert not result.loss.requires_grad


def test_the_official_modules_run_the_same_interaction(tmp_path):
    """The recipe with the official modules' decoder (per image and prompt kind, the official
    MaskDecoder) gives the step SamModule's batched decoder gives: the same draws and losses."""
    oracle = pytest.importorskip("tests.oracle")
    official_bench = pytest.importorskip("bench.official")
    official, ours = oracle.official_and_samtrain("vit_t", 64, tmp_path)
    batch = synthetic_batch(2, 3, 64, seed=1)
    module = SamModule(net=ours, optimizer=functools.partial(torch.optim.AdamW))
    with torch.no_grad():
        loss, logs = module.interactive_loss(batch)
        reference = official_bench.official_interaction(official, batch)
    torch.testing.assert_close(loss, reference.loss, atol=1e-5, rtol=1e-5)
    for name, value in logs.items():
        torch.testing.assert_close(value, reference.logs[name], atol=1e-5, rtol=1e-5, msg=name)
    assert valid_regions(batch["input_size"], 64).all()
