"""Medical volumes: NIfTI and multi-page TIFF image/label volumes written here, sliced into exactly
the objects drawn per slice (every connected component of every label), windowed as specified;
empty slices skipped and counted; every fault named with its file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from samtrain.commands import cli
from samtrain.data.errors import SampleError
from samtrain.data.volume import VolumeSliceDataset

nibabel = pytest.importorskip("nibabel")
tifffile = pytest.importorskip("tifffile")

H, W, DEPTH = 30, 40, 6


def disk(cx, cy, r) -> np.ndarray:
    canvas = Image.new("L", (W, H), 0)
    ImageDraw.Draw(canvas).ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    return np.asarray(canvas, dtype=bool)


# slice -> objects (label value, mask (H, W)); slices 0, 2, 5 hold none.
OBJECTS = {
    1: [(1, disk(8, 8, 4)), (1, disk(30, 20, 5)), (2, disk(20, 8, 3))],
    3: [(2, disk(10, 20, 6))],
    4: [(1, disk(25, 10, 3)), (3, disk(10, 22, 4))],
}


def volumes(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """image int16 (H, W, DEPTH) of CT-like values, labels uint8 (H, W, DEPTH)."""
    image = np.random.default_rng(seed).integers(-1000, 1000, (H, W, DEPTH)).astype(np.int16)
    labels = np.zeros((H, W, DEPTH), np.uint8)
    for k, objects in OBJECTS.items():
        for value, mask in objects:
            labels[mask, k] = value
    return image, labels


def save_nifti(path: Path, array: np.ndarray) -> None:
    nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), str(path))


def check_objects(sample: dict, objects: list) -> None:
    values = [int(k) + 1 for k in sample["labels"]]  # the fixture's values are 1, 2, 3: categories 0, 1, 2
    got = sorted((v, m.tobytes()) for v, m in zip(values, sample["masks"], strict=True))
    assert got == sorted((v, m.tobytes()) for v, m in objects)


def test_nifti_slices_with_ct_window(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    image, labels = volumes()
    save_nifti(tmp_path / "imagesTr" / "case1_0000.nii.gz", image)
    save_nifti(tmp_path / "labelsTr" / "case1.nii.gz", labels)
    dataset = VolumeSliceDataset(
        image_dir=tmp_path / "imagesTr",
        label_dir=tmp_path / "labelsTr",
        image_suffix="_0000",
        window="ct_abdomen",
    )
    assert len(dataset) == 3 and dataset.skipped_empty == 3
    for index, k in enumerate(sorted(OBJECTS)):
        sample = dataset.load_sample(index)
        low, high = 40 - 200, 40 + 200  # W400 / L40
        grey = np.rint(np.clip((image[:, :, k].astype(float) - low) / (high - low) * 255, 0, 255))
        np.testing.assert_array_equal(sample["image"], np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2))
        check_objects(sample, OBJECTS[k])
    assert len({dataset.load_sample(i)["image_id"] for i in range(3)}) == 3


def test_tiff_slices_with_percentile_window(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    image, labels = volumes(seed=1)
    image = np.moveaxis(image, 2, 0).astype(np.uint16) + 1000  # pages first: (DEPTH, H, W)
    tifffile.imwrite(tmp_path / "images" / "stack.tif", image)
    tifffile.imwrite(tmp_path / "labels" / "stack.tif", np.moveaxis(labels, 2, 0))
    dataset = VolumeSliceDataset(
        image_dir=tmp_path / "images", label_dir=tmp_path / "labels", percentiles=(1, 99)
    )
    low, high = np.percentile(image, [1, 99])
    assert len(dataset) == 3
    sample = dataset.load_sample(2)  # slice 4
    grey = np.rint(np.clip((image[4].astype(float) - low) / (high - low) * 255, 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(sample["image"][..., 0], grey)
    check_objects(sample, OBJECTS[4])


def test_volume_faults_name_the_file(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    image, labels = volumes()
    save_nifti(tmp_path / "images" / "ok.nii.gz", image)
    save_nifti(tmp_path / "labels" / "ok.nii.gz", labels)
    save_nifti(tmp_path / "images" / "short.nii.gz", image[:, :, :4])
    save_nifti(tmp_path / "labels" / "short.nii.gz", labels)
    save_nifti(tmp_path / "labels" / "alone.nii.gz", labels)
    save_nifti(tmp_path / "images" / "frac.nii.gz", image)
    save_nifti(tmp_path / "labels" / "frac.nii.gz", labels.astype(np.float32) * 0.5)
    save_nifti(tmp_path / "images" / "broken.nii.gz", image)
    (tmp_path / "labels" / "broken.nii.gz").write_bytes(b"not a nifti")
    dataset = VolumeSliceDataset(image_dir=tmp_path / "images", label_dir=tmp_path / "labels")
    reasons = {}
    for i in range(len(dataset)):
        try:
            dataset.load_sample(i)
        except SampleError as err:
            reasons[Path(err.path).name] = err.reason
    assert len(dataset) == 3 + 4
    assert (
        reasons["short.nii.gz"]
        == f"label volume is (30, 40, 6) but {tmp_path / 'images' / 'short.nii.gz'} is (30, 40, 4)"
    )
    assert reasons["alone.nii.gz"].startswith("label volume without an image volume")
    assert reasons["frac.nii.gz"] == "label volume holds non-integer values"
    assert reasons["broken.nii.gz"].startswith("cannot read volume")
    with pytest.raises(ValueError, match="unknown window 'ct_foot'"):
        VolumeSliceDataset(image_dir=tmp_path / "images", label_dir=tmp_path / "labels", window="ct_foot")


def test_check_data_volume(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    image, labels = volumes()
    save_nifti(tmp_path / "images" / "a.nii", image)
    save_nifti(tmp_path / "labels" / "a.nii", labels)
    assert cli.main(["check-data", "--format", "volume", "--path", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "images: 3 readable" in out and "masks: 6;" in out and "skipped: 3 image(s)" in out
