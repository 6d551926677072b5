"""Whole runs through samtrain.commands.train: fast_dev_run, outputs of a short run, resume."""

from __future__ import annotations

import contextlib
import json
import re
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

import samtrain.commands.train as train_module
from samtrain.commands.train import train, wandb_finished
from samtrain.lightning.callbacks import read_metrics_csv
from samtrain.lightning.checkpoint_io import UnreadableCheckpointError
from samtrain.lightning.sam_module import VAL_RUNS_KEY
from samtrain.models import build_sam


def test_fast_dev_run_finishes_wandb(tiny_cfg, monkeypatch):
    finished = []
    monkeypatch.setattr(
        train_module, "finish_wandb", lambda trainer, exit_code=None: finished.append(exit_code)
    )
    train(tiny_cfg("debug=fdr"))
    assert finished == [None]


def wandb_trainer(finished: list) -> SimpleNamespace:
    """A trainer with one wandb logger whose run records how it was finished."""
    logger = WandbLogger(offline=True)
    logger._experiment = SimpleNamespace(finish=lambda exit_code=None: finished.append(exit_code))
    return SimpleNamespace(loggers=[logger])


@pytest.mark.parametrize(
    "error, exit_code",
    [(None, None), (RuntimeError("boom"), 1), (SIGTERMException(), 0), (KeyboardInterrupt(), 1)],
    ids=["success", "crash", "sigterm", "interrupt"],
)
def test_every_way_out_finishes_wandb(error, exit_code):
    finished = []
    trainer = wandb_trainer(finished)
    raises = pytest.raises(type(error)) if error else contextlib.nullcontext()
    with raises, wandb_finished(trainer):
        if error:
            raise error
    assert finished == [exit_code]


@pytest.fixture
def short_run(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg()
    metrics = train(cfg)
    return cfg, metrics, tmp_path, capsys.readouterr().out


def test_short_run_writes_metrics_checkpoints_and_export(short_run):
    _, metrics, out, printed = short_run
    assert "val/resized_mIoU@1" in metrics and "val/resized_box_mIoU" in metrics
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) == {"before", "after"}
    for key in ("val/resized_mIoU@1", "val/resized_mIoU@3", "val/resized_box_mIoU", "val/resized_NoC@90"):
        assert key in saved["before"] and key in saved["after"]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "csv" / "metrics.csv").is_file()
    # The export loads into a fresh model of the same configuration.
    model = build_sam("vit_t", image_size=64, checkpoint=out / "official.pth")
    assert model.image_encoder.pos_embed.shape[1] == 4
    assert "official.pth" in printed and "val/resized_mIoU@1" in printed


def test_export_image_size_reaches_the_export(tmp_path, monkeypatch):
    sizes = []

    def export(net, path, *, image_size=None, state=None):
        sizes.append(image_size)
        return path

    monkeypatch.setattr(train_module, "export_sam_checkpoint", export)
    cfg = OmegaConf.create({"export": True, "export_image_size": 1024})
    trainer = SimpleNamespace(loggers=[], checkpoint_callback=None)
    train_module.write_outputs(cfg, SimpleNamespace(net=None), trainer, {}, tmp_path)
    assert sizes == [1024]


def test_resume_from_last_checkpoint(short_run, tiny_cfg, monkeypatch):
    """Resumed in its own run directory: no validation before training, metrics.json keeps the
    first attempt's "before", metrics.csv keeps the first attempt's steps."""
    _, _, out, _ = short_run
    last = out / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    assert state[VAL_RUNS_KEY] == 1  # the fit's one validation (the trainer.validate before fit not counted)
    before = json.loads((out / "metrics.json").read_text())["before"]
    validations = []
    validate = train_module.validation_metrics
    monkeypatch.setattr(train_module, "validation_metrics", lambda *a: validations.append(1) or validate(*a))
    resumed = tiny_cfg("trainer.max_epochs=2", f"ckpt_path={last}")
    train(resumed)
    assert validations == [1]  # after training only: validate_before is skipped on resume
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 4  # continued from step 2, not restarted
    assert state[VAL_RUNS_KEY] == 2
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["before"] == before and saved["resumed_from"] == str(last) and saved["after"]
    history = read_metrics_csv(out / "csv" / "metrics.csv")
    assert [step for step, _ in history["train/loss"]] == [0, 1, 2, 3]
    # before training, epoch 0, epoch 1, after training (the first attempt's "after", at step 2, is not kept)
    assert [step for step, _ in history["val/resized_mIoU@1"]] == [0, 1, 3, 4]


class Tripwire:
    """An object whose unpickling calls ``trip``: loading it would run code from the file."""

    tripped = False

    def __reduce__(self):
        return (trip, ())


def trip() -> None:
    Tripwire.tripped = True


def test_resume_never_unpickles_objects(tiny_cfg, tmp_path, monkeypatch):
    tampered = tmp_path / "tampered.ckpt"
    torch.save({"global_step": 2, "payload": Tripwire()}, tampered)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch.load's default would unpickle
    with pytest.raises(
        UnreadableCheckpointError,
        match=re.escape(str(tampered)) + ": it holds a Python object.*test_train.trip",
    ):
        train(tiny_cfg(f"ckpt_path={tampered}"))
    assert not Tripwire.tripped


def test_sam2_short_run_trains_with_sam2s_recipe(tiny_cfg, tmp_path):
    """The nano SAM 2.1 with SAM 2.1's recipe (model=sam2_hiera_n prompts=sam2): the object-score
    loss is logged, and the export is a SAM 2 image-only file holding the trained weights."""
    cfg = tiny_cfg("model=sam2_hiera_n", "prompts=sam2", "prompts.num_click_passes=2")
    assert cfg.model.loss.object_score == 1.0 and cfg.model.layer_decay_module == "image_encoder.trunk"
    metrics = train(cfg)
    assert "val/resized_mIoU@1" in metrics
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/object_score" in header
    exported = build_sam("sam2.1_hiera_n", image_size=64, checkpoint=tmp_path / "official.pth")
    trained = build_sam("sam2.1_hiera_n", image_size=64, checkpoint=tmp_path / "checkpoints" / "last.ckpt")
    for (name, a), b in zip(exported.state_dict().items(), trained.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the export holds the trained weights
