"""MAE's image folders: sharding over ranks, the stable split, unreadable images skipped and counted."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from samtrain.data.errors import SampleError
from samtrain.data.image_folder import ImageFolderDataset, MaeDataModule
from samtrain.data.image_io import find_images
from samtrain.data.sampler import SeededShardSampler
from tests.conftest import as_rank

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "train"


def write_image(path: Path, value: int = 0, size=(40, 50)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.random.default_rng(value).integers(0, 256, (*size, 3), dtype=np.uint8))
    return path


def image_folder(root: Path, n: int) -> Path:
    for i in range(n):
        write_image(root / f"{i:03d}.png", value=i)
    return root


def loader_on_rank(dm: MaeDataModule, rank: int, world_size: int, *, train: bool):
    dm.trainer = SimpleNamespace(training=True, strategy=None)
    with as_rank(rank, world_size):
        return dm._loader(dm.train_dataset if train else dm.val_dataset, train=train)


def rank_indices(dm: MaeDataModule, world_size: int, *, train: bool, epoch: int = 0) -> list[list[int]]:
    shares = []
    for rank in range(world_size):
        loader = loader_on_rank(dm, rank, world_size, train=train)
        assert isinstance(loader.sampler, SeededShardSampler)
        loader.sampler.set_epoch(epoch)
        shares.append([index for index, _ in loader.sampler])
    return shares


def test_find_images_is_shared_recursive_and_case_insensitive(tmp_path):
    for name in ("a.jpg", "sub/deeper/b.PNG", "c.Tiff", "a.b.webp"):
        write_image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    names = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert names == ["a.b.webp", "a.jpg", "c.Tiff", "sub/deeper/b.PNG"]  # sorted by relative path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        find_images(tmp_path / "empty")


def test_ranks_get_disjoint_shares_that_cover_the_dataset_and_reshuffle(tmp_path):
    root = image_folder(tmp_path / "train", 10)
    dm = MaeDataModule(
        root=root, val_root=image_folder(tmp_path / "val", 7), image_size=32, batch_size=2, seed=0
    )
    ranks = rank_indices(dm, 2, train=True)
    assert len(ranks[0]) == len(ranks[1]) == 5 and not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == list(range(10))
    assert rank_indices(dm, 2, train=True, epoch=1) != ranks  # a new permutation every epoch
    val = rank_indices(dm, 2, train=False)
    assert not set(val[0]) & set(val[1]) and sorted(val[0] + val[1]) == list(range(7))  # every image once
    assert rank_indices(dm, 2, train=False, epoch=3) == val
    single = loader_on_rank(dm, 0, 1, train=True)
    assert len(single) == 5 and len(loader_on_rank(dm, 1, 2, train=True)) == 2  # batches per rank


def test_augmentation_is_a_function_of_the_sample_seed():
    ds = ImageFolderDataset(root=SAMPLE, image_size=32, train=True)
    assert torch.equal(ds[(3, 11)], ds[(3, 11)])
    assert not torch.equal(ds[(3, 11)], ds[(3, 12)])
    torch.manual_seed(0)
    assert not torch.equal(ds[3], ds[3])  # without a seed: the process's own stream
    fresh = ImageFolderDataset(root=SAMPLE, image_size=32, train=True)
    first = fresh[3]
    fresh[(3, 11)]  # a seeded call in between must not restart the process's stream (a replay)
    assert not torch.equal(fresh[3], first)


def test_hyperparameters_hold_plain_paths_for_weights_only_checkpoints(tmp_path):
    dm = MaeDataModule(root=SAMPLE, val_root=SAMPLE.parent / "val", image_size=32)
    assert dm.hparams["root"] == str(SAMPLE) and dm.hparams["val_root"] == str(SAMPLE.parent / "val")
    torch.save({"hparams": dict(dm.hparams)}, tmp_path / "h.ckpt")
    assert torch.load(tmp_path / "h.ckpt", weights_only=True)["hparams"]["root"] == str(SAMPLE)


def test_split_is_stable_when_files_are_added(tmp_path):
    root = image_folder(tmp_path, 40)
    train, val = MaeDataModule.split(root, 0.25, seed=0)
    assert train and val and not set(train) & set(val) and len(train) + len(val) == 40
    for i in range(40, 60):
        write_image(root / f"{i:03d}.png", value=i)
    train2, val2 = MaeDataModule.split(root, 0.25, seed=0)
    assert set(val) <= set(val2) and set(train) <= set(train2)  # no old file changed sides
    assert MaeDataModule.split(root, 0.25, seed=1)[1] != val2  # split_seed picks another split
    dm = MaeDataModule(root=root, image_size=32, val_fraction=0.25)
    assert dm.val_dataset.files == val2 and dm.train_dataset.files == train2


def test_split_that_leaves_a_side_empty_is_an_error(tmp_path):
    root = image_folder(tmp_path, 2)
    with pytest.raises(ValueError, match=r"none of its 2 images falls in the val split.*val_root"):
        MaeDataModule.split(root, 0.0, seed=0)


def test_corrupt_image_is_skipped_logged_and_counted(tmp_path, caplog):
    root = image_folder(tmp_path, 3)
    (root / "001.png").write_bytes(b"this is not a png")
    ds = ImageFolderDataset(root=root, image_size=32, train=False)
    with pytest.raises(SampleError, match=r"001\.png"):
        ds[1]  # never silently another image
    dm = MaeDataModule(root=root, val_root=root, image_size=32, batch_size=3, seed=0)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(dm.val_dataloader()))
    assert batch["num_skipped"] == 1 and batch["image"].shape == (2, 3, 32, 32)
    assert "001.png" in caplog.text


def test_a_bug_while_reading_propagates(tmp_path, monkeypatch):
    root = image_folder(tmp_path, 2)
    dm = MaeDataModule(root=root, val_root=root, image_size=32, batch_size=2, seed=0)

    def broken(**kwargs):
        raise TypeError("a bug in the transform")

    monkeypatch.setattr(dm.val_dataset, "transform", broken)
    with pytest.raises(TypeError, match="a bug"):
        next(iter(dm.val_dataloader()))
