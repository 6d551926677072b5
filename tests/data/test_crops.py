"""Object crops of large images: windows hold at least the set number of objects, cut objects stay
when enough of them is visible (exactly their visible part), eval crops depend on the image alone,
and a 4000x3000 image with 500 objects loads in memory bounded by the crop, not the image."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from samtrain.data import CocoInstanceDataset, SamTransform
from samtrain.data.crops import ObjectCropDataset


def write_coco(root: Path, height: int, width: int, polygons: list[list[float]]) -> Path:
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None]
    cv2.imwrite(str(root / "big.jpg"), image)
    doc = {
        "images": [{"id": 1, "file_name": "big.jpg", "height": height, "width": width}],
        "annotations": [
            {"id": k + 1, "image_id": 1, "category_id": 1, "segmentation": [p], "iscrowd": 0}
            for k, p in enumerate(polygons)
        ],
        "categories": [{"id": 1, "name": "cell"}],
    }
    (root / "ann.json").write_text(json.dumps(doc))
    return root / "ann.json"


def squares(rng: np.random.Generator, n: int, height: int, width: int, side=(6, 20)) -> list[list[float]]:
    out = []
    for _ in range(n):
        s = float(rng.integers(*side))
        x, y = float(rng.integers(0, width - s)), float(rng.integers(0, height - s))
        out.append([x, y, x + s, y, x + s, y + s, x, y + s])
    return out


@pytest.fixture
def medium(tmp_path):
    polygons = squares(np.random.default_rng(0), 40, 300, 400)
    ann = write_coco(tmp_path, 300, 400, polygons)
    full = mask_utils.decode(mask_utils.frPyObjects(polygons, 300, 400)).transpose(2, 0, 1).astype(bool)
    return CocoInstanceDataset(annotation_file=ann, image_dir=tmp_path), full


def test_crops_hold_enough_objects_and_exactly_their_visible_parts(medium):
    dataset, full = medium
    crops = ObjectCropDataset(
        dataset=dataset, crop_size=(96, 128), min_objects=3, min_visible_fraction=0.5, max_objects=None
    )
    for seed in range(8):
        sample = crops.load_sample(0, seed=seed)
        x0, y0, x1, y1 = sample["crop_box"]
        assert (y1 - y0, x1 - x0) == (96, 128) and sample["image"].shape == (96, 128, 3)
        inside = full[:, y0:y1, x0:x1]
        visible = inside.reshape(len(full), -1).sum(1)
        expected = inside[(visible > 0) & (visible >= 0.5 * full.reshape(len(full), -1).sum(1))]
        assert len(expected) >= 3
        np.testing.assert_array_equal(sample["masks"], expected)


def test_eval_crops_follow_the_image_and_train_crops_the_seed(medium):
    dataset, _ = medium
    evaluate = ObjectCropDataset(dataset=dataset, crop_size=64, train=False)
    boxes = {evaluate.load_sample(0, seed=s)["crop_box"] for s in range(4)}
    assert len(boxes) == 1
    train = ObjectCropDataset(
        dataset=dataset, crop_size=64, transform=SamTransform(image_size=64, train=True)
    )
    a, b = train[(0, 1)], train[(0, 1)]
    assert torch_equal(a["image"], b["image"]) and torch_equal(a["masks"], b["masks"])
    assert len({train.load_sample(0, seed=s)["crop_box"] for s in range(6)}) > 1
    with pytest.raises(ValueError, match="transform=None"):
        ObjectCropDataset(
            dataset=CocoInstanceDataset(
                annotation_file=dataset.annotation_file, image_dir=dataset.image_dir, transform=lambda s: s
            )
        )


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_a_large_image_with_500_objects_loads_in_bounded_memory(tmp_path):
    height, width, n = 3000, 4000, 500
    ann = write_coco(
        tmp_path, height, width, squares(np.random.default_rng(1), n, height, width, side=(8, 30))
    )
    crops = ObjectCropDataset(
        dataset=CocoInstanceDataset(annotation_file=ann, image_dir=tmp_path),
        crop_size=512,
        min_objects=5,
        transform=SamTransform(image_size=512, train=True, max_masks=64),
    )
    crops[(0, 0)]  # warm-up: imports and caches
    tracemalloc.start()
    sample = crops[(0, 3)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert 5 <= len(sample["masks"]) <= 64 and sample["image"].shape == (3, 512, 512)
    dense_masks = n * height * width  # what decoding every mask at full size would take, in bytes
    image = height * width * 3
    assert peak < 3 * image + 64 * 512 * 512 * 2, peak  # the image a few times, the crop's masks
    assert peak < dense_masks / 20
