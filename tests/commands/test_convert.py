"""`samtrain convert --to coco`: the COCO file loads in pycocotools and reads back into exactly the
masks (and images) of the source dataset."""

from __future__ import annotations

import json

import numpy as np
from pycocotools.coco import COCO

from samtrain.commands import cli
from samtrain.data import CocoInstanceDataset
from samtrain.data.labelme import LabelmeDataset
from samtrain.data.volume import VolumeSliceDataset
from samtrain.data.yolo import YoloSegmentationDataset
from tests.data import test_labelme, test_volume, test_yolo


def assert_same_samples(source, coco_file, image_dir) -> None:
    coco = COCO(str(coco_file))
    readback = CocoInstanceDataset(annotation_file=coco_file, image_dir=image_dir)
    assert len(readback) == len(source)
    by_id = {int(readback.image_ids[i]): i for i in range(len(readback))}
    for index in range(len(source)):
        expected = source.load_sample(index)
        got = readback.load_sample(by_id[expected["image_id"]])
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["masks"], expected["masks"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[expected["image_id"]]))
        np.testing.assert_array_equal(
            np.stack([coco.annToMask(a) for a in anns]).astype(bool), expected["masks"]
        )
        names = [coco.cats[a["category_id"]]["name"] for a in anns]
        assert names == [source.categories[k] for k in expected["labels"]]


def test_yolo_splits_to_coco_files(tmp_path, capsys):
    polygons = "\n".join(test_yolo.line(c, p) for c, p in test_yolo.POLYGONS["a"])
    test_yolo.write_yolo(tmp_path / "yolo", {"a": polygons, "b": polygons + "\n1 0.1 0.1 0.4 0.1 0.3 0.5"})
    out = tmp_path / "out" / "coco.json"
    args = ["convert", "--from", "yolo", "--path", str(tmp_path / "yolo"), "--to", "coco", "--out", str(out)]
    assert cli.main([*args, "--no-progress"]) == 0
    assert f"wrote {tmp_path / 'out' / 'coco_train.json'}" in capsys.readouterr().out
    source = YoloSegmentationDataset(data_yaml=tmp_path / "yolo", split="train")
    assert_same_samples(source, tmp_path / "out" / "coco_train.json", tmp_path / "out")


def test_labelme_with_embedded_images_and_a_bad_file(tmp_path, capsys):
    shape = test_labelme.shape
    (tmp_path / "lm").mkdir()
    test_labelme.write_file(
        tmp_path / "lm",
        "a",
        [
            shape("cat", [[5.2, 4.7], [30.1, 6.0], [22.5, 28.9]]),
            shape("dog", [[33, 30], [45.5, 12]], kind="rectangle"),
        ],
        embed=True,
    )
    test_labelme.write_file(tmp_path / "lm", "b", [shape("dog", [[2, 2], [90, 2], [12, 12]])], seed=1)
    out = tmp_path / "coco.json"
    args = [
        "convert",
        "--from",
        "labelme",
        "--path",
        str(tmp_path / "lm"),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert cli.main([*args, "--images", str(tmp_path / "png")]) == 1
    printed = capsys.readouterr().out
    assert f"ERROR {tmp_path / 'lm' / 'b.json'}: shapes[0] ('dog'): points reach outside" in printed
    assert "1 sample(s) left out" in printed
    source = LabelmeDataset(root=tmp_path / "lm")
    source.entries = source.entries[:1]  # the readable one
    assert_same_samples(source, out, tmp_path)
    assert json.loads(out.read_text())["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


def test_volume_slices_need_images_dir(tmp_path, capsys):
    (tmp_path / "v" / "images").mkdir(parents=True)
    (tmp_path / "v" / "labels").mkdir()
    image, labels = test_volume.volumes()
    test_volume.save_nifti(tmp_path / "v" / "images" / "a.nii.gz", image)
    test_volume.save_nifti(tmp_path / "v" / "labels" / "a.nii.gz", labels)
    out = tmp_path / "ct.json"
    args = ["convert", "--from", "volume", "--path", str(tmp_path / "v"), "--out", str(out), "--no-progress"]
    assert cli.main(args) == 1
    assert "pass --images DIR" in capsys.readouterr().out
    assert cli.main([*args, "--images", str(tmp_path / "slices")]) == 0
    source = VolumeSliceDataset(image_dir=tmp_path / "v" / "images", label_dir=tmp_path / "v" / "labels")
    assert_same_samples(source, out, tmp_path)
    assert [c["name"] for c in json.loads(out.read_text())["categories"]] == ["label 1", "label 2", "label 3"]
