"""Tiny datasets of the annotation formats (YOLO, labelme, CVAT, VOC, volumes) for the config
tests: each written by the writer of its own test module, with the Hydra overrides pointing at it."""

from __future__ import annotations

from pathlib import Path

from tests.data import test_cvat, test_labelme, test_voc, test_volume, test_yolo

FORMATS = ("yolo", "labelme", "cvat", "voc", "volume", "coco_crops")


def format_overrides(option: str, root: Path) -> list[str]:
    """Write a tiny dataset of format ``option`` under ``root``; the overrides that read it."""
    root.mkdir(parents=True, exist_ok=True)
    if option == "coco_crops":  # the sample data, in crops of 96 px
        return [
            f"data.{split}_dataset.dataset.{key}=${{paths.data_dir}}/sample/{split}/{name}"
            for split in ("train", "val")
            for key, name in (("annotation_file", "annotations.json"), ("image_dir", ""))
        ] + ["data.train_dataset.crop_size=96"]
    if option == "yolo":
        polygon = test_yolo.line(0, [5, 5, 30, 8, 20, 30])
        test_yolo.write_yolo(root, {f"im{i}": polygon for i in range(4)})
        return [f"data.train_dataset.data_yaml={root / 'data.yaml'}"]
    if option == "labelme":
        for i in range(6):
            test_labelme.write_file(root, f"im{i}", [test_labelme.shape("x", test_labelme.TRIANGLE)], seed=i)
        return [f"data.train_dataset.root={root}", "data.train_dataset.val_fraction=0.4"]
    if option == "cvat":
        test_cvat.write_cvat(root, {f"im{i}.png": test_cvat.GOOD for i in range(6)})
        return [
            f"data.train_dataset.annotation_file={root / 'annotations.xml'}",
            f"data.train_dataset.image_dir={root / 'images'}",
            "data.train_dataset.val_fraction=0.4",
        ]
    if option == "voc":
        test_voc.write_voc(root, {f"im{i}": test_voc.A for i in range(4)})
        return [f"data.train_dataset.root={root}", "data.val_dataset.image_set=train"]
    (root / "images").mkdir()
    (root / "labels").mkdir()
    image, labels = test_volume.volumes()
    test_volume.save_nifti(root / "images" / "a.nii.gz", image)
    test_volume.save_nifti(root / "labels" / "a.nii.gz", labels)
    return [
        f"data.train_dataset.image_dir={root / 'images'}",
        f"data.train_dataset.label_dir={root / 'labels'}",
        "data.train_dataset.split=null",
        "data.val_dataset.split=null",
    ]
