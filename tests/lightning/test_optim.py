"""Optimizer parameter groups for SAM, and the learning-rate schedules."""

from __future__ import annotations

import pytest
import torch

from samtrain.lightning.optim import (
    constant_schedule,
    cosine_schedule,
    sam_param_groups,
    step_schedule,
    warmup_length,
)
from samtrain.models import build_sam


def ids(params) -> set[int]:
    return {id(p) for p in params}


def test_decay_groups_cover_the_trainable_parameters_once():
    model = build_sam("vit_t", image_size=64)
    for p in model.image_encoder.parameters():
        p.requires_grad_(False)
    groups = sam_param_groups(model, lr=1e-3, weight_decay=0.1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(groups) == 2 and sum(len(g["params"]) for g in groups) == len(trainable)
    assert set().union(*(ids(g["params"]) for g in groups)) == ids(trainable)
    by_decay = {g["weight_decay"]: g for g in groups}
    assert all(p.ndim > 1 for p in by_decay[0.1]["params"])
    assert ids(by_decay[0.0]["params"]) >= ids(model.mask_decoder.iou_token.parameters()) | {
        id(p) for p in trainable if p.ndim == 1
    }
    assert all(g["lr"] == 1e-3 for g in groups)


def test_layer_decay_scales_the_encoder_blocks_only():
    model = build_sam("vit_t", image_size=64)
    groups = sam_param_groups(model, lr=1.0, weight_decay=0.1, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(lr_of) == sum(1 for _ in model.parameters())
    blocks = model.image_encoder.blocks
    first, last = blocks[0].attn.qkv.weight, blocks[-1].attn.qkv.weight
    assert lr_of[id(first)] < lr_of[id(last)] < 1.0
    assert lr_of[id(last)] == pytest.approx(2 * lr_of[id(blocks[-2].attn.qkv.weight)])
    assert all(lr_of[id(p)] == 1.0 for p in model.mask_decoder.parameters())


def factor_of(schedule):
    """The lr factor of a LambdaLR schedule at each optimizer step: step -> float."""
    return schedule.lr_lambdas[0]


def sgd():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_step_schedule_in_iterations_is_the_sam_papers():
    """Appendix A: linear warmup for 250 iterations, then /10 at 60k and again at 86,666 of 90k."""
    f = factor_of(
        step_schedule(sgd(), total_steps=90_000, milestones=[60_000, 86_666], milestone_unit="step")
    )
    assert f(0) == pytest.approx(1 / 250) and f(124) == pytest.approx(0.5) and f(249) == 1.0
    assert f(250) == 1.0 and f(59_999) == 1.0
    assert f(60_000) == pytest.approx(0.1) and f(86_665) == pytest.approx(0.1)
    assert f(86_666) == pytest.approx(0.01) and f(89_999) == pytest.approx(0.01)


def test_step_schedule_fractions_place_the_milestones_on_the_run():
    fractions = factor_of(step_schedule(sgd(), total_steps=90_000, milestones=[2 / 3, 86_666 / 90_000]))
    steps = factor_of(
        step_schedule(sgd(), total_steps=90_000, milestones=[60_000, 86_666], milestone_unit="step")
    )
    for step in (0, 249, 59_999, 60_000, 86_665, 86_666):
        assert fractions(step) == steps(step)
    short = factor_of(step_schedule(sgd(), total_steps=300, milestones=[0.5], warmup_steps=10))
    assert short(149) == 1.0 and short(150) == pytest.approx(0.1)


def test_cosine_and_constant_schedules():
    cosine = factor_of(cosine_schedule(sgd(), total_steps=1_100, warmup_steps=100, min_ratio=0.1))
    assert cosine(99) == 1.0 and cosine(100) == pytest.approx(1.0)
    assert cosine(600) == pytest.approx(0.55) and cosine(1_100) == pytest.approx(0.1)
    assert cosine(300) > cosine(301)
    constant = factor_of(constant_schedule(sgd(), total_steps=1_000, warmup_steps=4))
    assert [constant(s) for s in (0, 3, 4, 999)] == [0.25, 1.0, 1.0, 1.0]


def test_warmup_by_fraction_and_capped_at_a_tenth_of_the_run():
    assert warmup_length(1_000, 250, None) == 100
    assert warmup_length(1_000, None, 0.05) == 50
    assert warmup_length(90_000, 250, None) == 250
    assert warmup_length(5, 250, None) == 1
    f = factor_of(cosine_schedule(sgd(), total_steps=1_000, warmup_steps=None, warmup_fraction=0.05))
    assert f(49) == 1.0 and f(48) == pytest.approx(49 / 50)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup_steps": 10, "warmup_fraction": 0.1}, "not both or neither"),
        ({"warmup_steps": None}, "not both or neither"),
        ({"milestone_unit": "epoch"}, "milestone_unit must be"),
        ({"milestones": [0.5, 1.5]}, r"fractions of the run must be in \(0, 1\]"),
        ({"milestones": [100.5], "milestone_unit": "step"}, "positive integers"),
    ],
)
def test_schedules_refuse_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        step_schedule(sgd(), total_steps=1_000, **kwargs)
