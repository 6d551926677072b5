"""SA-1B (folder) and mask-folder datasets, RLE decoding, the (index, seed) protocol, splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from samtrain.data import (
    BinaryMaskFolder,
    CocoInstanceDataset,
    InstanceMaskFolder,
    RleMasks,
    Sa1bDataset,
    SamDataset,
    SamTransform,
    SemanticMaskFolder,
)
from samtrain.data.rle import decode_rle_string, rle_run_lengths
from samtrain.data.split import split_mask
from tests.data.test_coco import SAMPLE_DIR
from tests.data_builders import (
    make_binary_folder,
    make_instance_folder,
    make_sa1b_folder,
    make_semantic_folder,
    random_boxes_masks,
)

# -- RLE ----------------------------------------------------------------------------------------


def test_rle_string_decoder_matches_pycocotools():
    rng = np.random.default_rng(0)
    for trial in range(40):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        mask = (
            rng.random((h, w)) < rng.random() if trial % 2 else random_boxes_masks(rng, h + 10, w + 10, 1)[0]
        )
        h, w = mask.shape
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        runs = rle_run_lengths(rle, h, w)
        masks = RleMasks([runs], h, w)
        np.testing.assert_array_equal(masks.decode()[0], mask_utils.decode(rle).astype(bool))
        assert masks.areas()[0] == mask_utils.area(rle)
        rows = np.sort(rng.integers(0, h, int(rng.integers(1, 80))))
        cols = np.sort(rng.integers(0, w, int(rng.integers(1, 80))))
        np.testing.assert_array_equal(masks.resample(rows, cols)[0], mask[rows][:, cols])


def test_rle_string_decoder_rejects_garbage():
    with pytest.raises(ValueError, match="outside"):
        decode_rle_string(b"\x01\x02")
    with pytest.raises(ValueError, match="cut short"):
        decode_rle_string(b"0P")  # "P" - 48 = 0x20: "more follows", but nothing does
    with pytest.raises(ValueError, match="covers 6 pixels"):
        rle_run_lengths({"size": [2, 2], "counts": [1, 5]}, 2, 2)


# -- the dataset protocol -------------------------------------------------------------------------


def test_index_seed_tuple_gives_a_pure_function_of_the_seed(tmp_path):
    make_sa1b_folder(tmp_path, range(2), k=4)
    ds = Sa1bDataset(root=tmp_path, transform=SamTransform(image_size=32, train=True, color_jitter=0.3))
    assert isinstance(ds, SamDataset)
    a, b, c = ds[(1, 123)], ds[(1, 123)], ds[(1, 124)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["masks"], b["masks"])
    assert not torch.equal(a["image"], c["image"])
    assert ds[0]["image"].shape == (3, 32, 32)  # a plain index still works


def test_rle_path_equals_decoded_path_for_coco():
    """SamTransform decodes RLE masks straight onto its grid; the result equals the decoded path."""
    ds = CocoInstanceDataset(
        annotation_file=SAMPLE_DIR / "train" / "annotations.json",
        image_dir=SAMPLE_DIR / "train",
        transform=SamTransform(image_size=64, train=True, max_masks=3, color_jitter=0.2),
    )
    for index, seed in [(0, 1), (1, 2), (5, 3)]:
        fast = ds[(index, seed)]
        slow = ds.transform(ds.load_sample(index), rng=np.random.default_rng(seed))
        assert torch.equal(fast["image"], slow["image"]) and torch.equal(fast["masks"], slow["masks"])


# -- SA-1B folder ------------------------------------------------------------------------------


def test_sa1b_folder_masks_equal_pycocotools(tmp_path):
    truth = make_sa1b_folder(tmp_path, [3, 5, 11], k=4)
    ds = Sa1bDataset(root=tmp_path)
    assert len(ds) == 3
    for i in range(len(ds)):
        sample = ds[i]
        expected = truth[sample["image_id"]]
        assert sample["masks"].dtype == bool and sample["image"].dtype == np.uint8
        np.testing.assert_array_equal(sample["masks"], expected["masks"])
    assert sorted(ds[i]["image_id"] for i in range(3)) == [3, 5, 11]


def test_sa1b_folder_split_is_deterministic_and_disjoint(tmp_path):
    make_sa1b_folder(tmp_path, range(20), k=1)
    train = Sa1bDataset(root=tmp_path, split="train", val_fraction=0.3)
    val = Sa1bDataset(root=tmp_path, split="val", val_fraction=0.3)
    assert len(train) + len(val) == 20 and set(train.files).isdisjoint(val.files) and len(val) > 0
    assert list(Sa1bDataset(root=tmp_path, split="val", val_fraction=0.3).files) == list(val.files)


def test_split_does_not_depend_on_listing_order():
    keys = [f"k{i}" for i in range(50)]
    forward = dict(zip(keys, split_mask(keys, "val", 0.2), strict=True))
    backward = dict(zip(keys[::-1], split_mask(keys[::-1], "val", 0.2), strict=True))
    assert forward == backward


# -- mask folders --------------------------------------------------------------------------------


def by_key(ds) -> dict:
    return {ds.key(i): ds[i] for i in range(len(ds))}


@pytest.mark.parametrize("bits", [8, 16])
def test_instance_png_folder(tmp_path, bits):
    truth = make_instance_folder(tmp_path, 3, bits=bits)
    ds = InstanceMaskFolder(image_dir=tmp_path / "images", mask_dir=tmp_path / "masks")
    samples = by_key(ds)
    for key, masks in truth.items():
        np.testing.assert_array_equal(samples[key]["masks"], masks)
    ids = [s["image_id"] for s in samples.values()]
    assert len(set(ids)) == 3
    again = InstanceMaskFolder(image_dir=tmp_path / "images", mask_dir=tmp_path / "masks")
    assert [again[i]["image_id"] for i in range(3)] == [ds[i]["image_id"] for i in range(3)]  # stable


@pytest.mark.parametrize("layout", ["folder", "suffix"])
def test_binary_mask_folder(tmp_path, layout):
    truth = make_binary_folder(tmp_path, 3, layout=layout)
    ds = BinaryMaskFolder(image_dir=tmp_path / "images", mask_dir=tmp_path / "masks", layout=layout)
    for key, sample in by_key(ds).items():
        np.testing.assert_array_equal(sample["masks"], truth[key])


def test_semantic_map_splits_into_components(tmp_path):
    truth = make_semantic_folder(tmp_path, 2)
    ds = SemanticMaskFolder(image_dir=tmp_path / "images", mask_dir=tmp_path / "masks")
    for key, sample in by_key(ds).items():
        np.testing.assert_array_equal(sample["masks"], truth[key])  # class 1: 2 blobs, class 2: 1; no 255
    only_two = SemanticMaskFolder(image_dir=tmp_path / "images", mask_dir=tmp_path / "masks", class_ids=[2])
    assert len(only_two[0]["masks"]) == 1


def test_mask_folder_transform_keeps_masks_aligned(tmp_path):
    """After the train transform each mask still covers pixels of its own (uniform) colour."""
    make_instance_folder(tmp_path, 1)
    ds = InstanceMaskFolder(
        image_dir=tmp_path / "images",
        mask_dir=tmp_path / "masks",
        transform=SamTransform(image_size=64, train=True, scale_range=(0.8, 1.5), max_masks=None),
    )
    raw = ds.load_sample(0)
    image = raw["image"].copy()
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for mask, colour in zip(raw["masks"], colours, strict=True):
        image[mask] = colour
    for seed in range(5):
        out = ds.transform({**raw, "image": image}, rng=np.random.default_rng(seed))
        pixels = out["image"] * torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1) + torch.tensor(
            [123.675, 116.28, 103.53]
        ).view(3, 1, 1)
        for mask in out["masks"]:
            inside = pixels[:, mask]  # every pixel of a mask has one of the object colours
            core = inside[:, (inside.max(0).values > 200) & (inside.min(0).values < 50)]
            assert core.shape[1] >= 0.6 * inside.shape[1]
