"""Pascal VOC: SegmentationObject / SegmentationClass palette PNGs written here (with VOC's 255
borders) read into exactly the objects drawn with PIL, 255 in none; every fault named."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

from samtrain.commands import cli
from samtrain.data.errors import SampleError
from samtrain.data.voc import VocInstanceDataset

H, W = 40, 50
PALETTE = np.random.default_rng(0).integers(0, 256, 768).tolist()


def palette_png(path: Path, values: np.ndarray) -> None:
    image = Image.fromarray(values.astype(np.uint8), mode="P")
    image.putpalette(PALETTE)
    image.save(path)


def filled(polygon) -> np.ndarray:
    canvas = Image.new("L", (W, H), 0)
    ImageDraw.Draw(canvas).polygon(polygon, fill=1)
    return np.asarray(canvas, dtype=bool)


def outline(polygon) -> np.ndarray:
    canvas = Image.new("L", (W, H), 0)
    ImageDraw.Draw(canvas).polygon(polygon, outline=1)
    return np.asarray(canvas, dtype=bool)


def write_voc(
    root: Path, images: dict[str, list[tuple[int, list]]], image_set: list[str] | None = None
) -> dict:
    """Per image id, objects (class value, polygon): instance i+1 filled, all outlines 255 in both
    PNGs, as VOC draws them. Returns id -> expected masks bool (K, H, W)."""
    for folder in ("JPEGImages", "SegmentationObject", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    expected = {}
    for n, (image_id, objects) in enumerate(images.items()):
        instances, classes = np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8)
        border = np.zeros((H, W), bool)
        for i, (value, polygon) in enumerate(objects):
            instances[filled(polygon)], classes[filled(polygon)] = i + 1, value
            border |= outline(polygon)
        instances[border], classes[border] = 255, 255
        palette_png(root / "SegmentationObject" / f"{image_id}.png", instances)
        palette_png(root / "SegmentationClass" / f"{image_id}.png", classes)
        image = np.random.default_rng(n).integers(0, 256, (H, W, 3), dtype=np.uint8)
        cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), image)
        expected[image_id] = np.stack([filled(p) & ~border for _, p in objects]) if objects else None
    listing = image_set if image_set is not None else list(images)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(listing) + "\n")
    return expected


A = [
    (15, [(2, 2), (20, 2), (20, 20), (2, 20)]),
    (8, [(25, 5), (45, 5), (35, 30)]),
    (15, [(5, 25), (18, 25), (10, 38)]),
]


def test_fixture_reads_into_exact_masks(tmp_path):
    expected = write_voc(tmp_path, {"2007_000032": A, "2007_000039": []})
    dataset = VocInstanceDataset(root=tmp_path, image_set="train")
    assert len(dataset) == 1 and dataset.skipped_empty == 1
    sample = dataset.load_sample(0)
    np.testing.assert_array_equal(sample["masks"], expected["2007_000032"])
    assert [dataset.categories[k] for k in sample["labels"]] == ["person", "cat", "person"]
    assert sample["image_id"] == 2007000032 and sample["image"].shape == (H, W, 3)
    assert len(dataset.source_files()) == 3


def test_faults_name_the_file(tmp_path):
    bad_class = [(15, [(2, 2), (20, 2), (20, 20), (2, 20)])]
    write_voc(tmp_path, {"ok": A, "noimage": A, "bgclass": bad_class, "small": A, "badpng": A})
    (tmp_path / "JPEGImages" / "noimage.jpg").unlink()
    classes = np.array(Image.open(tmp_path / "SegmentationClass" / "bgclass.png"))
    palette_png(tmp_path / "SegmentationClass" / "bgclass.png", np.where(classes == 15, 0, classes))
    cv2.imwrite(str(tmp_path / "JPEGImages" / "small.jpg"), np.zeros((H - 2, W, 3), np.uint8))
    (tmp_path / "SegmentationObject" / "badpng.png").write_bytes(b"\x89PNG\r\n\x1a\nIEND")
    dataset = VocInstanceDataset(root=tmp_path, image_set=None)
    reasons = {}
    for i in range(len(dataset)):
        try:
            dataset.load_sample(i)
        except SampleError as err:
            reasons[Path(err.path).stem] = err.reason
    assert set(reasons) == {"noimage", "bgclass", "small", "badpng"}
    assert "noimage.jpg does not exist" in reasons["noimage"]
    assert "object 1: its SegmentationClass pixels are background or void only" in reasons["bgclass"]
    assert reasons["small"] == f"is 50x40 but its image {tmp_path / 'JPEGImages' / 'small.jpg'} is 50x38"
    assert "cannot decode mask image" in reasons["badpng"]


def test_check_data_voc(tmp_path, capsys):
    write_voc(tmp_path, {"a": A})
    assert cli.main(["check-data", "--format", "voc", "--path", str(tmp_path), "--no-progress"]) == 0
    assert "masks: 3;" in capsys.readouterr().out
