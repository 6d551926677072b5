"""Loggers that keep a resumed run's history: :class:`ResumableCSVLogger`."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)


def read_csv_rows(path: str | Path) -> list[tuple[int, dict[str, float]]]:
    """The rows of a CSVLogger's ``metrics.csv`` as ``(step, {metric: value})``, filled cells only
    (``epoch`` included, as Lightning logs it); rows without a step are left out."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = int(float(row.get("step") or ""))
            except ValueError:
                continue
            values = {}
            for key, value in row.items():
                if key == "step" or value in (None, ""):
                    continue
                try:
                    values[key] = float(value)
                except ValueError:
                    continue
            rows.append((step, values))
    return rows


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, keeping the rows of a resumed run's earlier part in ``metrics.csv``.

    Lightning's CSVLogger deletes ``metrics.csv`` when it starts, so a run resumed in its own run
    directory (the SLURM layout) lost the steps before the resume. This one reads the earlier file
    first; when it logs its first row, at step ``s``, it writes back the earlier rows of every step
    below ``s`` and then goes on appending. A resumed run's first row is at the checkpoint's step,
    so the file then holds the earlier part up to the checkpoint followed by the resumed part; the
    rows a killed attempt logged after its last checkpoint are dropped, as the resumed run computes
    those steps again. A fresh run logs its first row at step 0 and keeps nothing.

    ``flush_logs_every_n_steps`` defaults to 1 here (every row reaches the file when it is logged),
    so a ``kill -9`` loses no row.
    """

    def __init__(self, *args: Any, flush_logs_every_n_steps: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)
        self.earlier_rows: list[tuple[int, dict[str, float]]] | None = None

    @property
    @rank_zero_experiment
    def experiment(self):
        if self.earlier_rows is None:
            path = Path(self.log_dir) / "metrics.csv"  # read before the writer deletes it
            self.earlier_rows = read_csv_rows(path) if path.is_file() else []
        return super().experiment

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.experiment  # noqa: B018 (reads the earlier rows before the file is cleared)
        earlier, self.earlier_rows = self.earlier_rows, []
        if earlier:
            first = 0 if step is None else step
            kept = [(s, values) for s, values in earlier if s < first]
            for s, values in kept:
                super().log_metrics(values, step=s)
            if kept:
                log.info("%s: kept %d rows of steps before %d", self.log_dir, len(kept), first)
        super().log_metrics(metrics, step=step)
