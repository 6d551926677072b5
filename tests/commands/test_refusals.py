"""Every entry point that loads a file names it and the reason when it refuses it, and never advises
``weights_only=False``: train.py and pretrain_mae.py ``ckpt_path=``, SLURM's auto-resume, eval."""

from __future__ import annotations

import logging
import re
import shutil
import traceback
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import samtrain.commands.train as train_module
from samtrain.commands.eval import load_model
from samtrain.commands.pretrain_mae import pretrain
from samtrain.commands.train import resume_checkpoint, train
from samtrain.lightning.checkpoint_io import UnreadableCheckpointError
from tests.conftest import compose_config

# torch's advice on refusing a file, which would let it run code: "weights_only set to False".
ADVICE = re.compile(r"weights_only\W+(set to\W+)?False")
QUICK = ("validate_before=false", "export=false", "trainer.limit_val_batches=0")
SLURM = {
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_JOB_NAME": "train",
    "SLURM_JOB_ID": "1234",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}


def bad_file(folder: Path, kind: str, name: str = "bad.ckpt") -> Path:
    """A truncated checkpoint or a file that is no checkpoint at all."""
    path = folder / name
    if kind == "truncated":
        torch.save({"state_dict": {"w": torch.ones(10_000)}, "global_step": 1}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_text("epoch,step,train/loss\n0,1,0.5\n")
    return path


REASON = {"truncated": "truncated or corrupted", "not a checkpoint": "not a PyTorch checkpoint"}


def assert_names_file_and_reason(refused: pytest.ExceptionInfo, path: Path, kind: str) -> None:
    assert refused.match(re.escape(str(path)) + ".*" + REASON[kind])
    shown = "".join(traceback.format_exception(refused.value))
    assert not ADVICE.search(shown)


@pytest.mark.parametrize("kind", REASON)
def test_train_ckpt_path_to_a_bad_file(tiny_cfg, tmp_path, kind):
    path = bad_file(tmp_path, kind)
    with pytest.raises(UnreadableCheckpointError) as refused:
        train(tiny_cfg(*QUICK, f"ckpt_path={path}"))
    assert_names_file_and_reason(refused, path, kind)


@pytest.mark.parametrize("kind", REASON)
def test_pretrain_mae_ckpt_path_to_a_bad_file(tmp_path, kind):
    path = bad_file(tmp_path, kind)
    cfg = compose_config(
        tmp_path, "model.net.image_size=64", "data.batch_size=4", "trainer.limit_val_batches=0",
        "trainer.max_steps=1", f"ckpt_path={path}", config_name="mae",
    )  # fmt: skip
    try:
        with pytest.raises(UnreadableCheckpointError) as refused:
            pretrain(cfg)
    finally:
        GlobalHydra.instance().clear()
    assert_names_file_and_reason(refused, path, kind)


@pytest.mark.parametrize("kind", REASON)
def test_eval_checkpoint_that_is_a_bad_file(tmp_path, kind):
    path = bad_file(tmp_path, kind, "bad.pth")
    with pytest.raises(ValueError) as refused:
        load_model("vit_t", 64, str(path))
    assert_names_file_and_reason(refused, path, kind)


def test_slurm_requeue_resumes_without_validating_again_and_refuses_a_bad_file(
    tiny_cfg, tmp_path, monkeypatch, caplog
):
    """A requeued SLURM job: Lightning resumes from the newest ``hpc_ckpt_N.ckpt`` in the run
    directory by itself; samtrain then runs no validation before training, and a truncated
    ``hpc_ckpt_N.ckpt`` is refused by name."""
    train(tiny_cfg(*QUICK, "trainer.max_steps=1"))
    first = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(first, weights_only=True)["global_step"] == 1
    for name, value in SLURM.items():
        monkeypatch.setenv(name, value)

    truncated = bad_file(tmp_path, "truncated", "hpc_ckpt_2.ckpt")
    shutil.copy(first, tmp_path / "hpc_ckpt_1.ckpt")
    with pytest.raises(UnreadableCheckpointError) as refused:
        train(tiny_cfg("trainer.max_steps=2", "export=false", "trainer.limit_val_batches=0"))
    assert_names_file_and_reason(refused, truncated, "truncated")

    truncated.unlink()
    validations = []
    validate = train_module.validation_metrics
    monkeypatch.setattr(train_module, "validation_metrics", lambda *a: validations.append(1) or validate(*a))
    cfg = tiny_cfg("trainer.max_steps=2", "trainer.max_epochs=2", "export=false")
    with caplog.at_level(logging.INFO):
        train(cfg)  # validate_before=true, as by default
    assert validations == [1]  # after training only
    assert torch.load(first, weights_only=True)["global_step"] == 2  # resumed from step 1
    # The final validation scores the trained weights, not those of Lightning's SLURM checkpoint.
    assert f"Loaded model weights from the checkpoint at {first}" in caplog.text
    assert f"Loaded model weights from the checkpoint at {tmp_path / 'hpc_ckpt_1.ckpt'}" not in caplog.text


def test_resume_checkpoint_is_ckpt_path_or_slurms_newest(tmp_path, monkeypatch):
    trainer = type("T", (), {"default_root_dir": str(tmp_path)})()
    cfg = OmegaConf.create({"ckpt_path": None})
    assert resume_checkpoint(cfg, trainer) is None
    for name in ("hpc_ckpt_2.ckpt", "hpc_ckpt_10.ckpt", ".samtrain-partial-ab12", "hpc_ckpt_x.ckpt"):
        (tmp_path / name).write_bytes(b"")
    assert resume_checkpoint(cfg, trainer) is None  # not under SLURM
    for name, value in SLURM.items():
        monkeypatch.setenv(name, value)
    assert resume_checkpoint(cfg, trainer) == str(tmp_path / "hpc_ckpt_10.ckpt")
    assert resume_checkpoint(OmegaConf.create({"ckpt_path": "x.ckpt"}), trainer) == "x.ckpt"
