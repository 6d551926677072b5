"""SAM 2.1's finetune parameter groups (the trunk's own lr and layer decay) against sam2's
``layer_decay_param_modifier`` on Hiera's parameter names."""

import pytest
import timm
import torch
from torch import nn

from samtrain.lightning.optim import sam_param_groups

BASE_LR, VISION_LR, DECAY = 5.0e-6, 3.0e-6, 0.9  # sam2.1_hiera_b+_MOSE_finetune.yaml


class Encoder(nn.Module):
    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.neck = nn.Linear(4, 4)


class TinySam2(nn.Module):
    """The parameter layout the SAM 2 model has: image_encoder.trunk (Hiera), image_encoder.neck,
    the decoder side."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.image_encoder = Encoder(trunk)
        self.mask_decoder = nn.Linear(4, 4)


def timm_trunk() -> nn.Module:
    return timm.create_model("sam2_hiera_tiny", pretrained=False, num_classes=0)


def official_lrs(model: nn.Module) -> dict[str, float]:
    """Every parameter's lr as sam2's trainer assigns it (base lr and vision lr, then layer decay)."""
    optimizer = pytest.importorskip("training.optimizer")
    names = [n for n, _ in model.named_parameters()]
    vision = {n for n in names if n.startswith("image_encoder.")}
    configs = [
        [
            {"option": "lr", "scheduler": lambda where: BASE_LR, "parameter_names": set(names) - vision},
            {"option": "lr", "scheduler": lambda where: VISION_LR, "parameter_names": vision},
        ]
    ]
    decayed = optimizer.layer_decay_param_modifier(
        configs,
        model,
        DECAY,
        apply_to="image_encoder.trunk",
        overrides=[{"pattern": "*pos_embed*", "value": 1.0}],
    )
    return {n: cfg["scheduler"](0.0) for cfg in decayed[0] for n in cfg["parameter_names"]}


def samtrain_lrs(model: nn.Module, **options) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = sam_param_groups(model, lr=BASE_LR, weight_decay=0.1, **options)
    lrs = {names[id(p)]: g["lr"] for g in groups for p in g["params"]}
    assert len(lrs) == sum(len(g["params"]) for g in groups)  # each parameter in one group
    return lrs


def test_trunk_lr_and_layer_decay_equal_the_official_finetune():
    pytest.importorskip("sam2")
    from sam2.modeling.backbones.hieradet import Hiera

    official_trunk = Hiera(
        embed_dim=96,
        num_heads=1,
        stages=[1, 2, 7, 2],
        global_att_blocks=[5, 7, 9],
        window_pos_embed_bkg_spatial_size=[7, 7],
    )
    # timm names the MLP layers fc1 / fc2 where the official trunk has layers.0 / layers.1
    expected = {
        n.replace("mlp.layers.0", "mlp.fc1").replace("mlp.layers.1", "mlp.fc2"): lr
        for n, lr in official_lrs(TinySam2(official_trunk)).items()
    }
    ours = samtrain_lrs(
        TinySam2(timm_trunk()),
        layer_decay=DECAY,
        encoder_lr=VISION_LR,
        layer_decay_module="image_encoder.trunk",
        layer_decay_overrides={"*pos_embed*": 1.0},
    )
    # otherwise timm's trunk names are the official ones; timm adds only its (unused) head norm
    assert set(ours) - set(expected) == {
        "image_encoder.trunk.head.norm.weight",
        "image_encoder.trunk.head.norm.bias",
    }
    assert set(expected) <= set(ours)
    for name, lr in expected.items():
        assert ours[name] == pytest.approx(lr, rel=1e-12), name
    assert ours["image_encoder.trunk.blocks.0.attn.qkv.weight"] == pytest.approx(VISION_LR * DECAY**12)
    assert ours["image_encoder.trunk.pos_embed"] == pytest.approx(VISION_LR)
    assert ours["image_encoder.neck.weight"] == pytest.approx(VISION_LR)
    assert ours["mask_decoder.weight"] == pytest.approx(BASE_LR)


def test_encoder_lr_without_layer_decay_and_frozen_trunk():
    model = TinySam2(timm_trunk())
    lrs = samtrain_lrs(model, encoder_lr=VISION_LR)
    assert {lr for n, lr in lrs.items() if n.startswith("image_encoder.")} == {VISION_LR}
    assert lrs["mask_decoder.weight"] == BASE_LR
    model.image_encoder.trunk.requires_grad_(False)
    lrs = samtrain_lrs(
        model, encoder_lr=VISION_LR, layer_decay=DECAY, layer_decay_module="image_encoder.trunk"
    )
    assert not any(n.startswith("image_encoder.trunk.") for n in lrs)
    assert lrs["image_encoder.neck.weight"] == VISION_LR


def test_unknown_layer_decay_module_is_a_clear_error():
    with pytest.raises(ValueError, match=r"layer_decay_module 'image_encoder\.trunk'"):
        sam_param_groups(nn.Module(), lr=1.0, weight_decay=0.0, layer_decay_module="image_encoder.trunk")


def test_weight_decay_split_is_kept_inside_the_decayed_trunk():
    groups = sam_param_groups(
        TinySam2(timm_trunk()),
        lr=1.0,
        weight_decay=0.1,
        layer_decay=DECAY,
        layer_decay_module="image_encoder.trunk",
        layer_decay_overrides={"*pos_embed*": 1.0},
    )
    for group in groups:
        one_d = [p.ndim <= 1 for p in group["params"]]
        if group["weight_decay"] > 0:
            assert not any(one_d)
    assert torch.is_tensor(groups[0]["params"][0])
