"""Training curves: :class:`MetricCurves` writes ``curves.png`` at the end of fit, from the
CSVLogger's ``metrics.csv`` (:func:`read_metrics_csv`) or from what it recorded itself."""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger

from samtrain.lightning.callbacks.wandb_artifacts import wandb_loggers
from samtrain.plots import plot_curves

log = logging.getLogger(__name__)


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """A Lightning CSVLogger's ``metrics.csv`` -> ``{metric: [(step, value), ...]}`` (non-empty cells)."""
    history: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                try:
                    history[key].append((int(float(step)), float(value)))
                except ValueError:
                    continue
    return dict(history)


def csv_logger(trainer: pl.Trainer) -> CSVLogger | None:
    """The trainer's first CSVLogger."""
    return next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)


class MetricCurves(pl.Callback):
    """``curves.png`` at the end of fit: the training loss per step and the validation metrics.

    The history comes from the CSVLogger's ``metrics.csv`` when there is one (with
    :class:`~samtrain.lightning.loggers.ResumableCSVLogger`, conf/logger/csv.yaml, it also holds
    the part of a run before a resume); otherwise the callback records ``trainer.callback_metrics``
    itself (``train_keys`` every ``log_every_n_steps`` steps, ``val_prefix`` metrics after each
    validation), and keeps it in checkpoints, so a resumed run's picture covers the whole run.
    Validation metrics are plotted against the global step, so a validation before
    training is the point at step 0. The picture is also logged to every WandbLogger under
    ``log_key``.

    Runs on global rank zero only; an error is logged as a warning and the run goes on.

    Args:
        path: the PNG (default ``<trainer.default_root_dir>/curves.png``).
        train_keys: training metrics to plot (those present).
        val_prefix: validation metrics to plot: every key with this prefix.
        log_key: wandb key.
    """

    def __init__(
        self,
        *,
        path: str | Path | None = None,
        train_keys: Sequence[str] = ("train/loss",),
        val_prefix: str = "val/",
        log_key: str = "curves",
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.train_keys = tuple(train_keys)
        self.val_prefix = val_prefix
        self.log_key = log_key
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def _recording(self, trainer: pl.Trainer) -> bool:
        return trainer.is_global_zero and csv_logger(trainer) is None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._recording(trainer) or trainer.global_step % max(1, trainer.log_every_n_steps):
            return
        for key in self.train_keys:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self.history[key].append((trainer.global_step, float(value)))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._recording(trainer):
            return
        for key, value in trainer.callback_metrics.items():
            if key.startswith(self.val_prefix) and getattr(value, "numel", lambda: 1)() == 1:
                self.history[key].append((trainer.global_step, float(value)))

    def state_dict(self) -> dict:
        """What it recorded (without a CSVLogger), so that a resumed run's curves start at step 0."""
        return {"history": {key: [list(point) for point in points] for key, points in self.history.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = defaultdict(list)
        for key, points in state_dict.get("history", {}).items():
            self.history[key] = [(int(step), float(value)) for step, value in points]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        try:
            self.write(trainer)
        except Exception:
            log.warning("MetricCurves failed", exc_info=True)

    def read_history(self, trainer: pl.Trainer) -> dict[str, list[tuple[int, float]]]:
        """``{metric: [(step, value), ...]}`` from the CSVLogger, else as recorded."""
        logger = csv_logger(trainer)
        if logger is not None:
            logger.save()  # flush what is pending (loggers are finalized after on_fit_end)
            path = Path(logger.log_dir) / "metrics.csv"
            if path.is_file():
                return read_metrics_csv(path)
        return dict(self.history)

    def write(self, trainer: pl.Trainer) -> Path | None:
        """Plot the history and log the picture to wandb; returns the PNG's path (None: nothing to plot)."""
        history = self.read_history(trainer)
        train = {k: history[k] for k in self.train_keys if history.get(k)}
        val = {k: v for k, v in sorted(history.items()) if k.startswith(self.val_prefix) and v}
        if not train and not val:
            return None
        path = self.path or Path(trainer.default_root_dir) / "curves.png"
        plot_curves(train, val, path)
        for logger in wandb_loggers(trainer):
            logger.log_image(key=self.log_key, images=[str(path)], step=trainer.global_step)
        return path
