"""Masked autoencoder (MAE, arXiv 2111.06377) on a timm plain ViT, shaped like a SAM encoder.

The encoder is a ``timm`` ``VisionTransformer`` (global attention, class token, patch 16) with
the width, depth and heads of a SAM variant (``ENCODER_SPECS``), so its blocks map one to one
onto the samvit blocks of SAM's image encoder (see ``samtrain.models.mae_transfer``). The
encoder sees only the visible 25% of the patches; a light decoder of timm ``Block``s predicts
the pixels of every patch; the loss is the MSE on the removed patches only, against pixels
normalised per patch (``norm_pix_loss``).

Its state dict keeps timm's layout under ``encoder.`` (``encoder.blocks.N...``,
``encoder.pos_embed`` (1, 1 + L, C), ``encoder.cls_token``, ``encoder.patch_embed.proj``), the
layout of timm's own ``vit_*_patch16_*.mae`` weights.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from samtrain.models.sam.image_encoder import ENCODER_SPECS, PATCH_SIZE


class MaeOutput(NamedTuple):
    """loss: scalar; pred: (N, L, p*p*3) per-patch pixels; mask: (N, L) float, 1 = removed."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor


def sincos_pos_embed(grid: int, dim: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (1, [1 +] grid*grid, dim); zeros for the class token."""
    pos = build_sincos2d_pos_embed([grid, grid], dim=dim)
    if cls_token:
        pos = torch.cat([pos.new_zeros(1, dim), pos], dim=0)
    return pos.unsqueeze(0)


def patchify(imgs: torch.Tensor, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """(N, 3, H, W) -> (N, L, p*p*3), patches in raster order, pixels as (p, p, 3)."""
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {(h, w)} is not a multiple of the patch size {p}")
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(
    x: torch.Tensor, patch_size: int = PATCH_SIZE, grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """(N, L, p*p*3) -> (N, 3, H, W); the inverse of ``patchify`` (square grid unless given)."""
    n, num_patches, dim = x.shape
    p = patch_size
    c = dim // (p * p)
    if grid is None:
        side = round(num_patches**0.5)
        if side * side != num_patches:
            raise ValueError(f"{num_patches} patches do not form a square grid; pass grid=")
        grid = (side, side)
    gh, gw = grid
    x = x.reshape(n, gh, gw, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, gh * p, gw * p)


def random_masking(
    n: int, num_patches: int, mask_ratio: float, *, device=None, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise.

    Returns ids_keep (N, K) with K = round(L * (1 - mask_ratio)) (at least 1), ids_restore (N, L)
    (gathering [kept, removed] tokens with it restores raster order) and mask (N, L) float with
    1 = removed, in raster order.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    num_keep = max(1, round(num_patches * (1 - mask_ratio)))
    gen_device = generator.device if generator is not None else device
    noise = torch.rand(n, num_patches, generator=generator, device=gen_device).to(device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_keep]
    mask = torch.ones(n, num_patches, device=device)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, ids_restore, mask


class MaskedAutoencoder(nn.Module):
    """MAE with a timm ViT encoder (``self.encoder``) and a timm-Block decoder.

    forward(imgs (N, 3, S, S) normalised) -> MaeOutput(loss, pred (N, L, p*p*3), mask (N, L)).
    """

    def __init__(
        self,
        *,
        image_size: int = 224,
        patch_size: int = PATCH_SIZE,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size must be a multiple of {patch_size}, got {image_size}")
        if decoder_dim % decoder_num_heads:
            raise ValueError(f"decoder_num_heads={decoder_num_heads} must divide decoder_dim={decoder_dim}")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size = patch_size
        self.image_size = image_size
        self.grid = image_size // patch_size
        self.num_patches = self.grid**2
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss

        # The encoder: a plain timm ViT; only its patch embedding, tokens, blocks and norm are used.
        self.encoder = VisionTransformer(
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            norm_layer=norm_layer,
            num_classes=0,
            global_pool="token",
            drop_path_rate=drop_path_rate,
        )
        # Fixed sine-cosine position embeddings (MAE); kept in the state dict for the transfer.
        self.encoder.pos_embed.requires_grad_(False)

        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, 1 + self.num_patches, decoder_dim), requires_grad=False
        )
        self.decoder_blocks = nn.Sequential(
            *[
                Block(
                    decoder_dim, decoder_num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer
                )
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size * patch_size * 3)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE's initialisation: sin-cos positions, xavier linears and patch projection, N(0, .02) tokens."""
        with torch.no_grad():
            self.encoder.pos_embed.copy_(sincos_pos_embed(self.grid, self.encoder.embed_dim))
            self.decoder_pos_embed.copy_(sincos_pos_embed(self.grid, self.decoder_pos_embed.shape[-1]))
            w = self.encoder.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.normal_(self.encoder.cls_token, std=0.02)
            nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ pieces

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> latent (N, 1 + K, C) (class token first), mask (N, L), ids_restore (N, L)."""
        enc = self.encoder
        x = enc.patch_embed(imgs)  # (N, L, C)
        x = x + enc.pos_embed[:, 1:]
        ids_keep, ids_restore, mask = random_masking(
            x.shape[0], x.shape[1], mask_ratio, device=x.device, generator=generator
        )
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = enc.blocks(x)
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (N, 1 + K, C) -> pixel predictions (N, L, p*p*3) for every patch in raster order."""
        x = self.decoder_embed(latent)
        n, num_tokens, dim = x.shape
        masked = self.mask_token.expand(n, ids_restore.shape[1] + 1 - num_tokens, -1)
        patches = torch.cat([x[:, 1:], masked], dim=1)
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, dim))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, 1:]

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """The reconstruction target (N, L, p*p*3): patch pixels, normalised per patch with norm_pix_loss."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the removed patches only (mask 1)."""
        per_patch = ((pred - self.target(imgs)) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum().clamp(min=1)

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> MaeOutput:
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        return MaeOutput(self.loss(imgs, pred, mask), pred, mask)

    @torch.no_grad()
    def reconstruct(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 3, S, S) in the input's normalisation: (masked input, reconstruction with the
        visible patches pasted back). Normalised-pixel predictions get each patch's mean/std back."""
        patches = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = patches.mean(dim=-1, keepdim=True)
            std = (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            pred = pred * std + mean
        m = mask[..., None]
        masked = self.unpatchify(patches * (1 - m))
        recon = self.unpatchify(patches * (1 - m) + pred * m)
        return masked, recon


def build_mae(
    variant: str = "vit_b",
    image_size: int = 224,
    decoder_depth: int = 8,
    decoder_dim: int = 512,
    mask_ratio: float = 0.75,
    norm_pix_loss: bool = True,
    *,
    decoder_num_heads: int = 16,
    drop_path_rate: float = 0.0,
) -> MaskedAutoencoder:
    """An MAE whose encoder has the width, depth and heads of SAM variant ``variant`` (patch 16)."""
    if variant not in ENCODER_SPECS:
        raise ValueError(f"unknown SAM variant {variant!r}; choose one of {sorted(ENCODER_SPECS)}")
    spec = ENCODER_SPECS[variant]
    return MaskedAutoencoder(
        image_size=image_size,
        patch_size=PATCH_SIZE,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        decoder_dim=decoder_dim,
        decoder_depth=decoder_depth,
        decoder_num_heads=decoder_num_heads,
        mask_ratio=mask_ratio,
        norm_pix_loss=norm_pix_loss,
        drop_path_rate=drop_path_rate,
    )
