"""MAE model (masking, loss, patchify) and its transfer into SAM's image encoder."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from samtrain.commands.pretrain_mae import save_mae_encoder
from samtrain.models import build_sam, load_sam_checkpoint
from samtrain.models.mae import build_mae, patchify, random_masking, unpatchify
from samtrain.models.mae_transfer import init_encoder_from_mae, mae_to_sam_encoder, main


def tiny_mae(image_size: int = 64, **kwargs):
    kwargs = {"decoder_depth": 1, "decoder_dim": 32, **kwargs}
    return build_mae("vit_t", image_size=image_size, decoder_num_heads=4, **kwargs)


def test_patchify_unpatchify_round_trip():
    imgs = torch.randn(2, 3, 48, 64)
    patches = patchify(imgs, 16)
    assert patches.shape == (2, 12, 16 * 16 * 3)
    assert torch.equal(patches[0, 1], imgs[0, :, :16, 16:32].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(patches, 16, grid=(3, 4)), imgs)
    square = torch.randn(1, 3, 32, 32)
    assert torch.equal(unpatchify(patchify(square)), square)


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.6])
def test_masking_keeps_exact_count_and_unshuffles(ratio):
    n, num_patches, dim = 4, 16, 5
    g = torch.Generator().manual_seed(0)
    ids_keep, ids_restore, mask = random_masking(n, num_patches, ratio, generator=g)
    keep = round(num_patches * (1 - ratio))
    assert ids_keep.shape == (n, keep)
    assert torch.equal(mask.sum(1), torch.full((n,), float(num_patches - keep)))
    tokens = torch.randn(n, num_patches, dim)
    for i in range(n):  # the kept ids are exactly the visible (mask 0) patches
        assert set(ids_keep[i].tolist()) == set(torch.nonzero(mask[i] == 0).flatten().tolist())
    # [kept, removed] gathered by ids_restore gives raster order back
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    shuffled = torch.gather(tokens, 1, ids_shuffle[..., None].expand(-1, -1, dim))
    restored = torch.gather(shuffled, 1, ids_restore[..., None].expand(-1, -1, dim))
    assert torch.equal(restored, tokens)
    assert not torch.equal(ids_keep[0], ids_keep[1])  # per-sample masks
    again = random_masking(n, num_patches, ratio, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], ids_keep)


def test_encoder_sees_visible_tokens_only_and_outputs():
    mae = tiny_mae()
    imgs = torch.randn(3, 3, 64, 64)
    latent, _, _ = mae.forward_encoder(imgs, 0.75)
    assert latent.shape == (3, 1 + 4, 192)
    loss, pred, mask = mae(imgs, generator=torch.Generator().manual_seed(1))
    assert pred.shape == (3, 16, 16 * 16 * 3) and mask.shape == (3, 16)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert mask.sum(1).tolist() == [12.0, 12.0, 12.0]


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_ignores_visible_patches(norm_pix):
    mae = tiny_mae(norm_pix_loss=norm_pix)
    imgs = torch.randn(2, 3, 64, 64)
    _, pred, mask = mae(imgs, generator=torch.Generator().manual_seed(2))
    loss = mae.loss(imgs, pred, mask)
    visible = (mask == 0)[..., None]
    changed = torch.where(visible, pred + 100.0, pred)
    assert torch.allclose(mae.loss(imgs, changed, mask), loss)
    masked_changed = torch.where(~visible, pred + 1.0, pred)
    assert not torch.allclose(mae.loss(imgs, masked_changed, mask), loss)
    # a perfect prediction of the removed patches costs nothing
    assert mae.loss(imgs, mae.target(imgs), mask).item() == pytest.approx(0.0, abs=1e-10)
    if norm_pix:
        target = mae.target(imgs)
        assert torch.allclose(target.mean(-1), torch.zeros(2, 16), atol=1e-5)


def test_mae_trains_only_visible_encoder_inputs():
    """Gradients reach every trainable tensor except nothing; the fixed sin-cos positions stay fixed."""
    mae = tiny_mae()
    mae(torch.randn(2, 3, 64, 64)).loss.backward()
    assert not mae.encoder.pos_embed.requires_grad and not mae.decoder_pos_embed.requires_grad
    assert mae.encoder.blocks[0].attn.qkv.weight.grad is not None
    assert mae.mask_token.grad is not None and mae.encoder.cls_token.grad is not None


def _check_transfer(sam, source: dict, before: dict, report):
    enc = sam.image_encoder.state_dict()
    block_keys = [k for k in enc if k.startswith("blocks.")]
    for key in block_keys:
        if ".rel_pos_" in key:
            assert torch.count_nonzero(enc[key]) == 0, key
            assert key in report.zeroed
        else:
            assert torch.equal(enc[key], source[key]), key
            assert key in report.mapped
    assert torch.equal(enc["patch_embed.proj.weight"], source["patch_embed.proj.weight"])
    assert report.resampled == ["pos_embed"]
    for key in (k for k in enc if k.startswith("neck.")):
        assert torch.equal(enc[key], before[key]), key
        assert key in report.fresh
    assert "cls_token" in report.ignored


def _train_step(sam):
    images = torch.randn(2, 3, 64, 64)
    opt = torch.optim.SGD(sam.image_encoder.parameters(), lr=0.1)
    out = sam.image_encoder(images)
    assert out.shape == (2, 256, 4, 4)
    out.square().mean().backward()
    assert all(p.grad is not None for p in sam.image_encoder.parameters())
    before = sam.image_encoder.blocks[0].attn.qkv.weight.detach().clone()
    opt.step()
    assert not torch.equal(sam.image_encoder.blocks[0].attn.qkv.weight, before)


def test_transfer_from_samtrain_mae(tmp_path):
    torch.manual_seed(0)
    mae = tiny_mae(image_size=32)  # a 2x2 grid, resampled to SAM's 4x4
    path = save_mae_encoder(mae, tmp_path / "mae_encoder.safetensors")
    sam = build_sam("vit_t", image_size=64)
    before = {k: v.clone() for k, v in sam.image_encoder.state_dict().items()}
    report = init_encoder_from_mae(sam, path)
    _check_transfer(sam, load_file(str(path)), before, report)
    assert sam.image_encoder.pos_embed.shape == (1, 4, 4, 192)
    _train_step(sam)


def test_build_sam_encoder_init(tmp_path):
    """model.net.encoder_init=path: the same transfer through build_sam."""
    torch.manual_seed(0)
    path = save_mae_encoder(tiny_mae(image_size=64), tmp_path / "mae_encoder.safetensors")
    direct = build_sam("vit_t", image_size=64)
    init_encoder_from_mae(direct, path)
    built = build_sam("vit_t", image_size=64, encoder_init=path)
    for name, value in direct.image_encoder.blocks.state_dict().items():
        torch.testing.assert_close(built.image_encoder.blocks.state_dict()[name], value, atol=0, rtol=0)


def test_transfer_from_timm_mae_layout(tmp_path):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=48, patch_size=16, embed_dim=192, depth=4, num_heads=3, num_classes=0)
    state = vit.state_dict()
    assert state["pos_embed"].shape == (1, 1 + 9, 192)
    path = tmp_path / "vit_t_patch16.mae.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)
    sam = build_sam("vit_t", image_size=64)
    before = {k: v.clone() for k, v in sam.image_encoder.state_dict().items()}
    report = init_encoder_from_mae(sam, path)
    _check_transfer(sam, state, before, report)
    assert "norm.weight" in report.ignored
    _train_step(sam)


def test_transfer_same_grid_is_exact():
    mae = tiny_mae(image_size=64)
    sam = build_sam("vit_t", image_size=64)
    state, _ = mae_to_sam_encoder({f"net.{k}": v for k, v in mae.state_dict().items()}, sam)
    assert torch.allclose(state["pos_embed"].reshape(1, 16, 192), mae.encoder.pos_embed[:, 1:], atol=1e-5)


def test_transfer_rejects_another_variant():
    vit_b_like = VisionTransformer(
        img_size=32, patch_size=16, embed_dim=64, depth=4, num_heads=2, num_classes=0
    )
    with pytest.raises(ValueError, match="do not fit"):
        mae_to_sam_encoder(vit_b_like.state_dict(), build_sam("vit_t", image_size=64))
    deeper = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=2, num_heads=3, num_classes=0)
    with pytest.raises(ValueError, match="blocks"):
        mae_to_sam_encoder(deeper.state_dict(), build_sam("vit_t", image_size=64))
    with pytest.raises(ValueError, match="no ViT encoder blocks"):
        mae_to_sam_encoder({"foo": torch.zeros(1)}, build_sam("vit_t", image_size=64))


def test_console_helper_writes_loadable_weights(tmp_path, capsys):
    mae = tiny_mae(image_size=32)
    src = save_mae_encoder(mae, tmp_path / "mae.safetensors")
    out = tmp_path / "sam_encoder.safetensors"
    main([str(src), str(out), "--variant", "vit_t", "--image-size", "64"])
    printed = capsys.readouterr().out
    assert "resampled" in printed and str(out) in printed
    sam = build_sam("vit_t", image_size=64)
    report = load_sam_checkpoint(sam, out, strict=False)
    assert not report.unexpected and all(
        k.startswith(("image_encoder.neck", "prompt", "mask")) for k in report.missing
    )
    # its own output is accepted again by init_encoder_from_mae
    again = build_sam("vit_t", image_size=64)
    init_encoder_from_mae(again, out)
    assert torch.equal(again.image_encoder.blocks[0].attn.qkv.weight, mae.encoder.blocks[0].attn.qkv.weight)


def test_decoder_heads_must_divide_its_width():
    with pytest.raises(ValueError, match="decoder_num_heads=5 must divide decoder_dim=32"):
        build_mae("vit_t", image_size=32, decoder_depth=1, decoder_dim=32, decoder_num_heads=5)
