"""The embedding cache's key covers everything that changes a sample: every sample-changing option
of every dataset (each declared in SAMPLE_ARGS), the split, and the content of every file read,
rewritten in place with the same size and the mtime kept (as ``cp -p`` / ``rsync -t`` leave it).
Each change rebuilds the cache, and the rebuilt cache serves the new samples."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import IterableDataset

import samtrain.data
from samtrain.data import (
    BinaryMaskFolder,
    CocoInstanceDataset,
    InstanceMaskFolder,
    Sa1bDataset,
    Sa1bTarStream,
    SamDataset,
    SampleError,
    SamTransform,
    SemanticMaskFolder,
)
from samtrain.data.base import constructor_parameters, undeclared_arguments
from samtrain.data.embedding_cache import CachedEmbeddingDataset, ensure_embedding_cache
from samtrain.models import build_sam
from tests.data_builders import make_sa1b_folder, make_sa1b_tar

H, W, N = 32, 48, 6  # image height, width and count of every tiny dataset here


# -- the declarations ---------------------------------------------------------------------------


def dataset_classes() -> list[type]:
    """Every dataset class defined in samtrain.data: SamDataset subclasses and declared streams."""
    found = {}
    for info in pkgutil.walk_packages(samtrain.data.__path__, "samtrain.data."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            declared_stream = issubclass(cls, IterableDataset) and "SAMPLE_ARGS" in vars(cls)
            dataset = (issubclass(cls, SamDataset) and cls is not SamDataset) or declared_stream
            if dataset and cls.__module__ == module.__name__:
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return [found[name] for name in sorted(found)]


def test_every_dataset_declares_exactly_its_constructor_arguments():
    classes = dataset_classes()
    names = {cls.__name__ for cls in classes}
    assert {"CocoInstanceDataset", "Sa1bDataset", "Sa1bTarStream", "SemanticMaskFolder"} <= names
    for cls in classes:
        assert undeclared_arguments(cls) == [], cls
        assert sorted(cls.SAMPLE_ARGS + cls.NON_SAMPLE_ARGS) == sorted(constructor_parameters(cls)), cls
        assert cls.source_files is not SamDataset.source_files, f"{cls} lists no source files"


def test_an_undeclared_option_is_refused(tmp_path):
    class WithNewOption(SemanticMaskFolder):
        def __init__(self, *, new_option: int = 0, **kwargs) -> None:
            super().__init__(**kwargs)
            self.new_option = new_option

    assert undeclared_arguments(WithNewOption) == ["new_option is not declared"]
    root = make_data(tmp_path)
    dataset = WithNewOption(image_dir=root / "images", mask_dir=root / "sem", transform=transform())
    with pytest.raises(ValueError, match="new_option is not declared"):
        ensure_embedding_cache(dataset, net(), tmp_path / "c")


# -- tiny datasets written so that every option changes the samples ------------------------------


def save_png(path: Path, array: np.ndarray) -> None:
    """Uncompressed PNG: its size depends on the image's shape only, so a rewrite keeps it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=0)


def labels_of(i: int) -> np.ndarray:
    """A class map: class 1 twice (two blobs touching at a corner: one object with 8-connectivity,
    two with 4), class 2 a 4x4 square, 255 a strip; image 5 has a class 7 pixel block."""
    labels = np.zeros((H, W), np.uint8)
    labels[2:10, 2:10] = 1
    labels[10:18, 10:18] = 1
    labels[20:24, 30 + i : 34 + i] = 2
    labels[:, W - 3 :] = 255
    if i == 5:
        labels[25:28, 2:5] = 7
    return labels


def polygon(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]]


def coco_json(shift: int = 0) -> dict:
    images = [{"id": i + 1, "file_name": f"img{i}.png", "height": H, "width": W} for i in range(N)]
    anns = []
    for i in range(N):
        boxes = [
            (1, 0, (10 + shift, 4, 30, 20)),
            (2, 0, (2, 2, 9, 9)),
            (2, 1, (30, 22, 46, 30)),
            (1, 0, (40, 2, 43, 5)),
        ]
        for j, (category, crowd, box) in enumerate(boxes):
            anns.append(
                {
                    "id": 10 * i + j + 1,
                    "image_id": i + 1,
                    "category_id": category,
                    "iscrowd": crowd,
                    "segmentation": polygon(*box),
                    "area": 1.0,
                    "bbox": [0, 0, 1, 1],
                }
            )
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    return {"images": images, "annotations": anns, "categories": categories}


def make_data(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(N):
        name = f"img{i}.png"
        save_png(root / "images" / name, rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        save_png(root / "images_b" / name, rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        labels = labels_of(i)
        save_png(root / "sem" / name, labels)
        save_png(root / "sem_b" / name, np.where(labels == 2, 0, labels).astype(np.uint8))
        save_png(root / "sem" / f"img{i}_alt.png", np.where(labels == 1, 3, labels).astype(np.uint8))
        ids = np.zeros((H, W), np.uint8)
        ids[2:12, 2:12], ids[15:25, 20:40], ids[28:31, 2:5], ids[:, W - 3 :] = 1, 2, 3, 255
        save_png(root / "inst" / name, ids)
        save_png(root / "inst" / f"img{i}_alt.png", np.where(ids == 2, 0, ids).astype(np.uint8))
        save_png(root / "inst_b" / name, np.where(ids == 1, 0, ids).astype(np.uint8))
        square = np.zeros((H, W), np.uint8)
        square[4:20, 4:20] = 255
        small = np.zeros((H, W), np.uint8)
        small[25:28, 30:33] = 255
        save_png(root / "bin" / f"img{i}" / "0.png", square)
        save_png(root / "bin" / f"img{i}" / "1.png", small)
        save_png(root / "bin" / f"img{i}_0.png", small)
        save_png(root / "bin_b" / f"img{i}" / "0.png", small)
    (root / "coco.json").write_text(json.dumps(coco_json()))
    (root / "coco_b.json").write_text(json.dumps(coco_json(shift=5)))
    make_sa1b_folder(root / "sa1b", range(N), h=H, w=W)
    make_sa1b_folder(root / "sa1b_b", range(N), h=H, w=W, seed=1)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"))


def transform() -> SamTransform:
    return SamTransform(image_size=64, train=False, max_masks=None)


def base_args(kind: str, root: Path) -> dict:
    split = {"split": "train", "val_fraction": 0.5, "split_seed": 2}  # 4 of the 6 images
    return {
        "coco": {"annotation_file": root / "coco.json", "image_dir": root / "images", **split},
        "semantic": {"image_dir": root / "images", "mask_dir": root / "sem", **split},
        "instance": {"image_dir": root / "images", "mask_dir": root / "inst", **split},
        "binary": {"image_dir": root / "images", "mask_dir": root / "bin", **split},
        "sa1b": {"root": root / "sa1b", **split},
    }[kind]


CLASSES = {
    "coco": CocoInstanceDataset,
    "semantic": SemanticMaskFolder,
    "instance": InstanceMaskFolder,
    "binary": BinaryMaskFolder,
    "sa1b": Sa1bDataset,
}


def make(kind: str, data_root: Path, **changes):
    return CLASSES[kind](**{**base_args(kind, data_root), **changes}, transform=transform())


def another_split_seed(kind: str, root: Path) -> int:
    """A split seed that keeps the number of training images but changes which ones."""
    base = make(kind, root)
    for seed in range(1, 100):
        other = make(kind, root, split_seed=seed)
        if len(other) == len(base) and [other.sample_name(i) for i in range(len(other))] != [
            base.sample_name(i) for i in range(len(base))
        ]:
            return seed
    raise AssertionError("no such seed")


# kind -> option -> the new value (a function of the data root); every SAMPLE_ARGS entry is here.
CHANGES = {
    "coco": {
        "annotation_file": lambda r: r / "coco_b.json",
        "image_dir": lambda r: r / "images_b",
        "category_ids": lambda r: [1],
        "include_crowd": lambda r: True,
        "min_mask_area": lambda r: 20,
        "split": lambda r: "val",
        "val_fraction": lambda r: 0.2,
        "split_seed": "another",
    },
    "semantic": {
        "image_dir": lambda r: r / "images_b",
        "mask_dir": lambda r: r / "sem_b",
        "mask_suffix": lambda r: "_alt.png",
        "background": lambda r: 2,
        "ignore_index": lambda r: None,
        "num_classes": lambda r: 5,
        "class_ids": lambda r: [2],
        "connectivity": lambda r: 4,
        "min_mask_area": lambda r: 20,
        "split": lambda r: "val",
        "val_fraction": lambda r: 0.2,
        "split_seed": "another",
    },
    "instance": {
        "image_dir": lambda r: r / "images_b",
        "mask_dir": lambda r: r / "inst_b",
        "mask_suffix": lambda r: "_alt.png",
        "ignore_values": lambda r: [255],
        "min_mask_area": lambda r: 20,
        "split": lambda r: "val",
        "val_fraction": lambda r: 0.2,
        "split_seed": "another",
    },
    "binary": {
        "image_dir": lambda r: r / "images_b",
        "mask_dir": lambda r: r / "bin_b",
        "layout": lambda r: "suffix",
        "min_mask_area": lambda r: 20,
        "split": lambda r: "val",
        "val_fraction": lambda r: 0.2,
        "split_seed": "another",
    },
    "sa1b": {
        "root": lambda r: r / "sa1b_b",
        "min_mask_area": lambda r: 150,
        "split": lambda r: "val",
        "val_fraction": lambda r: 0.2,
        "split_seed": "another",
    },
}


def test_every_sample_argument_has_a_change_test():
    for kind, cls in CLASSES.items():
        assert set(cls.SAMPLE_ARGS) == set(CHANGES[kind]), kind


@pytest.fixture(scope="module")
def encoder_net():
    return net()


def net():
    """SAM at 64 px whose image encoder is one patchifying convolution: (B, 3, 64, 64) -> (B, 256,
    4, 4), as the cache expects of an encoder, and cheap enough to run in every case here."""
    torch.manual_seed(0)
    model = build_sam("vit_t", image_size=64).eval()
    model.image_encoder = torch.nn.Conv2d(3, 256, kernel_size=16, stride=16)
    return model


class EncodedImages:
    """Counts the images the encoder encodes."""

    def __init__(self, model) -> None:
        self.count = 0
        self.handle = model.image_encoder.register_forward_hook(self.hook)

    def hook(self, module, args, output) -> None:
        self.count += len(args[0])


def item(dataset, index: int) -> dict | None:
    try:
        return dataset[index]
    except SampleError:
        return None


def assert_serves(cache: CachedEmbeddingDataset, dataset, model) -> None:
    """The cache holds exactly ``dataset``'s samples: masks, ids, sizes and the embedding."""
    assert len(cache) == len(dataset)
    for i in range(len(dataset)):
        expected, cached = item(dataset, i), item(cache, i)
        assert (expected is None) == (cached is None), i
        if expected is None:
            continue
        assert torch.equal(cached["masks"], expected["masks"]), i
        assert cached["image_id"] == expected["image_id"]
        assert torch.equal(cached["input_size"], expected["input_size"])
        with torch.no_grad():
            embedding = model.image_encoder(expected["image"][None])[0]
        torch.testing.assert_close(cached["image_embedding"], embedding, atol=1e-5, rtol=1e-5)


def signature(dataset) -> list:
    """What the samples hold, to check that a change changes them."""
    out = []
    for i in range(len(dataset)):
        sample = item(dataset, i)
        out.append(None if sample is None else (sample["image_id"], sample["masks"], sample["image"]))
    return out


def differ(a: list, b: list) -> bool:
    if len(a) != len(b):
        return True
    for x, y in zip(a, b, strict=True):
        if (x is None) != (y is None):
            return True
        if x is not None and (x[0] != y[0] or x[1].shape != y[1].shape or not torch.equal(x[1], y[1])):
            return True
        if x is not None and not torch.equal(x[2], y[2]):
            return True
    return False


@pytest.mark.parametrize(
    ("kind", "option"), [(kind, option) for kind, options in CHANGES.items() for option in options]
)
def test_each_option_rebuilds_and_serves_the_new_samples(data, encoder_net, tmp_path, caplog, kind, option):
    change = CHANGES[kind][option]
    value = another_split_seed(kind, data) if change == "another" else change(data)
    before, after = make(kind, data), make(kind, data, **{option: value})
    assert differ(signature(before), signature(after)), "the change must change the samples"
    folder = tmp_path / "cache"
    ensure_embedding_cache(before, encoder_net, folder, dtype="float32")
    encoded = EncodedImages(encoder_net)
    caplog.set_level("WARNING", logger="samtrain.data.embedding_cache")
    ensure_embedding_cache(after, encoder_net, folder, dtype="float32")
    encoded.handle.remove()
    assert encoded.count > 0 and "rebuilding" in caplog.text
    assert option in caplog.text or "files" in caplog.text  # the log says what changed
    assert_serves(CachedEmbeddingDataset(folder), after, encoder_net)


# -- files rewritten in place -------------------------------------------------------------------


def rewrite_keeping_size_and_mtime(path: Path, write) -> None:
    """Rewrite ``path`` in place as ``cp -p`` would: same size, the old mtime put back."""
    st = path.stat()
    write(path)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns


def other_pixels(path: Path) -> None:
    array = np.asarray(Image.open(path)).copy()
    array[: H // 2] = 255 - array[: H // 2]
    save_png(path, array)


def other_labels(path: Path) -> None:
    array = np.asarray(Image.open(path)).copy()
    array[array == 2] = 0
    save_png(path, array)


def shifted_polygon(path: Path) -> None:
    text = path.read_text()
    assert "[[10.0, 4.0, 30.0, 4.0, 30.0, 20.0, 10.0, 20.0]]" in text
    path.write_text(
        text.replace("[[10.0, 4.0, 30.0, 4.0", "[[20.0, 4.0, 30.0, 4.0").replace(
            "30.0, 20.0, 10.0, 20.0]]", "30.0, 20.0, 20.0, 20.0]]"
        )
    )


FILE_CASES = {
    "image": ("semantic", "images/img1.png", other_pixels, 1),
    "mask": ("semantic", "sem/img1.png", other_labels, 1),
    "coco image": ("coco", "images/img1.png", other_pixels, 1),
    "annotation": ("coco", "coco.json", shifted_polygon, N),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_a_file_rewritten_in_place_rebuilds_its_entries(tmp_path, encoder_net, caplog, case):
    kind, name, rewrite, encoded_after = FILE_CASES[case]
    root = make_data(tmp_path / "data")
    folder = tmp_path / "cache"
    dataset = make(kind, root, split=None)
    ensure_embedding_cache(dataset, encoder_net, folder, dtype="float32")
    old = signature(dataset)
    rewrite_keeping_size_and_mtime(root / name, rewrite)
    dataset = make(kind, root, split=None)
    assert differ(old, signature(dataset))
    encoded = EncodedImages(encoder_net)
    caplog.set_level("WARNING", logger="samtrain.data.embedding_cache")
    ensure_embedding_cache(dataset, encoder_net, folder, dtype="float32")
    encoded.handle.remove()
    assert encoded.count == encoded_after  # a per-item file re-encodes its item only
    assert f"1 changed ({root / name})" in caplog.text
    assert_serves(CachedEmbeddingDataset(folder), dataset, encoder_net)


def test_touched_or_copied_files_with_the_same_content_are_reused(tmp_path, encoder_net, caplog):
    root = make_data(tmp_path / "data")
    folder = tmp_path / "cache"
    dataset = make("semantic", root, split=None)
    ensure_embedding_cache(dataset, encoder_net, folder, dtype="float32")
    image, mask = root / "images" / "img2.png", root / "sem" / "img2.png"
    os.utime(image, ns=(0, 10**18))  # touched
    mask.write_bytes(mask.read_bytes())  # rewritten with the same bytes
    encoded = EncodedImages(encoder_net)
    caplog.set_level("INFO", logger="samtrain.data.embedding_cache")
    ensure_embedding_cache(dataset, encoder_net, folder, dtype="float32")
    assert encoded.count == 0 and "up to date, reused" in caplog.text
    stored = json.loads((folder / "sources.json").read_text())["files"]
    assert stored[str(image)]["stat"][1] == 10**18  # the new stats are kept: no hashing next time
    encoded.handle.remove()


def test_a_stream_is_refused_with_the_way_out(tmp_path, encoder_net):
    make_sa1b_tar(tmp_path / "shard.tar", range(2))
    stream = Sa1bTarStream(shards=tmp_path / "shard.tar", transform=transform())
    assert stream.source_files() == [tmp_path / "shard.tar"]
    with pytest.raises(ValueError, match="Sa1bDataset"):
        ensure_embedding_cache(stream, encoder_net, tmp_path / "c")
