"""Optimizer parameter groups for SAM."""

from __future__ import annotations

import pytest

from samtrain.lightning.optim import sam_param_groups
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
