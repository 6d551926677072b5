"""CVAT for images 1.1: an XML written here (polygons, grouped polygons, masks in CVAT's RLE) read
into exactly the masks pycocotools fills and the bitmaps encoded; every fault named with its line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from samtrain.commands import cli
from samtrain.data.cvat import CvatImagesDataset
from samtrain.data.errors import SampleError

H, W = 40, 50


def cvat_rle(bitmap: np.ndarray) -> str:
    """CVAT's encoding, written independently: row-major runs, background first."""
    flat = bitmap.reshape(-1).astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate(([0], flat, [1 - flat[-1]]))))
    runs = np.diff(np.concatenate(([0], changes)))
    return ", ".join(str(int(r)) for r in runs)


def points(polygon: list[float]) -> str:
    return ";".join(f"{x:.2f},{y:.2f}" for x, y in zip(polygon[0::2], polygon[1::2], strict=True))


def coco_mask(polygon: list[float]) -> np.ndarray:
    return mask_utils.decode(mask_utils.frPyObjects([polygon], H, W))[..., 0].astype(bool)


BITMAP = np.zeros((7, 9), bool)
BITMAP[1:6, 2:8] = True
BITMAP[3, 0] = True
TRI = [5.0, 5.0, 30.0, 8.0, 20.0, 30.0]
SQUARE = [35.0, 2.0, 48.0, 2.0, 48.0, 14.0, 35.0, 14.0]
PART = [35.0, 25.0, 48.0, 25.0, 42.0, 38.0]


def write_cvat(
    root: Path, image_body: dict[str, str], sizes: dict[str, tuple[int, int]] | None = None
) -> dict:
    (root / "images").mkdir()
    images, xml = (
        {},
        [
            '<?xml version="1.0" encoding="utf-8"?>',
            "<annotations>",
            "  <version>1.1</version>",
            "  <meta><task><labels>",
            "    <label><name>cat</name><attributes><attribute><name>color</name></attribute></attributes></label>",
            "    <label><name>dog</name></label>",
            "  </labels></task></meta>",
        ],
    )
    for i, (name, body) in enumerate(image_body.items()):
        h, w = (sizes or {}).get(name, (H, W))
        xml.append(f'  <image id="{i}" name="{name}" width="{w}" height="{h}">')
        xml += [f"    {line}" for line in body.strip().splitlines()]
        xml.append("  </image>")
        images[name] = np.random.default_rng(i).integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(images[name]).save(root / "images" / name)
    xml.append("</annotations>")
    (root / "annotations.xml").write_text("\n".join(xml) + "\n")
    return images


GOOD = f"""
<polygon label="cat" source="manual" occluded="0" points="{points(TRI)}" z_order="0"/>
<mask label="dog" source="manual" occluded="0" rle="{cvat_rle(BITMAP)}" left="12" top="20" width="9" height="7" z_order="0"/>
<polygon label="dog" occluded="0" points="{points(SQUARE)}" group_id="3"/>
<box label="cat" occluded="0" xtl="1" ytl="1" xbr="9" ybr="9"/>
<polygon label="dog" occluded="0" points="{points(PART)}" group_id="3"/>
"""


def test_fixture_reads_into_exact_masks(tmp_path):
    images = write_cvat(tmp_path, {"a.png": GOOD, "empty.png": ""})
    dataset = CvatImagesDataset(annotation_file=tmp_path / "annotations.xml", image_dir=tmp_path / "images")
    assert len(dataset) == 1 and dataset.skipped_empty == 1 and dataset.categories == ["cat", "dog"]
    sample = dataset.load_sample(0)
    np.testing.assert_array_equal(sample["image"], images["a.png"])
    placed = np.zeros((H, W), bool)
    placed[20:27, 12:21] = BITMAP
    expected = np.stack([coco_mask(TRI), placed, coco_mask(SQUARE) | coco_mask(PART)])
    np.testing.assert_array_equal(sample["masks"], expected)
    assert sample["labels"].tolist() == [0, 1, 1]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            '<polygon label="cat" points="5,5;30,8;20"/>',
            "line 9 (<polygon> 'cat'): odd number of coordinates (5)",
        ),
        ('<polygon label="cat" points="5,5;60,8;20,30"/>', "line 9 (<polygon> 'cat'): points reach outside"),
        (
            '<mask label="cat" rle="3, 4" left="0" top="0" width="3" height="3"/>',
            "rle covers 7 pixels but the box is 3x3",
        ),
        (
            '<mask label="cat" rle="3, 6" left="48" top="0" width="3" height="3"/>',
            "reaches outside the image",
        ),
    ],
)
def test_bad_shapes_name_file_and_line(tmp_path, body, message):
    write_cvat(tmp_path, {"a.png": body})
    dataset = CvatImagesDataset(annotation_file=tmp_path / "annotations.xml", image_dir=tmp_path / "images")
    with pytest.raises(SampleError) as err:
        dataset.load_sample(0)
    assert err.value.path == str(tmp_path / "annotations.xml") and message in err.value.reason


def test_missing_image_size_mismatch_and_bad_xml(tmp_path):
    polygon = f'<polygon label="cat" points="{points(TRI)}"/>'
    write_cvat(tmp_path, {"a.png": polygon, "b.png": polygon}, sizes={"b.png": (H, W + 2)})
    (tmp_path / "images" / "a.png").unlink()
    dataset = CvatImagesDataset(annotation_file=tmp_path / "annotations.xml", image_dir=tmp_path / "images")
    reasons = []
    for i in range(2):
        with pytest.raises(SampleError) as err:
            dataset.load_sample(i)
        reasons.append(err.value.reason)
    assert reasons[0] == f"line 8: image {tmp_path / 'images' / 'a.png'} does not exist"
    assert reasons[1] == f"says the image is 52x40 but {tmp_path / 'images' / 'b.png'} is 50x40"
    (tmp_path / "annotations.xml").write_text("<annotations>\n<image name='a'>\n</annotations>\n")
    with pytest.raises(ValueError, match=r"not valid XML \(line 3, column 2\): mismatched tag"):
        CvatImagesDataset(annotation_file=tmp_path / "annotations.xml", image_dir=tmp_path / "images")


def test_check_data_cvat(tmp_path, capsys):
    write_cvat(tmp_path, {"a.png": GOOD})
    path = tmp_path / "annotations.xml"
    assert cli.main(["check-data", "--format", "cvat", "--path", str(path), "--no-progress"]) == 0
    assert "masks: 3;" in capsys.readouterr().out
