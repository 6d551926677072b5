"""The real SAM 2.1 variants against the official configs, on the meta device (nothing allocated):
the same image keys and shapes, the same parameter counts; and the image sizes Hiera allows."""

from __future__ import annotations

import pytest
import torch
from hydra import compose
from hydra.utils import instantiate

from samtrain.models import SAM_VARIANTS, build_sam
from samtrain.models.sam2.build import SAM2_VARIANTS
from samtrain.models.sam2.checkpoint import official_to_samtrain_sam2
from tests.models.sam2.oracle import CONFIGS, sam2_hydra

REAL = ("sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l")


def official_on_meta(variant: str, monkeypatch) -> torch.nn.Module:
    """The official 1024 px model on the meta device; its Hiera reads drop-path rates with
    ``.item()``, so their linspace runs on the CPU."""
    linspace = torch.linspace
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))
    with sam2_hydra():
        cfg = compose(config_name=CONFIGS[variant])
        with torch.device("meta"):
            return instantiate(cfg.model, _recursive_=True)


@pytest.mark.parametrize("variant", REAL)
def test_variant_matches_the_official_config(variant, monkeypatch):
    official = official_on_meta(variant, monkeypatch)
    with torch.device("meta"):
        ours = build_sam(variant, image_size=1024)
    assert ours.variant == variant and ours.image_size == 1024
    image, video = official_to_samtrain_sam2(official.state_dict())
    mine = ours.state_dict()
    assert sorted(image) == sorted(mine)
    assert {k: tuple(v.shape) for k, v in image.items()} == {k: tuple(v.shape) for k, v in mine.items()}
    video_params = sum(p.numel() for n, p in official.named_parameters() if n in video)
    assert (
        sum(p.numel() for p in ours.parameters())
        == sum(p.numel() for p in official.parameters()) - video_params
    )
    assert video and all(
        k.startswith(("memory_", "maskmem", "obj_ptr", "mask_downsample", "no_")) for k in video
    )


def test_variants_are_listed():
    assert set(REAL) < set(SAM2_VARIANTS) and not set(SAM2_VARIANTS) & set(SAM_VARIANTS)


@pytest.mark.parametrize("image_size", [96, 160])
def test_other_image_sizes_build_and_run(image_size):
    with torch.device("meta"):
        model = build_sam("sam2.1_hiera_t", image_size=image_size)
    assert model.prompt_encoder.image_embedding_size == (image_size // 16, image_size // 16)
    nano = build_sam("sam2.1_hiera_n", image_size=image_size).eval()
    size = nano.image_size
    with torch.no_grad():
        features = nano.image_encoder(torch.zeros(1, 3, size, size))
        masks, iou = nano.decode_masks(features, points=(torch.tensor([[[5.0, 5.0]]]), torch.tensor([[1]])))
    assert features.image_embed.shape == (1, 256, size // 16, size // 16)
    assert features.high_res_s0.shape == (1, 32, size // 4, size // 4)
    assert masks.shape == (1, 4, size // 4, size // 4) and iou.shape == (1, 4)


@pytest.mark.parametrize("image_size", [100, 1000, 48])
def test_image_sizes_hiera_cannot_take_are_refused(image_size):
    with pytest.raises(ValueError, match="multiple of 32"):
        build_sam("sam2.1_hiera_t", image_size=image_size)


def test_sam_only_options_are_refused():
    with pytest.raises(ValueError, match="encoder_init"):
        build_sam("sam2.1_hiera_n", image_size=64, encoder_init="mae.safetensors")


def test_forward_backward_reaches_every_parameter():
    """Point-first and box prompts of two images in one pass, with and without a mask prompt: every
    parameter gets a finite gradient (the object-score head through the object scores)."""
    torch.manual_seed(0)
    model = build_sam("sam2.1_hiera_n", image_size=64)
    features = model.image_encoder(torch.randn(2, 3, 64, 64))
    coords = torch.tensor([[[10.0, 12.0]], [[5.0, 6.0]], [[30.0, 20.0]]])
    labels = torch.tensor([[1], [0], [1]])
    boxes = torch.tensor([[4.0, 4.0, 40.0, 50.0]] * 3)
    indices = torch.tensor([0, 1, 1])
    image = model.prepare_image(features)
    with_mask = model.decode_masks(
        image,
        points=(coords, labels),
        boxes=boxes,
        mask_inputs=torch.randn(3, 1, 16, 16),
        image_indices=indices,
        return_object_scores=True,
    )
    first = model.decode_masks(
        image, points=(coords, labels), image_indices=indices, return_object_scores=True
    )
    sum(t.mean() for t in (*with_mask, *first)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad


def test_encoder_checkpointing_gives_the_same_gradients():
    from samtrain.models.sam.image_encoder import set_encoder_checkpointing

    torch.manual_seed(0)
    model = build_sam("sam2.1_hiera_n", image_size=64)
    images = torch.randn(1, 3, 64, 64)

    def trunk_grads():
        model.zero_grad()
        sum(t.square().mean() for t in model.image_encoder(images).tensors()).backward()
        return [p.grad.clone() for p in model.image_encoder.trunk.parameters()]

    plain = trunk_grads()
    set_encoder_checkpointing(model.image_encoder)
    assert model.image_encoder.trunk.grad_checkpointing
    for a, b in zip(trunk_grads(), plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
