"""labelme: JSON files written here (polygons, rectangles, circles, group_id parts, embedded
imageData) read into exactly the masks PIL draws as labelme's shape_to_mask; every fault named."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from samtrain.commands import cli
from samtrain.data.errors import SampleError
from samtrain.data.labelme import LabelmeDataset

H, W = 40, 50


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def shape(label, points, kind="polygon", group=None) -> dict:
    return {"label": label, "points": points, "group_id": group, "shape_type": kind, "flags": {}}


def write_file(root: Path, name: str, shapes: list, *, embed=False, size=(H, W), seed=0) -> np.ndarray:
    image = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    doc = {
        "version": "5.4.1",
        "flags": {},
        "shapes": shapes,
        "imagePath": f"{name}.png",
        "imageData": None,
        "imageHeight": size[0],
        "imageWidth": size[1],
    }
    if embed:
        doc["imageData"] = base64.b64encode(png_bytes(image)).decode()
    else:
        (root / f"{name}.png").write_bytes(png_bytes(image))
    (root / f"{name}.json").write_text(json.dumps(doc, indent=2))
    return image


def drawn(*parts) -> np.ndarray:
    """The oracle: labelme's own drawing rule, PIL with outline and fill, parts joined."""
    canvas = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(canvas)
    for kind, xy in parts:
        getattr(draw, kind)(xy, outline=1, fill=1)
    return np.asarray(canvas, dtype=bool)


def test_fixture_reads_into_exact_masks(tmp_path):
    a = write_file(
        tmp_path,
        "a",
        [
            shape("cat", [[5.2, 4.7], [30.1, 6.0], [22.5, 28.9]]),
            shape("box", [[33, 30], [45.5, 12]], kind="rectangle"),
            shape("cat", [[40, 5], [40, 9]], kind="circle"),  # centre, point on the circle: r = 4
            shape("edge", [[1, 1], [10, 10]], kind="line"),  # no area: ignored
        ],
    )
    b = write_file(
        tmp_path,
        "b",
        [
            shape("dog", [[2, 2], [12, 2], [12, 12], [2, 12]], group=7),
            shape("dog", [[30, 25], [45, 25], [38, 38]], group=7),  # the second part of object 7
            shape("dog", [[20, 20], [25, 20], [22, 26]]),
        ],
        embed=True,
        seed=1,
    )
    write_file(tmp_path, "c", [], seed=2)
    dataset = LabelmeDataset(root=tmp_path)
    assert len(dataset) == 2 and dataset.skipped_empty == 1
    assert dataset.categories == ["box", "cat", "dog"]
    sample_a, sample_b = dataset.load_sample(0), dataset.load_sample(1)
    np.testing.assert_array_equal(sample_a["image"], a)
    np.testing.assert_array_equal(sample_b["image"], b)  # decoded from imageData
    expected_a = [
        drawn(("polygon", [(5.2, 4.7), (30.1, 6.0), (22.5, 28.9)])),
        drawn(("rectangle", [33, 12, 45.5, 30])),
        drawn(("ellipse", [36, 1, 44, 9])),
    ]
    np.testing.assert_array_equal(sample_a["masks"], np.stack(expected_a))
    assert sample_a["labels"].tolist() == [1, 0, 1]
    expected_b = [
        drawn(("polygon", [(2, 2), (12, 2), (12, 12), (2, 12)]), ("polygon", [(30, 25), (45, 25), (38, 38)])),
        drawn(("polygon", [(20, 20), (25, 20), (22, 26)])),
    ]
    np.testing.assert_array_equal(sample_b["masks"], np.stack(expected_b))
    assert tmp_path / "b.png" not in dataset.source_files() and tmp_path / "a.png" in dataset.source_files()


TRIANGLE = [[5, 5], [20, 5], [10, 20]]


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ([shape("x", [[5, 5], [20], [10, 20]])], "shapes[0] ('x'): points are not a list of [x, y] pairs"),
        ([shape("x", TRIANGLE), shape("x", [[5, 5], [20, 5]])], "shapes[1] ('x'): 2 point(s)"),
        (
            [shape("x", [[5, 5], [80, 5], [10, 20]])],
            "shapes[0] ('x'): points reach outside the image (50x40)",
        ),
        ([shape("x", TRIANGLE, kind="blob")], "unknown shape_type 'blob'"),
        ([{**shape("x", [[0, 0], [4, 4]], kind="mask"), "mask": "not base64!"}], "mask is not a base64 PNG"),
    ],
)
def test_bad_shapes_name_file_and_shape(tmp_path, shapes, message):
    write_file(tmp_path, "a", shapes)
    dataset = LabelmeDataset(root=tmp_path)
    with pytest.raises(SampleError) as err:
        dataset.load_sample(0)
    assert err.value.path == str(tmp_path / "a.json") and message in err.value.reason


def test_malformed_json_missing_image_and_size_mismatch(tmp_path):
    (tmp_path / "broken.json").write_text('{"shapes": [\n  {"label": "x",,}\n]}')
    write_file(tmp_path, "gone", [shape("x", TRIANGLE)])
    (tmp_path / "gone.png").unlink()
    write_file(tmp_path, "wrong", [shape("x", TRIANGLE)], size=(H + 1, W))
    dataset = LabelmeDataset(root=tmp_path)
    reasons = {}
    for i in range(len(dataset)):
        with pytest.raises(SampleError) as err:
            dataset.load_sample(i)
        reasons[Path(err.value.path).stem] = err.value.reason
    assert reasons["broken"].startswith("not valid JSON (line 2, column")
    assert "gone.png does not exist and the file embeds no imageData" in reasons["gone"]
    assert reasons["wrong"] == f"says the image is 50x41 but {tmp_path / 'wrong.png'} is 50x40"


def test_check_data_labelme(tmp_path, capsys):
    write_file(tmp_path, "a", [shape("x", TRIANGLE)])
    write_file(tmp_path, "b", [])
    assert cli.main(["check-data", "--format", "labelme", "--path", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "images: 1 readable, 0 with errors" in out and "skipped: 1 image(s) without objects" in out
