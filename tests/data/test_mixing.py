"""Mixing training datasets: each source's share of an epoch matches its weight within the
binomial spread, repeat factors are exact, two ranks together draw what one process draws, and a
loader resumed mid-epoch continues bitwise."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from samtrain.data import SamDataModule
from samtrain.data.mixing import MixedDataset, MixingSampler, sources_from_config
from tests.conftest import ROOT, as_rank
from tests.data.test_datamodule import assert_same_batch, sample_dataset

SIZES = (5, 20, 50)


def per_source(sampler: MixingSampler) -> np.ndarray:
    offsets = np.cumsum((0, *SIZES))
    return np.bincount(np.searchsorted(offsets, [i for i, _ in sampler], side="right") - 1, minlength=3)


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_shares_match_the_weights_within_the_binomial_spread(epoch):
    weights, n = np.array([1.0, 2.0, 7.0]), 3000
    sampler = MixingSampler(SIZES, seed=11, weights=weights, samples_per_epoch=n)
    sampler.set_epoch(epoch)
    counts = per_source(sampler)
    p = weights / weights.sum()
    spread = np.sqrt(n * p * (1 - p))
    assert counts.sum() == n
    assert np.all(np.abs(counts - n * p) < 4 * spread), (counts, n * p, spread)


def test_a_source_is_used_up_before_any_item_repeats():
    sampler = MixingSampler(SIZES, seed=3, weights=[5.0, 1.0, 1.0], samples_per_epoch=200)
    small = [i for i, _ in sampler if i < SIZES[0]]
    assert len(small) > 2 * SIZES[0]
    for start in range(0, len(small) - SIZES[0] + 1, SIZES[0]):  # every pass is a permutation
        assert sorted(small[start : start + SIZES[0]]) == list(range(SIZES[0]))
    seeds = [s for _, s in sampler]
    assert len(set(seeds)) == len(seeds)  # a repeated item is augmented anew


def test_repeat_factors_are_exact():
    sampler = MixingSampler(SIZES, seed=0, repeats=[3.0, 1.0, 0.5])
    assert len(sampler) == 15 + 20 + 25
    counts = per_source(sampler)
    assert counts.tolist() == [15, 20, 25]
    items = [i for i, _ in sampler]
    assert (
        all(items.count(i) == 3 for i in range(5))
        and len(set(items[i] for i in range(60) if items[i] >= 25)) == 25
    )


def test_two_ranks_together_draw_what_one_process_draws():
    def ranks(world):
        samplers = [
            MixingSampler(SIZES, seed=5, weights=[1, 1, 2], samples_per_epoch=41, rank=r, world_size=world)
            for r in range(world)
        ]
        for s in samplers:
            s.set_epoch(4)
        return [list(s) for s in samplers]

    (single,) = ranks(1)
    two = ranks(2)
    assert len(two[0]) == len(two[1]) == 20
    for step in range(5):  # batch 2 per rank, 4 in the single process
        together = sorted(p for rank in two for p in rank[2 * step : 2 * step + 2])
        assert together == sorted(single[4 * step : 4 * step + 4])
    again = ranks(1)[0]
    assert again == single  # the epoch is a function of (seed, epoch)


class Numbered(Dataset):
    accepts_sample_seeds = True

    def __init__(self, size: int, base: int) -> None:
        self.size, self.base = size, base

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, item):
        index, seed = item
        return self.base + index, seed


def test_mixed_dataset_routes_items_and_seeds():
    mixed = MixedDataset(sources_from_config([{"dataset": Numbered(3, 100)}, {"dataset": Numbered(4, 200)}]))
    assert len(mixed) == 7 and mixed[(3, 9)] == (200, 9) and mixed[(2, 1)] == (102, 1)
    with pytest.raises(ValueError, match="weight, or none"):
        sources_from_config([{"dataset": Numbered(3, 0), "weight": 1}, {"dataset": Numbered(3, 0)}])
    with pytest.raises(ValueError, match="names must be unique"):
        sources_from_config(
            [{"dataset": Numbered(3, 0), "name": "a"}, {"dataset": Numbered(3, 0), "name": "a"}]
        )


def mixed_datamodule(**kwargs) -> SamDataModule:
    sources = [
        {"name": "train", "weight": 3.0, "dataset": sample_dataset("train", train=True)},
        {"name": "val", "weight": 1.0, "dataset": sample_dataset("val", train=True)},
    ]
    return SamDataModule(
        train_datasets=sources, samples_per_epoch=24, **{"batch_size": 4, "seed": 0, **kwargs}
    )


def test_datamodule_ranks_equal_one_process_and_resume_is_bitwise():
    single = list(mixed_datamodule().train_dataloader())
    assert len(single) == 6
    with as_rank(0, 2):
        rank0 = list(mixed_datamodule(batch_size=2).train_dataloader())
    with as_rank(1, 2):
        rank1 = list(mixed_datamodule(batch_size=2).train_dataloader())
    for step, batch in enumerate(single):
        ids = sorted(rank0[step]["image_id"].tolist() + rank1[step]["image_id"].tolist())
        assert ids == sorted(batch["image_id"].tolist())
        images = torch.cat([rank0[step]["image"], rank1[step]["image"]])
        order = torch.argsort(torch.cat([rank0[step]["image_id"], rank1[step]["image_id"]]))
        assert torch.equal(images[order], batch["image"][torch.argsort(batch["image_id"])])
    loader = mixed_datamodule().train_dataloader()
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    expected = next(it)
    resumed = mixed_datamodule().train_dataloader()
    resumed.load_state_dict(state)
    assert_same_batch(next(iter(resumed)), expected)


def test_val_datasets_give_one_named_loader_each():
    dm = SamDataModule(
        train_dataset=sample_dataset("train", train=True),
        val_datasets={"a": sample_dataset("val", train=False), "b": sample_dataset("train", train=False)},
        batch_size=4,
        seed=0,
    )
    loaders = dm.val_dataloader()
    assert dm.val_names == ["a", "b"] and [len(loader) for loader in loaders] == [4, 12]


MIX_CONFIG = """\
defaults:
  - shared/datamodule@_here_
  - shared/train_transform@train_datasets.a.dataset.transform
  - shared/train_transform@train_datasets.b.dataset.transform
  - shared/eval_transform@val_datasets.sample.transform
  - shared/eval_transform@val_datasets.train_half.transform
  - _self_

train_datasets:
  a:
    weight: 3.0
    dataset:
      _target_: samtrain.data.CocoInstanceDataset
      annotation_file: ${paths.data_dir}/sample/train/annotations.json
      image_dir: ${paths.data_dir}/sample/train
      split: train
      val_fraction: 0.5
      transform: {scale_range: [0.75, 1.25], max_masks: 2}
  b:
    weight: 1.0
    dataset:
      _target_: samtrain.data.CocoInstanceDataset
      annotation_file: ${paths.data_dir}/sample/train/annotations.json
      image_dir: ${paths.data_dir}/sample/train
      split: val
      val_fraction: 0.5
      transform: {scale_range: [0.75, 1.25], max_masks: 2}
samples_per_epoch: 48
val_datasets:
  sample:
    _target_: samtrain.data.CocoInstanceDataset
    annotation_file: ${paths.data_dir}/sample/val/annotations.json
    image_dir: ${paths.data_dir}/sample/val
    transform: {max_masks: 2}
  train_half:
    _target_: samtrain.data.CocoInstanceDataset
    annotation_file: ${paths.data_dir}/sample/train/annotations.json
    image_dir: ${paths.data_dir}/sample/train
    split: val
    val_fraction: 0.5
    transform: {max_masks: 2}
batch_size: 4
"""


def mix_config(root, data_dir: str = "${paths.data_dir}") -> list[str]:
    """Writes the mixed data option ``data=mix`` under root; the overrides that select it."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "mix.yaml").write_text(MIX_CONFIG.replace("${paths.data_dir}", data_dir))
    return [f"hydra.searchpath=[file://{root}]", "data=mix"]


def test_validation_scores_each_dataset_under_its_name(tmp_path):
    import hydra
    import pytorch_lightning as pl

    from tests.conftest import TINY, compose_config

    tiny = [o for o in TINY if not o.startswith(("data.train_dataset", "data.val_dataset"))]
    cfg = compose_config(tmp_path, *tiny, *mix_config(tmp_path / "conf"))
    module, datamodule = hydra.utils.instantiate(cfg.model), hydra.utils.instantiate(cfg.data)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        limit_val_batches=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    logged = trainer.callback_metrics
    assert {"val/resized_mIoU@1", "val/sample/resized_mIoU@1", "val/train_half/resized_mIoU@1"} <= set(
        logged
    ), sorted(logged)


@pytest.mark.slow
def test_mixing_two_ranks_equal_one_and_kill_resume_is_bitwise(tmp_path):
    from tests.lightning import test_distributed as dist_tests

    mix = mix_config(tmp_path / "conf")
    run = [o for o in dist_tests.RUN if not o.startswith(("data.train_dataset", "data.val_dataset"))]
    steps = ("trainer.max_steps=4", "callbacks.step_checkpoint.every_n_train_steps=2")

    def train(run_dir, *overrides, check=True):
        args = [sys.executable, "train.py", *run, *mix, f"hydra.run.dir={run_dir}", *steps, *overrides]
        done = subprocess.run(
            args, cwd=ROOT, env=dist_tests.run_env(), capture_output=True, text=True, timeout=300
        )
        assert not check or done.returncode == 0, done.stderr[-5000:]
        return done

    single, ddp, killed = tmp_path / "single", tmp_path / "ddp", tmp_path / "killed"
    train(single, *dist_tests.save_weights(single))
    train(ddp, "trainer=ddp_cpu", *dist_tests.save_weights(ddp))
    dist_tests.assert_same_weights(dist_tests.weights(ddp, 0), dist_tests.weights(ddp, 1))
    assert dist_tests.train_losses(ddp) == pytest.approx(dist_tests.train_losses(single), abs=1e-5)
    dist_tests.assert_same_weights(dist_tests.weights(ddp), dist_tests.weights(single), atol=1e-4)
    assert train(killed, *dist_tests.signal_at(3, "SIGKILL"), check=False).returncode == -9
    last = killed / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2  # mid-epoch: 12 steps an epoch
    resumed = tmp_path / "resumed"
    train(resumed, f"ckpt_path={last}", *dist_tests.save_weights(resumed))
    dist_tests.assert_same_weights(dist_tests.weights(resumed), dist_tests.weights(single))


def test_check_data_walks_every_mixed_and_named_dataset(tmp_path, capsys):
    from hydra.core.global_hydra import GlobalHydra

    from samtrain.commands import cli

    GlobalHydra.instance().clear()
    overrides = mix_config(tmp_path / "conf", data_dir=str(ROOT / "data"))
    assert cli.main(["check-data", *overrides, "--no-progress"]) == 0
    GlobalHydra.instance().clear()
    out = capsys.readouterr().out
    for name in ("train/a", "train/b", "val/sample", "val/train_half"):
        assert f"== {name}\n" in out
