"""Sa1bTarStream: streamed SA-1B shards, split over ranks and workers, every sample once per epoch."""

from __future__ import annotations

import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from samtrain.data import Sa1bTarStream, SamTransform, collate_sam_batch
from samtrain.data.sa1b import consumer_plan
from tests.data_builders import add_member, make_sa1b_tar, sa1b_files

SMALL = {"h": 16, "w": 20, "k": 1}


def ids_of(item) -> int:
    return item["image_id"]


def stream_ids(stream: Sa1bTarStream, num_workers: int) -> list[int]:
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=ids_of)
    return list(loader)


def shards(tmp_path, sizes: list[int]) -> list[str]:
    paths, start = [], 0
    for n, size in enumerate(sizes):
        path = tmp_path / f"sa_{n:06d}.tar"
        make_sa1b_tar(path, range(start, start + size), **SMALL)
        paths.append(str(path))
        start += size
    return paths


def test_stream_masks_equal_pycocotools_in_either_member_order(tmp_path):
    truth = make_sa1b_tar(tmp_path / "a.tar", range(3), k=3)
    truth |= make_sa1b_tar(tmp_path / "b.tar", range(3, 5), k=2, json_first=True)
    samples = list(Sa1bTarStream(shards=tmp_path, shuffle_shards=False))
    assert [s["image_id"] for s in samples] == [0, 1, 2, 3, 4]
    for sample in samples:
        np.testing.assert_array_equal(sample["masks"], truth[sample["image_id"]]["masks"])


@pytest.mark.parametrize("sizes", [[3, 2, 4, 3], [11], [5, 4, 3]], ids=["shards", "samples", "mixed"])
def test_two_ranks_two_workers_see_every_sample_exactly_once(tmp_path, sizes):
    paths = shards(tmp_path, sizes)
    seen = Counter()
    for rank in range(2):
        stream = Sa1bTarStream(shards=paths, rank=rank, world_size=2, even=False, seed=3)
        seen.update(stream_ids(stream, num_workers=2))
    assert seen == Counter(range(sum(sizes)))


def test_even_split_gives_every_consumer_the_same_count(tmp_path):
    paths = shards(tmp_path, [5, 4, 3])
    per_rank = []
    for rank in range(2):
        stream = Sa1bTarStream(shards=paths, rank=rank, world_size=2, seed=3)  # even by default (world 2)
        per_rank.append(stream_ids(stream, num_workers=2))
    assert len(per_rank[0]) == len(per_rank[1])
    everything = per_rank[0] + per_rank[1]
    assert len(set(everything)) == len(everything)  # never a sample twice


def test_consumer_plan_covers_every_sample_once():
    for n_shards in range(1, 7):
        for world in (1, 2, 3):
            for workers in (1, 2, 4):
                owners = Counter()
                for rank in range(world):
                    for worker in range(workers):
                        mine, stride, offset = consumer_plan(
                            list(range(n_shards)), rank, world, worker, workers
                        )
                        # 5 samples per shard, running index over the consumer's shards
                        owners.update(
                            (s, g)
                            for i, s in enumerate(mine)
                            for g in range(5)
                            if (5 * i + g) % stride == offset
                        )
                assert owners == Counter((s, g) for s in range(n_shards) for g in range(5))


def test_set_epoch_changes_the_order_and_the_augmentation(tmp_path):
    paths = shards(tmp_path, [2, 2, 2, 2])
    stream = Sa1bTarStream(shards=paths, seed=0)
    stream.set_epoch(0)
    first = [s["image_id"] for s in stream]
    stream.set_epoch(0)
    assert [s["image_id"] for s in stream] == first
    orders = set()
    for epoch in range(1, 6):
        stream.set_epoch(epoch)
        orders.add(tuple(s["image_id"] for s in stream))
    assert len(orders) > 1 and all(sorted(o) == sorted(first) for o in orders)


def test_augmentation_depends_on_seed_epoch_and_key_not_on_the_split(tmp_path):
    paths = shards(tmp_path, [3, 3])
    transform = SamTransform(image_size=16, train=True, color_jitter=0.3, scale_range=(0.5, 1.5))
    single = {s["image_id"]: s for s in Sa1bTarStream(shards=paths, transform=transform, seed=5)}
    for rank in range(2):
        stream = Sa1bTarStream(shards=paths, transform=transform, seed=5, rank=rank, world_size=2, even=False)
        for sample in stream:
            assert torch.equal(sample["image"], single[sample["image_id"]]["image"])
            assert torch.equal(sample["masks"], single[sample["image_id"]]["masks"])


def test_state_dict_resumes_mid_epoch(tmp_path):
    paths = shards(tmp_path, [4, 3])
    stream = Sa1bTarStream(shards=paths, seed=1)
    stream.set_epoch(2)
    iterator = iter(stream)
    head = [next(iterator)["image_id"] for _ in range(3)]
    state = stream.state_dict()
    rest = [s["image_id"] for s in iterator]
    resumed = Sa1bTarStream(shards=paths, seed=1)
    resumed.load_state_dict(state)
    assert [s["image_id"] for s in resumed] == rest and len(head + rest) == 7


def test_bad_members_are_skipped_named_and_counted(tmp_path, caplog):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        jpg, js, _ = sa1b_files(0, **SMALL)
        add_member(tar, "sa_0.jpg", jpg)
        add_member(tar, "sa_0.json", js)
        add_member(tar, "sa_1.jpg", b"\xff\xd8 not a jpeg \xff\xd9")
        add_member(tar, "sa_1.json", sa1b_files(1, **SMALL)[1])
        add_member(tar, "sa_2.jpg", sa1b_files(2, **SMALL)[0])  # no json
        add_member(tar, "sa_3.jpg", sa1b_files(3, **SMALL)[0])
        add_member(tar, "sa_3.json", b'{"image": {"image_id": 3, "wid')
    stream = Sa1bTarStream(shards=path, transform=SamTransform(image_size=16))
    with caplog.at_level(logging.WARNING):
        batch = collate_sam_batch(list(stream))
    assert batch["num_skipped"] == 3 and batch["image_id"].tolist() == [0]
    assert "bad.tar:sa_1.jpg: cannot decode image" in caplog.text
    assert "bad.tar:sa_2: sample has no .json member" in caplog.text
    assert "bad.tar:sa_3.json: annotation JSON does not parse" in caplog.text


def test_damaged_tar_ends_the_shard_with_a_skipped_sample(tmp_path, caplog):
    good = shards(tmp_path, [3])[0]
    cut = tmp_path / "cut.tar"
    data = Path(good).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        items = list(Sa1bTarStream(shards=[cut], shuffle_shards=False))
    assert items[-1] is None and all(i is not None for i in items[:-1])
    assert "cut.tar" in caplog.text


def test_dataset_level_errors_fail_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.tar"):
        Sa1bTarStream(shards=tmp_path / "nope.tar")
    with pytest.raises(FileNotFoundError, match=r"holds no \.tar"):
        Sa1bTarStream(shards=tmp_path)
    (tmp_path / "x.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(ValueError, match=r"x\.tar is not a tar file"):
        Sa1bTarStream(shards=tmp_path / "x.tar")


def test_validation_stream_keeps_each_images_mask_subset_every_epoch_and_seed(tmp_path):
    """The stream seeds each sample by (seed, epoch, key); the eval transform must not let that
    change which of an image's masks are scored."""
    make_sa1b_tar(tmp_path / "sa_000000.tar", range(3), k=6)

    def masks(seed: int, epoch: int) -> dict[int, torch.Tensor]:
        transform = SamTransform(image_size=32, max_masks=2, max_mask_fraction=1.0)
        stream = Sa1bTarStream(shards=tmp_path, transform=transform, seed=seed, shuffle_shards=False)
        stream.set_epoch(epoch)
        return {s["image_id"]: s["masks"] for s in stream}

    first = masks(seed=0, epoch=0)
    assert all(len(m) == 2 for m in first.values())
    for seed, epoch in [(0, 1), (0, 4), (9, 0)]:
        again = masks(seed, epoch)
        assert again.keys() == first.keys()
        assert all(torch.equal(again[i], first[i]) for i in first), (seed, epoch)
