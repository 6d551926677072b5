"""samtrain.lightning.callbacks: the traced protocols match the evaluation, a run writes its pictures, and the
callback configs follow the run's settings."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import hydra
import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import FSDPStrategy
from pytorch_lightning.trainer.states import TrainerFn

import samtrain.lightning.callbacks
from samtrain.commands.train import train
from samtrain.interactive.protocols import box_iou, click_curve, trace_interaction
from samtrain.lightning.callbacks import MetricCurves, PredictionGallery, read_metrics_csv
from samtrain.models import build_sam
from samtrain.plots import plot_curves


@pytest.fixture(scope="module")
def tiny_model_and_masks():
    torch.manual_seed(0)
    model = build_sam("vit_t", image_size=64).eval()
    images = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[0, 8:30, 10:40] = True
    masks[1, 20:44, 4:20] = True
    masks[2, 30:60, 25:45] = True
    kwargs = dict(image_indices=torch.tensor([0, 0, 1]), input_sizes=torch.tensor([[48, 64], [64, 56]]))
    with torch.no_grad():
        embeddings = model.image_encoder(images)
    return model, embeddings, masks, kwargs


def test_trace_interaction_is_the_evaluation_protocol(tiny_model_and_masks):
    model, embeddings, masks, kwargs = tiny_model_and_masks
    out = trace_interaction(model, embeddings, masks, num_clicks=4, **kwargs)
    ious, _ = click_curve(model, embeddings, masks, max_clicks=4, **kwargs)
    box_ious, _ = box_iou(model, embeddings, masks, **kwargs)
    torch.testing.assert_close(out["click_ious"], ious)
    torch.testing.assert_close(out["box_ious"], box_ious)
    assert out["click_coords"].shape == (3, 4, 2) and out["click_labels"].shape == (3, 4)
    assert out["click_masks"].shape == (3, 4, 64, 64) and out["click_masks"].dtype == torch.bool
    assert out["box_masks"].shape == (3, 64, 64) and out["boxes"].shape == (3, 4)
    # The first click is positive, inside the object.
    x, y = out["click_coords"][:, 0].long().unbind(-1)
    assert (out["click_labels"][:, 0] == 1).all() and masks[torch.arange(3), y, x].all()
    # No click and no prediction in the padding (image 0 has 48 rows).
    assert (out["click_coords"][:2, :, 1] < 48).all()
    assert not out["click_masks"][:2, :, 48:].any() and not out["box_masks"][:2, 48:].any()


def test_a_run_writes_the_gallery_and_the_curves(tiny_cfg, tmp_path):
    train(tiny_cfg())
    # Only the validation during fit draws: not the validation before training.
    [picture] = (tmp_path / "gallery").iterdir()
    assert picture.name.startswith("epoch000-step") and picture.suffix == ".png"
    gallery = np.asarray(Image.open(picture))
    # 2 images x 2 masks in the tiny run: 4 rows; image | GT | box | 1 click | 3 clicks.
    assert gallery.ndim == 3 and gallery.shape[2] == 3
    assert gallery.shape[0] >= 4 * 256 and gallery.shape[1] >= 5 * 256
    assert gallery.std() > 10
    curves = Image.open(tmp_path / "curves.png")
    assert curves.width >= 800 and curves.height >= 300
    assert np.asarray(curves.convert("L")).std() > 5


def test_read_metrics_csv_and_plot(tmp_path):
    csv = tmp_path / "metrics.csv"
    lines = [
        "epoch,step,train/loss,val/resized_mIoU@1,val/resized_NoC@90",
        "0,0,,0.1,9",
        "0,0,2.0,,",
        "0,1,1.5,,",
        "0,1,,0.3,7",
    ]
    csv.write_text("\n".join(lines) + "\n")
    history = read_metrics_csv(csv)
    assert history["train/loss"] == [(0, 2.0), (1, 1.5)]
    assert history["val/resized_mIoU@1"] == [(0, 0.1), (1, 0.3)]
    assert "epoch" not in history
    path = plot_curves(
        {"train/loss": history["train/loss"]},
        {k: v for k, v in history.items() if k.startswith("val/")},
        tmp_path / "out" / "curves.png",
    )
    assert Image.open(path).width > 0


def test_metric_curves_records_itself_without_a_csv_logger():
    trainer = SimpleNamespace(
        is_global_zero=True,
        loggers=(),
        log_every_n_steps=1,
        sanity_checking=False,
        global_step=3,
        callback_metrics={
            "train/loss": torch.tensor(0.5),
            "val/resized_mIoU@1": torch.tensor(0.25),
            "lr": 1.0,
        },
    )
    callback = MetricCurves()
    callback.on_train_batch_end(trainer, None, None, None, 0)
    callback.on_validation_end(trainer, None)
    assert callback.read_history(trainer) == {"train/loss": [(3, 0.5)], "val/resized_mIoU@1": [(3, 0.25)]}


def test_the_package_exports_every_public_name():
    for name in samtrain.lightning.callbacks.__all__:
        assert getattr(samtrain.lightning.callbacks, name) is not None
    assert samtrain.lightning.callbacks.plot_curves is plot_curves  # moved, still importable from here
    assert samtrain.lightning.callbacks.trace_interaction is trace_interaction


@pytest.mark.parametrize(
    ("overrides", "monitor", "mode"),
    [
        ((), "val/resized_mIoU@1", "max"),
        (("optimized_metric=val/resized_NoC@90", "optimized_mode=min"), "val/resized_NoC@90", "min"),
    ],
)
def test_the_checkpoint_follows_the_optimized_metric(tiny_cfg, overrides, monitor, mode):
    checkpoint = hydra.utils.instantiate(tiny_cfg(*overrides).callbacks.model_checkpoint)
    assert isinstance(checkpoint, ModelCheckpoint)
    assert (checkpoint.monitor, checkpoint.mode) == (monitor, mode)
    metrics = {"epoch": torch.tensor(3), "step": torch.tensor(40), monitor: torch.tensor(7.25)}
    name = checkpoint.format_checkpoint_name(metrics)
    assert name.endswith("/epoch003-step40-score7.2500.ckpt")  # no folder from the "/" in the name


def test_the_cached_experiment_has_no_gallery(tiny_cfg):
    cfg = tiny_cfg("experiment=finetune_cached")
    assert cfg.callbacks.prediction_gallery is None and cfg.callbacks.embedding_cache


def test_the_gallery_warns_once_when_batches_carry_no_images():
    gallery = PredictionGallery()
    batch = {
        "image_embedding": torch.zeros(1, 8, 4, 4),
        "masks": torch.ones(1, 64, 64, dtype=torch.bool),
        "mask_image_index": torch.zeros(1, dtype=torch.int64),
    }
    with pytest.warns(UserWarning, match="no images"):
        gallery.collect(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gallery.collect(batch)  # once only
        gallery.collect({"num_skipped": 2})  # every sample unreadable: nothing to say
    assert gallery.samples == []


def test_the_gallery_skips_sharded_strategies(caplog):
    gallery = PredictionGallery()
    gallery.samples = [{}]
    gallery.write = lambda *args: pytest.fail("drew under FSDP")
    trainer = SimpleNamespace(
        sanity_checking=False,
        state=SimpleNamespace(fn=TrainerFn.FITTING),
        is_global_zero=True,
        strategy=FSDPStrategy(),
    )
    gallery.on_validation_end(trainer, None)
    assert "skipped under FSDPStrategy" in caplog.text
