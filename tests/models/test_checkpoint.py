"""Checkpoint loading: prefixes, containers, resampling, reports and clear errors."""

from __future__ import annotations

import pickle

import pytest
import torch

from samtrain.models import build_sam, export_sam_checkpoint, load_sam_checkpoint
from samtrain.models.checkpoint import official_to_samtrain, samtrain_to_official


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = build_sam("vit_t", image_size=64)
    path = export_sam_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.pth")
    return model, path


def assert_same_weights(a, b):
    for name, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], value, atol=0, rtol=0, msg=name)


def test_key_mapping_round_trip():
    keys = {
        "image_encoder.blocks.3.mlp.lin1.weight": 0,
        "mask_decoder.transformer.layers.0.mlp.lin1.weight": 1,
    }
    mapped = official_to_samtrain(keys)
    assert "image_encoder.blocks.3.mlp.fc1.weight" in mapped
    assert "mask_decoder.transformer.layers.0.mlp.lin1.weight" in mapped  # decoder keeps lin
    assert samtrain_to_official(mapped) == keys


@pytest.mark.parametrize("wrap", ["module.", "model.", "net.", "lightning"])
def test_prefixes_and_containers_are_unwrapped(tiny, tmp_path, wrap):
    model, path = tiny
    state = torch.load(path, weights_only=True)
    if wrap == "lightning":
        payload = {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}
    else:
        payload = {f"{wrap}{k}": v for k, v in state.items()}
    torch.save(payload, tmp_path / "wrapped.ckpt")
    loaded = build_sam("vit_t", image_size=64, checkpoint=tmp_path / "wrapped.ckpt")
    assert_same_weights(model, loaded)


def test_other_image_size_resamples_position_tensors(tiny):
    _, path = tiny
    model = build_sam("vit_t", image_size=128)
    report = load_sam_checkpoint(model, path)
    assert "image_encoder.pos_embed" in report.resampled
    global_blocks = {f"image_encoder.blocks.{i}.attn.rel_pos_h" for i in (1, 3)}
    assert global_blocks <= set(report.resampled)
    assert model.image_encoder.pos_embed.shape == (1, 8, 8, 192)
    assert model.image_encoder.blocks[1].attn.rel_pos_h.shape == (15, 64)
    out = model.image_encoder(torch.randn(1, 3, 128, 128))
    assert out.shape == (1, 256, 8, 8) and torch.isfinite(out).all()


def test_report_lists_missing_and_unexpected(tiny, tmp_path):
    _, path = tiny
    state = torch.load(path, weights_only=True)
    state.pop("mask_decoder.iou_token.weight")
    state["mask_decoder.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial\.pth.*strictly"):
        build_sam("vit_t", image_size=64, checkpoint=tmp_path / "partial.pth")
    report = load_sam_checkpoint(build_sam("vit_t", image_size=64), tmp_path / "partial.pth", strict=False)
    assert report.missing == ["mask_decoder.iou_token.weight"]
    assert report.unexpected == ["mask_decoder.extra.weight"]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        build_sam("vit_t", image_size=64, checkpoint=tmp_path / "nope.pth")


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"\x00not a checkpoint at all")
    with pytest.raises(ValueError, match=r"corrupt\.pth could not be read"):
        build_sam("vit_t", image_size=64, checkpoint=path)


class _Payload:
    pass


def test_arbitrary_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"image_encoder.pos_embed": _Payload()}, f)
    with pytest.raises(ValueError, match=r"evil\.pth could not be read"):
        build_sam("vit_t", image_size=64, checkpoint=path)


def test_foreign_checkpoint(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.bias": torch.zeros(10)}, path)
    with pytest.raises(ValueError, match=r"resnet\.pth matches none"):
        build_sam("vit_t", image_size=64, checkpoint=path)


def test_wrong_variant(tiny):
    _, path = tiny
    with pytest.raises(ValueError, match="wrong shape"):
        build_sam("vit_b", image_size=64, checkpoint=path)


def test_bad_variant_and_size():
    with pytest.raises(ValueError, match="unknown SAM variant"):
        build_sam("vit_x", image_size=64)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_sam("vit_t", image_size=100)
