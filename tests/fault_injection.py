"""Callbacks that tests add to real `python train.py` runs (``+callbacks.x._target_=tests.fault_injection.X``)."""

from __future__ import annotations

import contextlib
import io
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


class KillDuringCheckpointWrite(pl.Callback):
    """SIGKILLs this process half-way through writing the checkpoint saved at ``step``.

    From that checkpoint on, ``torch.save(obj, file)`` serialises ``obj``, writes the first half of
    its bytes to ``file``, flushes them to disk and kills the process: what a ``kill -9`` during the
    write leaves.
    """

    def __init__(self, *, step: int) -> None:
        self.step = int(step)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step == self.step:
            torch.save = half_then_kill(torch.save)


def half_then_kill(save):
    def write_half_and_die(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        with contextlib.ExitStack() as stack:
            file = f if hasattr(f, "write") else stack.enter_context(open(f, "wb"))
            file.write(data[: len(data) // 2])
            file.flush()
            os.fsync(file.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    return write_half_and_die
