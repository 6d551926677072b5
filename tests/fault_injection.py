"""Callbacks that tests add to real `python train.py` runs (``+callbacks.x._target_=tests.fault_injection.X``)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytorch_lightning as pl
import torch


class SignalAtStep(pl.Callback):
    """Sends ``signal_name`` (e.g. SIGKILL, SIGTERM) to this process once ``global_step`` reaches ``step``."""

    def __init__(self, *, step: int, signal_name: str) -> None:
        self.step = int(step)
        self.signum = getattr(signal, signal_name)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class SaveWeights(pl.Callback):
    """Writes each rank's final weights to ``<dirpath>/weights_rank<r>.pt``."""

    def __init__(self, *, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.dirpath / f"weights_rank{trainer.global_rank}.pt")
