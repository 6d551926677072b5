"""Whole runs through samtrain.train: fast_dev_run, outputs of a short run, resume."""

from __future__ import annotations

import json

import pytest
import torch

from samtrain.models import build_sam
from samtrain.train import train


def test_fast_dev_run(tiny_cfg):
    train(tiny_cfg("debug=fdr"))


@pytest.fixture
def short_run(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg()
    metrics = train(cfg)
    return cfg, metrics, tmp_path, capsys.readouterr().out


def test_short_run_writes_metrics_checkpoints_and_export(short_run):
    _, metrics, out, printed = short_run
    assert "val/mIoU@1" in metrics and "val/box_mIoU" in metrics
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) == {"before", "after"}
    for key in ("val/mIoU@1", "val/mIoU@3", "val/box_mIoU", "val/NoC@90"):
        assert key in saved["before"] and key in saved["after"]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "csv" / "metrics.csv").is_file()
    # The export loads into a fresh model of the same configuration.
    model = build_sam("vit_t", image_size=64, checkpoint=out / "official.pth")
    assert model.image_encoder.pos_embed.shape[1] == 4
    assert "official.pth" in printed and "val/mIoU@1" in printed


def test_resume_from_last_checkpoint(short_run, tiny_cfg):
    _, _, out, _ = short_run
    last = out / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    resumed = tiny_cfg("trainer.max_epochs=2", f"ckpt_path={last}")
    train(resumed)
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 4  # continued from step 2, not restarted
