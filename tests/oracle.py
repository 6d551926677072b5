"""The official segment-anything package as a test oracle: models built at small sizes."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from samtrain.models.sam.image_encoder import ENCODER_SPECS

segment_anything = pytest.importorskip("segment_anything")
from segment_anything.modeling import (  # noqa: E402
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)


def build_official_sam(variant: str, image_size: int) -> Sam:
    """The official model with samtrain's variant spec, at any image size."""
    spec = ENCODER_SPECS[variant]
    grid = image_size // 16
    encoder = ImageEncoderViT(
        img_size=image_size,
        patch_size=16,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=4,
        out_chans=256,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        global_attn_indexes=spec.global_attn_indexes,
        window_size=spec.window_size,
    )
    return Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=256,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    ).eval()


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter and buffer so that none sits at its trivial init (zero position
    embeddings and relative-position tables, unit norms) and all of them matter."""
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point() or "pixel_" in name:
            continue
        scale = 0.5 if ("pos_embed" in name or "rel_pos" in name) else 0.05
        tensor.add_(torch.randn(tensor.shape, generator=gen) * scale)
    return model


def official_and_samtrain(variant: str, image_size: int, directory: Path, seed: int = 0):
    """An official model with randomised weights and a samtrain model loaded from its checkpoint."""
    from samtrain.models import build_sam

    torch.manual_seed(seed)
    official = randomise(build_official_sam(variant, image_size), seed=seed)
    path = directory / "official.pth"
    torch.save(official.state_dict(), path)
    return official, build_sam(variant, image_size=image_size, checkpoint=path).eval()
