"""The bad-input corpus: every kind of damaged input and its expected outcome.

- converted: grayscale, RGBA, 16-bit, EXIF-rotated images load as plain 8-bit RGB;
- skipped and counted: a sample that cannot be read is None from ``SkipBadSamples`` (dropped and
  counted by ``collate_sam_batch``), with a warning naming its file and the reason;
- clear error: dataset-level damage fails at construction with a message naming the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from samtrain.data import (
    CocoInstanceDataset,
    InstanceMaskFolder,
    Sa1bDataset,
    SemanticMaskFolder,
    SkipBadSamples,
    collate_sam_batch,
    read_rgb_image,
)
from tests.data_builders import (
    coco_rle,
    jpeg_bytes,
    make_instance_folder,
    make_sa1b_folder,
    make_semantic_folder,
)

H, W = 24, 32

# -- converted --------------------------------------------------------------------------------


def test_grayscale_rgba_and_16_bit_are_converted(tmp_path):
    cv2.imwrite(str(tmp_path / "gray.png"), np.full((H, W), 77, np.uint8))
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 2], rgba[..., 3] = 200, 128  # BGRA: red, half transparent
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    cv2.imwrite(str(tmp_path / "gray16.png"), np.full((H, W), 0x8000, np.uint16))
    cv2.imwrite(str(tmp_path / "rgb16.png"), np.full((H, W, 3), [0xFFFF, 0, 0x4000], np.uint16))  # BGR
    expected = {"gray": (77, 77, 77), "rgba": (200, 0, 0), "gray16": (128, 128, 128), "rgb16": (64, 0, 255)}
    for name, rgb in expected.items():
        image = read_rgb_image(tmp_path / f"{name}.png")
        assert image.shape == (H, W, 3) and image.dtype == np.uint8, name
        assert (image == rgb).all(), name


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((H, W, 3), np.uint8)
    stored[: H // 2, : W // 2] = (255, 0, 0)  # red top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    image = read_rgb_image(tmp_path / "rotated.jpg")
    assert image.shape == (W, H, 3)  # displayed upright: portrait
    top_right = image[: W // 2 - 2, H // 2 + 2 :]
    assert (top_right[..., 0] > 200).all() and (top_right[..., 1:] < 60).all()  # red moved to the top right


# -- skipped and counted: COCO -----------------------------------------------------------------


def square(y0: int, x0: int, size: int = 6) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0 : y0 + size, x0 : x0 + size] = True
    return mask


GOOD_RLE = coco_rle(square(2, 2))
COCO_CASES = {
    # name: (what to do with the image file, segmentation or annotation change, expected log text)
    "good": (None, {}, None),
    "corrupt": ("corrupt", {}, "corrupt.png: cannot decode image"),
    "truncated_jpeg": ("truncate_jpg", {}, "truncated_jpeg.jpg: JPEG is truncated"),
    "truncated_png": ("truncate_png", {}, "truncated_png.png: PNG is truncated"),
    "missing": ("delete", {}, "missing.png: image file does not exist"),
    "empty_file": ("empty", {}, "empty_file.png: image file is empty"),
    "bad_rle": (None, {"segmentation": {"size": [H, W], "counts": "\x01\x02"}}, "characters outside"),
    "short_rle": (None, {"segmentation": {"size": [H, W], "counts": [3, 4]}}, "RLE covers 7 pixels"),
    "bad_polygon": (None, {"segmentation": [[1.0, 2.0, 3.0, 4.0]]}, "invalid polygon part (4 coordinates"),
    "zero_area": (None, {"segmentation": coco_rle(np.zeros((H, W), bool))}, "have zero area"),
    "bad_category": (None, {"category_id": 99}, "has category 99, not among the file's categories"),
    "no_segmentation": (None, {"segmentation": None}, "has no segmentation"),
    "wrong_size": ("wrong_size", {}, "wrong_size.png: image is 16x16 but"),
}


def write_image(images: Path, name: str, action: str | None) -> str:
    ext = "jpg" if action == "truncate_jpg" else "png"
    path = images / f"{name}.{ext}"
    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    data = jpeg_bytes(image) if ext == "jpg" else cv2.imencode(".png", image)[1].tobytes()
    if action == "wrong_size":
        data = cv2.imencode(".png", image[:16, :16])[1].tobytes()
    if action == "corrupt":
        data = b"\x89PNG\r\n\x1a\n" + b"garbage" * 20 + b"IEND"
    if action in ("truncate_jpg", "truncate_png"):
        data = data[: len(data) // 2]
    if action == "empty":
        data = b""
    if action != "delete":
        path.write_bytes(data)
    return path.name


@pytest.fixture
def bad_coco(tmp_path) -> CocoInstanceDataset:
    images = tmp_path / "images"
    images.mkdir()
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for i, (name, (action, change, _)) in enumerate(COCO_CASES.items()):
        file_name = write_image(images, name, action)
        coco["images"].append({"id": i, "file_name": file_name, "height": H, "width": W})
        ann = {"id": 100 + i, "image_id": i, "category_id": 1, "iscrowd": 0, "segmentation": GOOD_RLE}
        ann.update(change)
        if ann["segmentation"] is None:
            del ann["segmentation"]
        coco["annotations"].append(ann)
    coco["annotations"].append({"id": 999, "image_id": 12345, "category_id": 1, "segmentation": GOOD_RLE})
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    return CocoInstanceDataset(annotation_file=tmp_path / "ann.json", image_dir=images)


def test_coco_corpus_skips_names_and_counts_every_bad_sample(bad_coco, caplog):
    setup_log = "\n".join(r.getMessage() for r in caplog.get_records("setup"))
    assert "ignoring annotations[13]: it names no known image" in setup_log  # logged at construction
    with caplog.at_level(logging.WARNING):
        items = [SkipBadSamples(bad_coco)[i] for i in range(len(bad_coco))]
    for (name, (_, _, message)), item in zip(COCO_CASES.items(), items, strict=True):
        if message is None:
            assert item is not None and len(item["masks"]) == 1, name
        else:
            assert item is None, name
            assert message in caplog.text, name
    assert sum(item is None for item in items) == len(COCO_CASES) - 1


def test_bad_samples_are_counted_by_collate(bad_coco):
    from samtrain.data import SamTransform

    bad_coco.transform = SamTransform(image_size=32)
    batch = collate_sam_batch([SkipBadSamples(bad_coco)[i] for i in range(len(bad_coco))])
    assert batch["num_skipped"] == len(COCO_CASES) - 1 and batch["image"].shape[0] == 1


# -- skipped and counted: SA-1B and mask folders ---------------------------------------------------


def test_sa1b_folder_bad_json_and_missing_json(tmp_path, caplog):
    make_sa1b_folder(tmp_path, range(4))
    folder = tmp_path / "sa_000000"
    (folder / "sa_1.json").write_text('{"image": {"image_id": 1,')
    (folder / "sa_2.json").unlink()
    doc = json.loads((folder / "sa_3.json").read_text())
    doc["annotations"][0]["segmentation"]["counts"] = "0P"
    (folder / "sa_3.json").write_text(json.dumps(doc))
    ds = SkipBadSamples(Sa1bDataset(root=tmp_path))
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(4)]
    assert [item is None for item in items] == [False, True, True, True]
    assert "sa_1.json: annotation JSON does not parse" in caplog.text
    assert "sa_2.json: annotation file does not exist" in caplog.text
    assert "sa_3.json: annotation 3000: invalid RLE: compressed RLE is cut short" in caplog.text


def test_mask_folder_bad_masks(tmp_path, caplog):
    make_instance_folder(tmp_path, 4)
    (tmp_path / "masks" / "img1.png").unlink()
    cv2.imwrite(str(tmp_path / "masks" / "img2.png"), np.ones((5, 5), np.uint8))
    data = (tmp_path / "masks" / "img3.png").read_bytes()
    (tmp_path / "masks" / "img3.png").write_bytes(data[: len(data) // 2])
    ds = SkipBadSamples(InstanceMaskFolder(image_dir=tmp_path / "images", mask_dir=tmp_path / "masks"))
    with caplog.at_level(logging.WARNING):
        items = {ds.dataset.key(i): ds[i] for i in range(4)}
    assert items["img0"] is not None and all(items[k] is None for k in ("img1", "img2", "img3"))
    assert "img1.png: mask file does not exist" in caplog.text
    assert "img2.png: mask is 5x5 but its image is 56x40" in caplog.text
    assert "img3.png: PNG is truncated" in caplog.text


def test_semantic_class_out_of_range(tmp_path, caplog):
    make_semantic_folder(tmp_path, 1)
    ds = SkipBadSamples(
        SemanticMaskFolder(image_dir=tmp_path / "images", mask_dir=tmp_path / "masks", num_classes=2)
    )
    with caplog.at_level(logging.WARNING):
        assert ds[0] is None
    assert "img0.png: class id 2 is out of range (num_classes=2)" in caplog.text


# -- clear errors at start ---------------------------------------------------------------------


def test_dataset_level_damage_fails_at_construction(tmp_path):
    (tmp_path / "bad.json").write_text('{"images": [')
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        CocoInstanceDataset(annotation_file=tmp_path / "bad.json", image_dir=tmp_path)
    (tmp_path / "ok.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(FileNotFoundError, match="no_images"):
        CocoInstanceDataset(annotation_file=tmp_path / "ok.json", image_dir=tmp_path / "no_images")
    with pytest.raises(FileNotFoundError, match="no_sa1b"):
        Sa1bDataset(root=tmp_path / "no_sa1b")
    make_instance_folder(tmp_path / "f", 1)
    with pytest.raises(FileNotFoundError, match=r"mask folder .*no_masks"):
        InstanceMaskFolder(image_dir=tmp_path / "f" / "images", mask_dir=tmp_path / "f" / "no_masks")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="empty_dir holds no images"):
        InstanceMaskFolder(image_dir=tmp_path / "empty_dir", mask_dir=tmp_path)
