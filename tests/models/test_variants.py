"""Every SAM variant in the timm style: shapes, finite outputs, gradients to every parameter; vit_b,
vit_l and vit_h against the official registry (keys, shapes, parameter counts), vit_b's encoder
against the official one on shared weights."""

from __future__ import annotations

import pytest
import torch

from samtrain.models import SAM_VARIANTS, build_sam
from samtrain.models.checkpoint import official_to_samtrain, samtrain_to_official
from samtrain.models.sam.image_encoder import ENCODER_SPECS
from tests.oracle import build_official_sam, segment_anything

IMAGE_SIZE = 64


@pytest.mark.parametrize("variant", SAM_VARIANTS)
def test_variant_forward_backward(variant):
    torch.manual_seed(0)
    model = build_sam(variant, image_size=IMAGE_SIZE)
    spec = ENCODER_SPECS[variant]
    assert model.image_encoder.pos_embed.shape == (1, IMAGE_SIZE // 16, IMAGE_SIZE // 16, spec.embed_dim)
    assert len(model.image_encoder.blocks) == spec.depth

    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    embeddings = model.image_encoder(images)
    assert embeddings.shape == (2, 256, IMAGE_SIZE // 16, IMAGE_SIZE // 16)

    # Point-first and box-first prompts of both images in one decoder pass, with a mask prompt.
    coords = torch.tensor(
        [[[10.0, 12.0], [0.0, 0.0]], [[5.0, 6.0], [40.0, 50.0]], [[30.0, 20.0], [0.0, 0.0]]]
    )
    labels = torch.tensor([[1, -1], [2, 3], [0, -1]])
    mask_inputs = torch.randn(3, 1, IMAGE_SIZE // 4, IMAGE_SIZE // 4)
    logits, iou = model.decode_masks(
        embeddings, points=(coords, labels), mask_inputs=mask_inputs, image_indices=torch.tensor([0, 1, 1])
    )
    assert logits.shape == (3, 4, IMAGE_SIZE // 4, IMAGE_SIZE // 4)
    assert iou.shape == (3, 4)
    assert torch.isfinite(logits).all() and torch.isfinite(iou).all()

    # The no-mask embedding takes part through a first pass without a mask prompt.
    first_logits, first_iou = model.decode_masks(
        embeddings, points=(coords, labels), image_indices=torch.tensor([0, 1, 1])
    )
    (logits.mean() + iou.mean() + first_logits.mean() + first_iou.mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None)]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    nan_grad = [
        n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    assert not nan_grad


# -- against the official registry -------------------------------------------------------------

FULL_VARIANTS = ("vit_b", "vit_l", "vit_h")


@pytest.mark.parametrize("variant", FULL_VARIANTS)
def test_variant_has_the_official_parameters(variant):
    """At 1024 px, the official ``sam_model_registry[variant]`` and ``build_sam(variant)`` (both on
    the meta device: nothing is allocated) hold the same keys with the same shapes and dtypes, so the
    same parameter count; the relative-position tables' shapes fix each block's window or global
    attention, so this also checks the depth, width, heads and global-attention indexes."""
    registry = segment_anything.sam_model_registry
    with torch.device("meta"):
        official = registry[variant](checkpoint=None)
        ours = build_sam(variant, image_size=1024)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in official.state_dict().items()}
    got = {k: (tuple(v.shape), v.dtype) for k, v in samtrain_to_official(ours.state_dict()).items()}
    assert got == expected
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in official.parameters())
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == count


@torch.no_grad()
def random_official_encoder(variant: str, image_size: int) -> torch.nn.Module:
    """The official image encoder of ``variant`` with random weights, allocated without its
    (slow) initialisation: built on the meta device, then filled from a seeded generator."""
    with torch.device("meta"):
        encoder = build_official_sam(variant, image_size).image_encoder
    encoder = encoder.to_empty(device="cpu")
    assert not list(encoder.buffers())  # nothing left unfilled
    gen = torch.Generator().manual_seed(0)
    for name, param in encoder.named_parameters():
        scale = 0.5 if ("pos_embed" in name or "rel_pos" in name) else 0.05
        centre = 1.0 if (param.ndim == 1 and name.endswith("weight")) else 0.0  # norm scales near 1
        param.copy_(centre + scale * torch.randn(param.shape, generator=gen))
    return encoder.eval()


def test_vit_b_encoder_matches_the_official_one():
    """vit_b at 64 px, the official weights shared: samtrain's encoder gives the official
    embeddings to 1e-5 (the full depth and width; only the image is small)."""
    official = random_official_encoder("vit_b", IMAGE_SIZE)
    state = official_to_samtrain({f"image_encoder.{k}": v for k, v in official.state_dict().items()})
    with torch.device("meta"):
        ours = build_sam("vit_b", image_size=IMAGE_SIZE).image_encoder
    ours.load_state_dict({k.removeprefix("image_encoder."): v for k, v in state.items()}, assign=True)
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = official(images), ours.eval()(images)
    assert expected.shape == (2, 256, IMAGE_SIZE // 16, IMAGE_SIZE // 16)
    assert expected.abs().mean() > 0.1  # the neck's layer norm keeps the output at unit scale
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
