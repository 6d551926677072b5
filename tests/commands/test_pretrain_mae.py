"""pretrain_mae's pretrain(cfg) resumes from its own last.ckpt, loaded with weights_only=True."""

from __future__ import annotations

import torch
from hydra.core.global_hydra import GlobalHydra

from samtrain.commands.pretrain_mae import pretrain
from tests.conftest import compose_config

TINY_MAE = (
    "model.net.image_size=64",
    "data.batch_size=4",
    "trainer.limit_val_batches=1",
    "trainer.max_epochs=-1",
)


def pretrain_tiny(tmp_path, *overrides: str) -> None:
    try:
        pretrain(compose_config(tmp_path, *TINY_MAE, *overrides, config_name="mae"))
    finally:
        GlobalHydra.instance().clear()


def test_mae_resume_from_last_checkpoint(tmp_path):
    pretrain_tiny(tmp_path, "trainer.max_steps=2")
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    pretrain_tiny(tmp_path, "trainer.max_steps=4", f"ckpt_path={last}")
    assert torch.load(last, weights_only=True)["global_step"] == 4  # continued, not restarted
