"""Unreadable samples are skipped, named in the log and counted over all ranks; past a budget the run
stops, on every rank at once."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.strategies import DDPStrategy

from samtrain.commands.train import train
from samtrain.data import SampleError, SkipBadSamples, collate_sam_batch
from samtrain.lightning.callbacks import SkippedSamplesBudget
from tests.conftest import ROOT


def sample(k: int) -> dict:
    return {
        "image": torch.zeros(3, 8, 8),
        "masks": torch.ones(k, 8, 8, dtype=torch.bool),
        "input_size": (8, 8),
        "original_size": (8, 8),
        "image_id": k,
    }


class HalfBroken(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        if index % 2:
            raise SampleError(f"images/{index}.jpg", "image file is truncated")
        return sample(index + 1)


def test_bad_samples_become_none_and_are_named(caplog):
    dataset = SkipBadSamples(HalfBroken())
    with caplog.at_level(logging.WARNING):
        items = [dataset[i] for i in range(4)]
    assert [item is None for item in items] == [False, True, False, True]
    assert "images/1.jpg: image file is truncated" in caplog.text


def test_bugs_are_not_swallowed():
    class Buggy(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            raise KeyError("a bug, not bad data")

    with pytest.raises(KeyError):
        SkipBadSamples(Buggy())[0]


def test_collate_drops_and_counts():
    batch = collate_sam_batch([sample(2), None, sample(1)])
    assert batch["image"].shape[0] == 2 and batch["num_skipped"] == 1
    assert batch["mask_image_index"].tolist() == [0, 0, 1]
    assert collate_sam_batch([None, None]) == {"num_skipped": 2}


class LogRecorder:
    """What a LightningModule's ``log`` was called with."""

    def __init__(self):
        self.logged = []

    def log(self, name, value, **kwargs):
        self.logged.append((name, value))


def fake_trainer(world_size: int = 1, reduce=None) -> SimpleNamespace:
    strategy = SimpleNamespace(root_device=torch.device("cpu"), reduce=reduce)
    return SimpleNamespace(world_size=world_size, strategy=strategy)


def test_budget_stops_the_run_with_a_clear_error():
    budget, module = SkippedSamplesBudget(max_skipped=2), LogRecorder()
    budget.on_train_batch_start(fake_trainer(), module, {"num_skipped": 2}, 0)
    budget.on_train_batch_start(fake_trainer(), module, {"image": None}, 1)  # nothing skipped
    with pytest.raises(RuntimeError, match=r"3 training samples could not be read.*budget of 2"):
        budget.on_train_batch_start(fake_trainer(), module, {"num_skipped": 1}, 2)
    assert module.logged == [("data/skipped_train", 2.0), ("data/skipped_train", 3.0)]


def test_budget_counts_over_all_ranks():
    calls = []

    def reduce(tensor, reduce_op):  # two ranks: the other one skipped 3 samples at every batch
        calls.append(reduce_op)
        return tensor + 3

    budget, module = SkippedSamplesBudget(max_skipped=5), LogRecorder()
    trainer = fake_trainer(world_size=2, reduce=reduce)
    budget.on_train_batch_start(trainer, module, {"image": None}, 0)  # reduced although 0 here
    with pytest.raises(RuntimeError, match="7 training samples"):
        budget.on_train_batch_start(trainer, module, {"num_skipped": 1}, 1)
    assert calls == ["sum", "sum"]
    assert module.logged == [("data/skipped_train", 3.0), ("data/skipped_train", 7.0)]
    assert budget.state_dict() == {"train": 7}  # the run-wide count: the same on every rank

    budget.on_validation_epoch_start(trainer, module)
    budget.on_validation_batch_start(trainer, module, {"num_skipped": 2}, 0)
    budget.on_validation_epoch_end(trainer, module)
    assert module.logged[-1] == ("data/skipped_val", 5.0) and calls == ["sum"] * 3


def _budget_on_rank(rank: int, init_file: str, results: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        trainer = fake_trainer(world_size=2, reduce=DDPStrategy().reduce)
        budget = SkippedSamplesBudget(max_skipped=2)
        for step in range(4):  # only rank 0 meets unreadable samples: 2 per batch
            try:
                budget.on_train_batch_start(trainer, LogRecorder(), {"num_skipped": 2 * (rank == 0)}, step)
            except RuntimeError:
                break
        Path(results, str(rank)).write_text(f"{step} {budget.skipped_train}")
    finally:
        torch.distributed.destroy_process_group()


def test_every_rank_stops_at_the_same_step(tmp_path):
    """Before the counts were reduced, rank 0 raised alone and rank 1 waited for it forever."""
    torch.multiprocessing.spawn(_budget_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    assert [(tmp_path / str(rank)).read_text() for rank in (0, 1)] == ["1 4", "1 4"]


@pytest.fixture
def damaged_sample_data(tmp_path):
    """A copy of the sample train split with one corrupt and one missing image."""
    root = tmp_path / "damaged"
    shutil.copytree(ROOT / "data" / "sample" / "train", root)
    images = json.loads((root / "annotations.json").read_text())["images"]
    (root / images[0]["file_name"]).write_bytes(b"\xff\xd8 not really a jpeg")
    (root / images[1]["file_name"]).unlink()
    return root


def test_training_survives_bad_files(tiny_cfg, damaged_sample_data, tmp_path):
    overrides = [
        f"data.train_dataset.annotation_file={damaged_sample_data / 'annotations.json'}",
        f"data.train_dataset.image_dir={damaged_sample_data}",
        "trainer.limit_train_batches=1.0",  # the whole epoch meets both broken files
        "validate_before=false",
    ]
    train(tiny_cfg(*overrides))
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("data/skipped_train")
    counts = [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
    assert max(counts) == 2


def test_training_stops_past_the_budget(tiny_cfg, damaged_sample_data):
    cfg = tiny_cfg(
        f"data.train_dataset.annotation_file={damaged_sample_data / 'annotations.json'}",
        f"data.train_dataset.image_dir={damaged_sample_data}",
        "callbacks.skipped_samples.max_skipped=0",
        "trainer.limit_train_batches=24",
        "validate_before=false",
    )
    with pytest.raises(RuntimeError, match="could not be read"):
        train(cfg)
