"""Every SAM variant in the timm style: shapes, finite outputs, gradients to every parameter."""

from __future__ import annotations

import pytest
import torch

from samtrain.models import SAM_VARIANTS, build_sam
from samtrain.models.sam.image_encoder import ENCODER_SPECS

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
