"""The decoder's fast paths against the plain computation they replace."""

from __future__ import annotations

import torch
from torch import nn

from samtrain.models import build_sam
from samtrain.models.sam.prompt_encoder import MaskDownscaling


def grads(outputs: torch.Tensor, weights: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad((outputs * weights).sum(), inputs))


def test_channels_last_mask_downscaling_equals_the_convolutions():
    torch.manual_seed(0)
    downscaling = MaskDownscaling(embed_dim=32, mask_in_chans=16, activation=nn.GELU)
    for p in downscaling.parameters():
        nn.init.normal_(p, std=0.5)
    masks = torch.randn(3, 1, 32, 32, requires_grad=True)
    fast, plain = downscaling(masks), nn.Sequential.forward(downscaling, masks)
    assert fast.shape == (3, 32, 8, 8) and fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(plain)
    inputs = [masks, *downscaling.parameters()]
    for a, b in zip(grads(fast, weights, inputs), grads(plain, weights, inputs), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_one_prepared_image_serves_many_passes():
    """Passes sharing one prepare_image (a training step) = passes each preparing their own."""
    torch.manual_seed(0)
    net = build_sam("vit_t", image_size=64)
    embeddings = torch.randn(2, 256, 4, 4, requires_grad=True)
    image_indices = torch.tensor([0, 1, 1])
    coords = torch.rand(3, 2, 2) * 64
    labels = torch.tensor([[1, -1], [2, 3], [1, 0]])
    mask_inputs = torch.randn(3, 1, 16, 16)
    params = [*net.prompt_encoder.parameters(), *net.mask_decoder.parameters()]

    def two_passes(shared: bool) -> list[torch.Tensor]:
        image = net.prepare_image(embeddings) if shared else embeddings
        outputs = [
            net.decode_masks(image, points=(coords, labels), image_indices=image_indices, pad_points=False),
            net.decode_masks(
                image, points=(coords, labels), mask_inputs=mask_inputs, image_indices=image_indices
            ),
        ]
        loss = sum(logits.square().mean() + iou.sum() for logits, iou in outputs)
        return [*(t for out in outputs for t in out), *torch.autograd.grad(loss, [embeddings, *params])]

    for a, b in zip(two_passes(shared=True), two_passes(shared=False), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
