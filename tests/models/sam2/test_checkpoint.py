"""Official SAM 2 checkpoints both ways: loading reports the video-memory keys it ignores; export
into the original keeps every other key bit for bit and loads strictly into the official
``build_sam2``; an image-only export loads into samtrain strictly and into the official model only
non-strictly."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from samtrain.commands import cli
from samtrain.models import build_sam, export_sam_checkpoint
from samtrain.models.sam2.checkpoint import (
    load_sam2_checkpoint,
    official_to_samtrain_sam2,
    samtrain_to_official_sam2,
)
from tests.models.sam2.oracle import (
    CONFIGS,
    build_official_sam2,
    official_and_samtrain,
    official_build_sam2,
    overrides,
    sam2_hydra,
)

VARIANT, IMAGE_SIZE = "sam2.1_hiera_n", 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sam2ckpt")
    official, path, ours = official_and_samtrain(VARIANT, IMAGE_SIZE, directory)
    with torch.no_grad():  # the fine-tuned weights differ from the original's
        for p in ours.parameters():
            p.add_(0.01)
    return official, path, ours, directory


def test_load_reports_the_ignored_video_keys(setup):
    official, path, _, _ = setup
    model = build_sam(VARIANT, image_size=IMAGE_SIZE)
    report = load_sam2_checkpoint(model, path)
    _, video = official_to_samtrain_sam2(official.state_dict())
    assert report.loaded == len(model.state_dict()) and not report.missing and not report.unexpected
    assert report.ignored == video and len(video) > 100
    assert f"ignored (video memory) ({len(video)})" in str(report)
    for key, value in model.state_dict().items():
        assert torch.equal(value, _official_value(official, key)), key


def _official_value(official, samtrain_key):
    (official_key,) = samtrain_to_official_sam2({samtrain_key: None})
    return official.state_dict()[official_key]


def test_export_into_the_original_loads_strictly_into_build_sam2(setup):
    official, path, ours, directory = setup
    out = export_sam_checkpoint(ours, directory / "finetuned.pt", original=path)
    before = torch.load(path, weights_only=True)["model"]
    after = torch.load(out, weights_only=True)["model"]
    assert list(after) == list(before)
    _, video = official_to_samtrain_sam2(before)
    for key in video:
        assert after[key].dtype == before[key].dtype and torch.equal(after[key], before[key]), key
    reloaded = official_build_sam2(VARIANT, IMAGE_SIZE, out)  # strict load_state_dict, raises on any mismatch
    for key, value in ours.state_dict().items():
        assert torch.equal(_official_value(reloaded, key), value), key
    assert not torch.equal(reloaded.no_mem_embed, official.no_mem_embed)  # the new weights, not the old


def test_image_only_export_loads_into_samtrain_and_official_non_strictly(setup):
    _, _, ours, directory = setup
    out = export_sam_checkpoint(ours, directory / "image_only.pt")
    model = build_sam(VARIANT, image_size=IMAGE_SIZE, checkpoint=out)
    for key, value in ours.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    state = torch.load(out, weights_only=True)["model"]
    with pytest.raises(RuntimeError, match="Missing key"):
        official_build_sam2(VARIANT, IMAGE_SIZE, out)  # the official loader is strict: no video parts
    official = build_official_sam2(VARIANT, IMAGE_SIZE)
    result = official.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and all(
        k.startswith(("memory_", "maskmem", "obj_ptr", "mask_downsample", "no_")) for k in result.missing_keys
    )


def test_export_refuses_an_original_of_another_variant(setup, tmp_path):
    _, path, ours, _ = setup
    content = torch.load(path, weights_only=True)
    content["model"]["sam_mask_decoder.conv_s0.weight"] = torch.zeros(16, 256, 1, 1)  # another width
    other = tmp_path / "other.pt"
    torch.save(content, other)
    with pytest.raises(ValueError, match="does not fit"):
        export_sam_checkpoint(ours, tmp_path / "x.pt", original=other)


def test_wrong_files_fail_clearly(setup, tmp_path):
    _, _, ours, _ = setup
    video_only, plain = tmp_path / "video_only.pt", tmp_path / "plain.pt"
    torch.save({"model": {"memory_attention.x": torch.zeros(1)}}, video_only)
    torch.save({"a": torch.zeros(1)}, plain)
    with pytest.raises(ValueError, match="matches none"):
        load_sam2_checkpoint(ours, video_only)
    with pytest.raises(ValueError, match="no 'model' state dict"):
        export_sam_checkpoint(ours, tmp_path / "y.pt", original=plain)
    with pytest.raises(ValueError, match="SAM 2 models only"):
        export_sam_checkpoint(build_sam("vit_t", image_size=64), tmp_path / "z.pt", original=plain)


def test_lora_on_hiera_trains_only_lora_and_exports_merged(setup, tmp_path):
    """LoRA on the trunk's qkv: the image encoder's other parameters frozen; the export (merged)
    loads into a plain Sam2 that computes the same masks."""
    _, path, _, _ = setup
    model = build_sam(VARIANT, image_size=IMAGE_SIZE, checkpoint=path, lora={"rank": 2, "targets": ("qkv",)})
    trainable = [n for n, p in model.image_encoder.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * len(model.image_encoder.trunk.blocks)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    model.eval()
    out = export_sam_checkpoint(model, tmp_path / "lora.pt", original=path)
    plain = build_sam(VARIANT, image_size=IMAGE_SIZE, checkpoint=out).eval()
    images = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    points = (torch.tensor([[[20.0, 30.0]]]), torch.tensor([[1]]))
    with torch.no_grad():
        want = model.decode_masks(model.image_encoder(images), points=points)[0]
        got = plain.decode_masks(plain.image_encoder(images), points=points)[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_video_inference_runs_on_the_export(setup, tmp_path):
    """The export into the original still serves the official video predictor: it loads strictly
    and propagates a click through a short clip."""
    from PIL import Image
    from sam2.build_sam import build_sam2_video_predictor

    _, path, ours, _ = setup
    out = export_sam_checkpoint(ours, tmp_path / "finetuned.pt", original=path)
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(frames / f"{i:05d}.jpg")
    with sam2_hydra():
        video = build_sam2_video_predictor(
            CONFIGS[VARIANT],
            ckpt_path=str(out),
            device="cpu",
            hydra_overrides_extra=overrides(VARIANT, IMAGE_SIZE),
        )
    state = video.init_state(video_path=str(frames))
    video.add_new_points_or_box(
        state,
        frame_idx=0,
        obj_id=1,
        points=np.array([[30.0, 20.0]], np.float32),
        labels=np.array([1], np.int32),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the official hole filling needs its CUDA extension
        outputs = list(video.propagate_in_video(state))
    assert [frame for frame, _, _ in outputs] == [0, 1]
    assert all(masks.shape == (1, 1, 48, 64) for _, _, masks in outputs)


def test_export_command_writes_into_the_original_and_reads_the_variant(setup, tmp_path):
    """``samtrain export CKPT --format official --original ORIG``: the variant is read from the
    checkpoint's Hiera trunk, and the file is the same as the API's export into the original."""
    _, path, ours, _ = setup
    finetuned = export_sam_checkpoint(ours, tmp_path / "image_only.pt")
    out = tmp_path / "cli.pt"
    argv = ["export", str(finetuned), "--image-size", str(IMAGE_SIZE), "--format", "official"]
    assert cli.main([*argv, "--original", str(path), "--out", str(out)]) == 0
    expected = torch.load(export_sam_checkpoint(ours, tmp_path / "api.pt", original=path), weights_only=True)
    written = torch.load(out, weights_only=True)
    assert list(written["model"]) == list(expected["model"])
    assert all(torch.equal(written["model"][k], v) for k, v in expected["model"].items())
