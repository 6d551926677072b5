"""`python train.py data=<format> debug=fdr` runs for every dataset format (tiny datasets built here)."""

from __future__ import annotations

import pytest

from samtrain.commands.train import train
from tests.data_builders import data_overrides

FORMATS = ["sa1b", "sa1b_tar", "instance_png", "binary_masks", "semantic_masks"]  # coco: tests/test_train.py


@pytest.mark.parametrize("option", FORMATS)
def test_fast_dev_run(tiny_cfg, tmp_path, option):
    overrides = data_overrides(option, tmp_path / "dataset")
    metrics = train(tiny_cfg("debug=fdr", f"data={option}", *overrides))
    assert metrics["train/loss"] > 0  # one real batch of this format went through the training step
