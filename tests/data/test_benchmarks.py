"""Each benchmark loader reads a fixture written here in the benchmark's published layout, and
names the file when one is malformed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from samtrain.data.benchmarks import ImageMaskBenchmark, PascalVocBenchmark, SbdBenchmark
from samtrain.data.errors import SampleError
from tests.conftest import compose_config

HW = (30, 44)
ROOT_DIRS = {  # conf/benchmark name -> (folder under data.root, image dir, mask dir, image ext, mask ext)
    "grabcut": ("GrabCut", "data_GT", "boundary_GT", ".jpg", ".bmp"),
    "berkeley": ("Berkeley", "images", "masks", ".jpg", ".png"),
    "davis": ("DAVIS", "img", "gt", ".jpg", ".png"),
    "coco_mval": ("COCO_MVal", "img", "gt", ".jpg", ".png"),
    "dis_vd": ("DIS5K/DIS-VD", "im", "gt", ".jpg", ".png"),
    "thin_object5k": ("thin_object_detection/ThinObject5K", "images_test", "masks_test", ".jpg", ".png"),
    "coift": ("thin_object_detection/COIFT", "images", "masks", ".jpg", ".png"),
    "hrsod": ("thin_object_detection/HRSOD", "images", "masks_max255", ".jpg", ".png"),
}


def rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*HW, 3), dtype=np.uint8)


def object_mask(seed: int) -> np.ndarray:
    mask = np.zeros(HW, dtype=bool)
    mask[5 + seed : 20, 8 : 30 - seed] = True
    return mask


def write_pairs(root: Path, name: str, count: int = 2) -> list[np.ndarray]:
    """Images and masks as the benchmark stores them; GrabCut-style masks get a 128 band."""
    folder, image_dir, mask_dir, image_ext, mask_ext = ROOT_DIRS[name]
    base = root / folder
    (base / image_dir).mkdir(parents=True)
    (base / mask_dir).mkdir(parents=True)
    masks = []
    for i in range(count):
        Image.fromarray(rgb(i)).save(base / image_dir / f"{i:05d}{image_ext}")
        mask = object_mask(i)
        if name in ("grabcut", "berkeley"):
            values = np.where(mask, 255, 0).astype(np.uint8)
            values[mask ^ np.roll(mask, 1, axis=0)] = 128  # the unsure band along the edges
            Image.fromarray(values).save(base / mask_dir / f"{i:05d}{mask_ext}")
        elif name in ("davis", "coco_mval"):  # RGB masks, the object in one colour channel
            values = np.zeros((*HW, 3), dtype=np.uint8)
            values[mask, 1] = 200
            Image.fromarray(values).save(base / mask_dir / f"{i:05d}{mask_ext}")
        else:  # 0-255 grey, anti-aliased: only > 127 is object
            values = np.where(mask, 255, 0).astype(np.uint8)
            values[0, 0] = 100
            Image.fromarray(values).save(base / mask_dir / f"{i:05d}{mask_ext}")
        masks.append(mask)
    return masks


def benchmark(name: str, root: Path):
    """The dataset of conf/benchmark/<name>.yaml with data.root=root."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    cfg = compose_config(root / "run", f"benchmark={name}", f"data.root={root}", config_name="eval")
    GlobalHydra.instance().clear()
    return hydra.utils.instantiate(cfg.benchmarks[name], transform=None)


@pytest.mark.parametrize("name", sorted(ROOT_DIRS))
def test_image_and_mask_folders(tmp_path, name):
    masks = write_pairs(tmp_path, name)
    dataset = benchmark(name, tmp_path)
    assert isinstance(dataset, ImageMaskBenchmark) and len(dataset) == 2
    for i, sample in enumerate(dataset[j] for j in range(2)):
        assert sample["image"].shape == (*HW, 3) and sample["image_id"] == i
        assert sample["masks"].shape == (1, *HW)
        if name in ("grabcut", "berkeley"):
            band = masks[i] ^ np.roll(masks[i], 1, axis=0)
            assert np.array_equal(sample["ignore"], band)
            assert np.array_equal(sample["masks"][0], masks[i] & ~band)
        else:
            assert "ignore" not in sample
            assert np.array_equal(sample["masks"][0], masks[i])


def test_sbd_instances_from_mat_files(tmp_path):
    root = tmp_path / "SBD"
    (root / "img").mkdir(parents=True)
    (root / "inst").mkdir()
    (root / "val.txt").write_text("2008_000001\n2008_000002\n")
    for k, name in enumerate(("2008_000001", "2008_000002")):
        Image.fromarray(rgb(k)).save(root / "img" / f"{name}.jpg")
        instances = np.zeros(HW, dtype=np.uint8)
        instances[2:10, 3:12] = 1
        instances[15:25, 20:40] = 3 if k == 0 else 1
        savemat(
            root / "inst" / f"{name}.mat",
            {"GTinst": {"Segmentation": instances, "Boundaries": [], "Categories": [1]}},
        )
    dataset = benchmark("sbd", tmp_path)
    assert isinstance(dataset, SbdBenchmark) and len(dataset) == 2
    first = dataset[0]
    assert first["masks"].shape == (2, *HW) and first["masks"][1].sum() == 10 * 20
    assert dataset[1]["masks"].shape == (1, *HW)
    (root / "inst" / "2008_000002.mat").write_bytes(b"not a mat file")
    with pytest.raises(SampleError, match=r"2008_000002\.mat"):
        dataset[1]
    savemat(root / "inst" / "2008_000002.mat", {"other": np.zeros(3)})
    with pytest.raises(SampleError, match=r"2008_000002\.mat: not an SBD instance file"):
        dataset[1]


def test_pascal_voc_segmentation_object_palette(tmp_path):
    root = tmp_path / "PascalVOC"
    for sub in ("ImageSets/Segmentation", "JPEGImages", "SegmentationObject"):
        (root / sub).mkdir(parents=True)
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000033\n")
    Image.fromarray(rgb(0)).save(root / "JPEGImages/2007_000033.jpg")
    labels = np.zeros(HW, dtype=np.uint8)
    labels[2:10, 3:12], labels[15:25, 20:40] = 1, 2
    labels[10, 3:12] = 255
    png = Image.fromarray(labels, mode="P")
    png.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 252) + [224, 224, 192])
    png.save(root / "SegmentationObject/2007_000033.png")
    dataset = benchmark("pascal_voc", tmp_path)
    assert isinstance(dataset, PascalVocBenchmark)
    sample = dataset[0]
    assert sample["masks"].shape == (2, *HW)
    assert sample["masks"].sum(axis=(1, 2)).tolist() == [8 * 9, 10 * 20]
    assert sample["ignore"].sum() == 9


def test_malformed_files_are_named(tmp_path):
    write_pairs(tmp_path, "davis", count=3)
    base = tmp_path / "DAVIS"
    (base / "gt" / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (base / "gt" / "00002.png").unlink()
    dataset = benchmark("davis", tmp_path)
    with pytest.raises(SampleError, match=r"gt/00001\.png: PNG is truncated"):
        dataset[1]
    with pytest.raises(SampleError, match=r"img/00002\.jpg: no mask named 00002"):
        dataset[2]
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(base / "gt" / "00001.png")
    with pytest.raises(SampleError, match=r"00001\.png: mask is 5x5, its image 44x30"):
        dataset[1]
    with pytest.raises(Exception, match=r"GrabCut/data_GT: the image folder does not exist"):
        benchmark("grabcut", tmp_path)  # Hydra wraps the FileNotFoundError, keeping its message


def test_several_benchmarks_in_one_run_give_one_table(tmp_path):
    from hydra.core.global_hydra import GlobalHydra

    from samtrain.commands.eval import evaluate

    write_pairs(tmp_path, "grabcut")
    write_pairs(tmp_path, "davis")
    cfg = compose_config(
        tmp_path / "run",
        "benchmark=[grabcut,davis]",
        f"data.root={tmp_path}",
        "image_size=64",
        "max_clicks=2",
        "boundary_clicks=[2]",
        "worst_objects=0",
        "progress=false",
        config_name="eval",
    )
    GlobalHydra.instance().clear()
    results = evaluate(cfg)
    assert list(results) == ["grabcut", "davis"]
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| grabcut | random | 2 |" in table and "| davis | random | 2 |" in table
    assert (tmp_path / "run" / "davis" / "miou_vs_clicks.png").is_file()


def test_coco_val_layout(tmp_path):
    """COCO val2017 with GT boxes: the sample data copied into COCO's published layout."""
    import shutil

    from tests.conftest import ROOT

    source = ROOT / "data" / "sample" / "val"
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    shutil.copytree(source, tmp_path / "coco" / "val2017")
    shutil.copy(source / "annotations.json", tmp_path / "coco" / "annotations" / "instances_val2017.json")
    dataset = benchmark("coco_val", tmp_path)
    sample = dataset[0]
    assert sample["masks"].shape[1:] == sample["image"].shape[:2] and len(sample["masks"]) >= 1
    coco = json.loads((source / "annotations.json").read_text())
    first = next(a for a in coco["annotations"] if a["image_id"] == sample["image_id"])
    x, y, w, h = first["bbox"]
    assert sample["boxes"][0].tolist() == [x, y, x + w, y + h]


def test_lvis_images_named_by_coco_url(tmp_path):
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    (tmp_path / "lvis").mkdir()
    Image.fromarray(rgb(0)).save(tmp_path / "coco" / "train2017" / "000000000009.jpg")
    polygon = [[8.0, 5.0, 30.0, 5.0, 30.0, 20.0, 8.0, 20.0]]
    lvis = {
        "images": [
            {"id": 9, "height": HW[0], "width": HW[1], "coco_url": "http://x/train2017/000000000009.jpg"}
        ],
        "annotations": [
            {"id": 1, "image_id": 9, "category_id": 3, "segmentation": polygon, "bbox": [8, 5, 22, 15]}
        ],
        "categories": [{"id": 3, "name": "thing"}],
    }
    (tmp_path / "lvis" / "lvis_v1_val.json").write_text(json.dumps(lvis))
    dataset = benchmark("lvis_val", tmp_path)
    sample = dataset[0]
    assert sample["image_id"] == 9 and sample["masks"].shape == (1, *HW) and sample["masks"][0, 10, 15]
    assert sample["boxes"].tolist() == [[8, 5, 30, 20]]
    (tmp_path / "lvis" / "lvis_v1_val.json").write_text("{")
    with pytest.raises(Exception, match=r"lvis_v1_val\.json: not valid JSON"):
        benchmark("lvis_val", tmp_path)
