"""CocoInstanceDataset: masks equal pycocotools' annToMask; filters; clear errors; sample data."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from samtrain.data import CocoInstanceDataset, SampleError, SamTransform

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sample"


def compressed_rle(mask: np.ndarray) -> dict:
    """pycocotools' compressed RLE of a bool (H, W) mask, counts as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: run lengths of the column-major pixels, starting with zeros."""
    flat = mask.astype(np.uint8).flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat[0]:
        runs = [0, *runs]
    return {"size": list(mask.shape), "counts": runs}


def box_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    """Three images (RGB, grayscale, RGBA) and annotations in every segmentation format."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    h, w = 48, 64
    rgb = np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    cv2.imwrite(str(images_dir / "a.png"), rgb[..., ::-1])
    cv2.imwrite(str(images_dir / "gray.png"), np.full((30, 40), 77, np.uint8))
    rgba = np.zeros((20, 24, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255  # BGRA: blue
    cv2.imwrite(str(images_dir / "rgba.png"), rgba)

    ring = np.zeros((h, w), np.uint8)
    cv2.circle(ring, (40, 30), 12, 1, -1)
    cv2.circle(ring, (40, 30), 5, 0, -1)
    annotations = [
        # polygon (category 1), compressed RLE with a hole (category 2), uncompressed RLE (category 1)
        {
            "id": 1,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": [[2.0, 2.0, 20.0, 3.0, 15.5, 18.0, 4.0, 12.0]],
        },
        {
            "id": 2,
            "image_id": 1,
            "category_id": 2,
            "iscrowd": 0,
            "segmentation": compressed_rle(ring.astype(bool)),
        },
        {
            "id": 3,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": uncompressed_rle(box_mask(h, w, 0, 10, 50, 64)),
        },
        {
            "id": 4,
            "image_id": 1,
            "category_id": 2,
            "iscrowd": 1,
            "segmentation": uncompressed_rle(box_mask(h, w, 30, 48, 0, 20)),
        },
        # two-part polygon (category 2)
        {
            "id": 5,
            "image_id": 1,
            "category_id": 2,
            "iscrowd": 0,
            "segmentation": [
                [25.0, 20.0, 35.0, 20.0, 30.0, 28.0],
                [5.0, 40.0, 12.0, 40.0, 12.0, 46.0, 5.0, 46.0],
            ],
        },
        {
            "id": 6,
            "image_id": 2,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": compressed_rle(box_mask(30, 40, 5, 9, 5, 9)),
        },
    ]
    for ann in annotations:  # area/bbox as COCO has them
        h_i, w_i = (h, w) if ann["image_id"] == 1 else (30, 40)
        s = ann["segmentation"]
        rle = (
            mask_utils.merge(mask_utils.frPyObjects(s, h_i, w_i))
            if isinstance(s, list)
            else (mask_utils.frPyObjects(s, h_i, w_i) if isinstance(s["counts"], list) else s)
        )
        ann["area"], ann["bbox"] = float(mask_utils.area(rle)), mask_utils.toBbox(rle).tolist()
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": h, "width": w},
            {"id": 2, "file_name": "gray.png", "height": 30, "width": 40},
            {"id": 3, "file_name": "rgba.png", "height": 20, "width": 24},
        ],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    return tmp_path


def reference_masks(coco_dir: Path, image_id: int, ann_ids: list[int]) -> np.ndarray:
    """pycocotools' own decoding: bool (K, H, W)."""
    coco = COCO(str(coco_dir / "ann.json"))
    return np.stack([coco.annToMask(coco.anns[i]).astype(bool) for i in ann_ids])


def make_dataset(coco_dir: Path, **kwargs) -> CocoInstanceDataset:
    return CocoInstanceDataset(annotation_file=coco_dir / "ann.json", image_dir=coco_dir / "images", **kwargs)


def test_masks_equal_pycocotools_ann_to_mask(coco_dir):
    ds = make_dataset(coco_dir)
    sample = ds[0]
    expected = reference_masks(coco_dir, 1, [1, 2, 3, 5])  # crowd annotation 4 skipped
    assert sample["masks"].dtype == bool
    np.testing.assert_array_equal(sample["masks"], expected)
    rgb = cv2.imread(str(coco_dir / "images" / "a.png"))[..., ::-1]
    np.testing.assert_array_equal(sample["image"], rgb)
    assert sample["image_id"] == 1


def test_eval_transform_without_resize_keeps_masks(coco_dir):
    ds = make_dataset(coco_dir, transform=SamTransform(image_size=64, max_masks=None))
    sample = ds[0]
    expected = reference_masks(coco_dir, 1, [1, 2, 3, 5])
    assert sample["masks"].shape == (4, 64, 64)
    np.testing.assert_array_equal(sample["masks"][:, :48].numpy(), expected)
    assert not sample["masks"][:, 48:].any()
    assert sample["input_size"].tolist() == [48, 64] and sample["original_size"].tolist() == [48, 64]


def test_crowd_skipped_by_default_and_included_on_request(coco_dir):
    assert len(make_dataset(coco_dir)[0]["masks"]) == 4
    masks = make_dataset(coco_dir, include_crowd=True)[0]["masks"]
    np.testing.assert_array_equal(masks, reference_masks(coco_dir, 1, [1, 2, 3, 4, 5]))


def test_category_filter(coco_dir):
    masks = make_dataset(coco_dir, category_ids=[2])[0]["masks"]
    np.testing.assert_array_equal(masks, reference_masks(coco_dir, 1, [2, 5]))
    with pytest.raises(ValueError, match=r"unknown category ids \[7\]"):
        make_dataset(coco_dir, category_ids=[1, 7])


def test_min_mask_area_drops_small_masks(coco_dir):
    ds = make_dataset(coco_dir, min_mask_area=17)  # image 2's only mask is 4x4 = 16 px
    assert ds.load_sample(1)["masks"].shape == (0, 30, 40)
    assert make_dataset(coco_dir).load_sample(1)["masks"].shape == (1, 30, 40)


def test_grayscale_and_rgba_images_become_rgb(coco_dir):
    ds = make_dataset(coco_dir)
    gray, rgba = ds[1], ds[2]
    assert gray["image"].shape == (30, 40, 3) and gray["image"].dtype == np.uint8
    assert (gray["image"] == 77).all()
    assert rgba["image"].shape == (20, 24, 3)
    assert (rgba["image"] == [0, 0, 200]).all()  # blue in RGB
    assert rgba["masks"].shape == (0, 20, 24)  # an image without annotations is kept, K = 0


def test_dataset_pickles_for_worker_processes(coco_dir):
    ds = make_dataset(coco_dir)
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone) == 3
    np.testing.assert_array_equal(clone[0]["masks"], ds[0]["masks"])


def test_missing_annotation_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=str(path)):
        CocoInstanceDataset(annotation_file=path, image_dir=tmp_path)


def test_bad_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"images": [')
    with pytest.raises(ValueError, match=rf"{path}.*not valid JSON"):
        CocoInstanceDataset(annotation_file=path, image_dir=tmp_path)


def test_json_without_annotations_list(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text('{"images": []}')
    with pytest.raises(ValueError, match=rf"{path}.*'annotations'"):
        CocoInstanceDataset(annotation_file=path, image_dir=tmp_path)


def test_missing_image_dir(coco_dir):
    missing = coco_dir / "no_such_dir"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        CocoInstanceDataset(annotation_file=coco_dir / "ann.json", image_dir=missing)


def test_missing_and_corrupt_images_raise_sample_error(coco_dir):
    ds = make_dataset(coco_dir)
    (coco_dir / "images" / "gray.png").unlink()
    with pytest.raises(SampleError, match=r"gray\.png: image file does not exist"):
        ds[1]
    (coco_dir / "images" / "rgba.png").write_bytes(b"not a png")
    with pytest.raises(SampleError, match=r"rgba\.png: cannot decode image") as info:
        ds[2]
    assert isinstance(info.value, ValueError)
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)


def test_image_size_mismatch_raises_sample_error(coco_dir):
    cv2.imwrite(str(coco_dir / "images" / "gray.png"), np.zeros((31, 40), np.uint8))
    with pytest.raises(SampleError, match=r"gray\.png: image is 40x31 but .*ann\.json says 40x30"):
        make_dataset(coco_dir)[1]


# -- the committed sample dataset --------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
def test_sample_data_loads_fully(split):
    split_dir = SAMPLE_DIR / split
    ds = CocoInstanceDataset(annotation_file=split_dir / "annotations.json", image_dir=split_dir)
    assert len(ds) >= 16
    shapes = set()
    for i in range(len(ds)):
        sample = ds[i]
        h, w = sample["image"].shape[:2]
        assert min(h, w) >= 128 and max(h, w) <= 192
        assert len(sample["masks"]) >= 2, f"image {sample['image_id']} has fewer than 2 masks"
        assert sample["masks"].reshape(len(sample["masks"]), -1).any(axis=1).all()
        shapes.add((h, w))
    coco = json.loads((split_dir / "annotations.json").read_text())
    categories = {a["category_id"] for a in coco["annotations"]}
    assert categories == {c["id"] for c in coco["categories"]}
    assert any(h != w for h, w in shapes) and len(shapes) > len(ds) // 2
    assert len(set(ds.image_ids.tolist())) == len(ds)
