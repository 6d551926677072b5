"""Checkpoint files that survive a kill and say why when they cannot be read.

:class:`AtomicCheckpointIO` is the runner's Lightning ``CheckpointIO`` (``samtrain.commands.train``
installs it): every checkpoint Lightning writes (ModelCheckpoint's last and best, the preemption
checkpoint, SLURM's ``hpc_ckpt_N.ckpt``) goes to a temporary file in the folder of its final path,
is flushed to disk, and is renamed over the final path with ``os.replace``. A rename within one
folder is atomic, so a kill at any moment leaves either the previous file or the new one, never a
part; the temporary folder (``TMPDIR``) plays no part. Lightning's own writer stages the file in
``TMPDIR`` and moves it, which is a copy, not a rename, when ``TMPDIR`` is on another file system
(local ``/tmp``, shared outputs): a kill during that copy leaves a truncated checkpoint.

A killed write leaves its temporary file (``.samtrain-partial-*``) behind;
:func:`remove_partial_checkpoints` deletes them at the next start. Their names hold neither
``last`` nor ``hpc_ckpt_``, so Lightning's own search for those checkpoints never picks one.

Reading goes through ``torch.load(weights_only=True)`` only; a file that is not a readable
Lightning checkpoint raises :class:`UnreadableCheckpointError` naming the file and the reason.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from samtrain.models.checkpoint import unreadable_reason

log = logging.getLogger(__name__)

PARTIAL_PREFIX = ".samtrain-partial-"


class UnreadableCheckpointError(ValueError):
    """A checkpoint file that cannot be resumed from (the message names the file and the reason)."""


def is_local(path: str | os.PathLike) -> bool:
    """Whether ``path`` is on the local file system (not ``s3://`` and the like)."""
    text = str(path)
    return "://" not in text or text.startswith("file://")


def fsync_directory(directory: Path) -> None:
    """Makes a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f"{PARTIAL_PREFIX}{secrets.token_hex(6)}"
    try:
        with open(partial, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def remove_partial_checkpoints(directories: Iterable[str | os.PathLike | None]) -> list[Path]:
    """Deletes what killed checkpoint writes left in ``directories`` (missing ones are skipped);
    returns the files removed."""
    removed = []
    for directory in {Path(d).resolve() for d in directories if d is not None and is_local(d)}:
        if not directory.is_dir():
            continue
        for partial in directory.glob(f"{PARTIAL_PREFIX}*"):
            try:
                partial.unlink()
            except FileNotFoundError:
                continue
            removed.append(partial)
            log.warning("removed %s, left by a checkpoint write that did not finish", partial)
    return removed


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A Lightning checkpoint, read with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnreadableCheckpointError: it is truncated, not a PyTorch file, holds objects other than
            tensors and plain values, or is not a Lightning checkpoint (no ``state_dict``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        # `from None`: torch's own message advises weights_only=False, which would run the file's code
        raise UnreadableCheckpointError(
            f"cannot resume from {path}: {unreadable_reason(err, path)}"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        keys = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise UnreadableCheckpointError(
            f"cannot resume from {path}: it is not a Lightning checkpoint (no 'state_dict' entry; found "
            f"{keys}). To start from a model's weights rather than resume a run, use the model's "
            "checkpoint option (model.net.checkpoint=... for SAM)"
        )
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic local writes (:func:`atomic_torch_save`) and
    reads that name the file and the reason when they refuse it (:func:`load_checkpoint_file`).
    Remote paths (``s3://`` and the like) keep Lightning's behaviour."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage, weights_only=None):
        if not is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint_file(path, map_location=map_location)
