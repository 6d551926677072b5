"""YOLO segmentation: a data.yaml, images/<split>/ and labels/<split>/ written here, read into
exactly the masks pycocotools fills for the same polygons; every fault named with file and line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from samtrain.commands import cli
from samtrain.data.errors import SampleError
from samtrain.data.yolo import YoloSegmentationDataset

H, W = 40, 60
NAMES = ["cat", "dog"]


def coco_mask(pixel_polygon: list[float]) -> np.ndarray:
    return mask_utils.decode(mask_utils.frPyObjects([pixel_polygon], H, W))[..., 0].astype(bool)


def write_yolo(root: Path, labels: dict[str, str], images: tuple[str, ...] | None = None) -> dict:
    """data.yaml, images/train/<name>.png for each of ``images`` (default: every label's name) and
    labels/train/<name>.txt with the given text. Returns name -> image."""
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text(
        "path: .\ntrain: images/train\nval: images/train\nnames:\n  0: cat\n  1: dog\n"
    )
    written = {}
    for i, name in enumerate(images if images is not None else labels):
        image = np.random.default_rng(i).integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / "train" / f"{name}.png")
        written[name] = image
    for name, text in labels.items():
        (root / "labels" / "train" / f"{name}.txt").write_text(text)
    return written


def line(class_id: int, pixel_polygon: list[float]) -> str:
    coords = [v / (W if i % 2 == 0 else H) for i, v in enumerate(pixel_polygon)]
    return f"{class_id} " + " ".join(f"{c:.6f}" for c in coords)


POLYGONS = {
    "a": [(0, [5, 5, 30, 8, 20, 30]), (1, [35, 2, 58, 2, 58, 38, 35, 38])],
    "b": [(1, [10.5, 10.5, 40.2, 12.7, 44.9, 35.1, 12.3, 33.3, 8, 20])],
}


def test_fixture_reads_into_exact_masks(tmp_path):
    labels = {name: "\n".join(line(c, p) for c, p in polys) + "\n" for name, polys in POLYGONS.items()}
    labels["empty"] = ""
    images = write_yolo(tmp_path, labels, images=("a", "b", "empty", "unlabelled"))
    dataset = YoloSegmentationDataset(data_yaml=tmp_path, split="train")
    assert len(dataset) == 2 and dataset.skipped_empty == 2 and dataset.categories == NAMES
    for index, name in enumerate(("a", "b")):
        sample = dataset.load_sample(index)
        np.testing.assert_array_equal(sample["image"], images[name])
        # The file stores 6 decimals: the oracle fills the polygon the file holds.
        expected = [
            coco_mask(
                [round(v / (W if i % 2 == 0 else H), 6) * (W if i % 2 == 0 else H) for i, v in enumerate(p)]
            )
            for _, p in POLYGONS[name]
        ]
        np.testing.assert_array_equal(sample["masks"], np.stack(expected))
        assert sample["labels"].tolist() == [c for c, _ in POLYGONS[name]]
    assert tmp_path.joinpath("data.yaml").resolve() in dataset.source_files()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0 0.1 0.1 0.5 0.1 0.5\n", "line 1: odd number of coordinates (5)"),
        ("0 0.1 0.1 0.5 0.5 0.3 0.9\n1 0.1 0.1 0.5 0.1\n", "line 2: 2 point(s); a polygon needs at least 3"),
        ("0 0.1 0.1 1.2 0.1 0.5 0.5\n", "line 1: points reach outside the image"),
        ("7 0.1 0.1 0.5 0.1 0.5 0.5\n", "line 1: class 7 is not among the 2 names"),
        ("0 0.1 zero 0.5 0.1 0.5 0.5\n", "line 1: not a list of numbers"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, text, message):
    write_yolo(tmp_path, {"a": text})
    dataset = YoloSegmentationDataset(data_yaml=tmp_path / "data.yaml", split="train")
    with pytest.raises(SampleError) as err:
        dataset.load_sample(0)
    assert err.value.path.endswith("labels/train/a.txt") and message in err.value.reason


def test_label_without_image_and_unreadable_image(tmp_path):
    good = line(0, [5, 5, 30, 8, 20, 30])
    write_yolo(tmp_path, {"a": good, "b": good, "orphan": good}, images=("a", "b"))
    (tmp_path / "images" / "train" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    dataset = YoloSegmentationDataset(data_yaml=tmp_path, split="train")
    errors = {}
    for i in range(len(dataset)):
        try:
            dataset.load_sample(i)
        except SampleError as err:
            errors[Path(err.path).name] = err.reason
    assert set(errors) == {"b.png", "orphan.txt"}
    assert "label file without an image" in errors["orphan.txt"]


def test_check_data_lists_yolo_problems(tmp_path, capsys):
    write_yolo(tmp_path, {"a": line(0, [5, 5, 30, 8, 20, 30]), "b": "0 0.1 0.2 0.3\n"})
    args = ["check-data", "--format", "yolo", "--path", str(tmp_path / "data.yaml"), "--no-progress"]
    assert cli.main(args) == 1
    out = capsys.readouterr().out
    assert "== train" in out and "== val" in out and "images: 1 readable, 1 with errors" in out
    assert "b.txt: line 1: odd number of coordinates (3)" in out


def test_bad_yaml_fails_at_construction(tmp_path):
    (tmp_path / "data.yaml").write_text("names: [a]\ntrain: nowhere\n")
    with pytest.raises(FileNotFoundError, match=r"split source .*nowhere does not exist"):
        YoloSegmentationDataset(data_yaml=tmp_path, split="train")
    with pytest.raises(ValueError, match="no 'val' entry"):
        YoloSegmentationDataset(data_yaml=tmp_path, split="val")
