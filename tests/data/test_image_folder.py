"""ImageFolderDataset and MaeDataModule (unlabeled images for MAE)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from samtrain.data.image_folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    MaeDataModule,
    find_images,
)

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "train"


def write_image(path: Path, value: int = 128, size=(40, 50), channels: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (*size, channels) if channels > 1 else size
    rng = np.random.default_rng(value)
    assert cv2.imwrite(str(path), rng.integers(0, 256, shape, dtype=np.uint8))
    return path


def test_finds_images_recursively_case_insensitive(tmp_path):
    write_image(tmp_path / "a.jpg")
    write_image(tmp_path / "sub" / "deeper" / "b.PNG")
    write_image(tmp_path / "c.Tiff")
    write_image(tmp_path / "d.bmp", channels=1)  # grayscale becomes RGB
    (tmp_path / "notes.txt").write_text("not an image")
    files = find_images(tmp_path)
    assert [f.name for f in files] == ["a.jpg", "c.Tiff", "d.bmp", "b.PNG"]
    ds = ImageFolderDataset(root=tmp_path, image_size=32)
    assert len(ds) == 4
    for i in range(4):
        x = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_eval_transform_is_deterministic_and_imagenet_normalised(tmp_path):
    path = tmp_path / "flat.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((30, 60, 3), 255, np.uint8))
    ds = ImageFolderDataset(root=tmp_path, image_size=32, train=False)
    x = ds[0]
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x.mean((1, 2)), expected, atol=1e-4)
    assert torch.equal(ds[0], x)


def test_train_augmentation_varies(tmp_path):
    ds = ImageFolderDataset(root=SAMPLE, image_size=32, train=True)
    torch.manual_seed(0)
    assert not torch.equal(ds[0], ds[0])


def test_empty_or_missing_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolderDataset(root=tmp_path / "empty", image_size=32)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(root=tmp_path / "missing", image_size=32)


def test_datamodule_split_and_loaders(tmp_path):
    dm = MaeDataModule(root=SAMPLE, image_size=32, batch_size=4, val_fraction=0.1, seed=0)
    train, val = dm.train_dataset.files, dm.val_dataset.files
    assert val and not set(train) & set(val) and len(train) + len(val) == len(find_images(SAMPLE))
    again = MaeDataModule(root=SAMPLE, image_size=32, batch_size=4, val_fraction=0.1)
    assert again.val_dataset.files == val  # deterministic split
    loader = dm.train_dataloader()
    assert isinstance(loader, StatefulDataLoader) and loader.drop_last
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["num_skipped"] == 0
    assert not dm.val_dataset.train and next(iter(dm.val_dataloader()))["image"].shape[1:] == (3, 32, 32)
    separate = MaeDataModule(root=SAMPLE, val_root=SAMPLE.parent / "val", image_size=32, batch_size=2)
    assert len(separate.train_dataset) == len(find_images(SAMPLE))
    assert separate.val_dataset.files == find_images(SAMPLE.parent / "val")
