"""Checkpoints as wandb artifacts: :func:`log_wandb_artifact` and :class:`WandbCheckpointArtifact`;
:func:`wandb_run_id`, the run id a resumed run continues.

Both work offline: the artifact is recorded in the offline run and uploaded by ``wandb sync``.
``wandb`` is imported only when an artifact is logged.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import Logger, WandbLogger

log = logging.getLogger(__name__)


RUN_ID_FILE = "samtrain-run-id"


def wandb_run_id(save_dir: str | Path, *earlier_run_dirs: str | Path | None) -> str:
    """The wandb run id of the run logging to ``<save_dir>/wandb``, kept in
    ``<save_dir>/wandb/samtrain-run-id``: read from there or, for a run resumed from another run
    directory, from the first ``<earlier>/wandb/samtrain-run-id`` that exists; else a new id (8
    lowercase hex digits, as wandb's own), written there. A resumed run logging with this id and
    ``resume="allow"`` continues the same wandb run; offline, ``wandb sync`` uploads every
    attempt's ``offline-run-*-<id>`` folder into that one run."""
    own = Path(save_dir) / "wandb" / RUN_ID_FILE
    for path in (own, *(Path(d) / "wandb" / RUN_ID_FILE for d in earlier_run_dirs if d is not None)):
        if path.is_file() and path.read_text().strip():
            run_id = path.read_text().strip()
            break
    else:
        run_id = secrets.token_hex(4)
    if not own.is_file():
        own.parent.mkdir(parents=True, exist_ok=True)
        partial = own.with_name(f".{RUN_ID_FILE}.partial")
        partial.write_text(run_id + "\n")
        os.replace(partial, own)
    return run_id


def wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    """The trainer's WandbLoggers."""
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def log_wandb_artifact(
    loggers: Iterable[Logger],
    path: str | Path,
    *,
    name: str | None = None,
    type: str = "model",
    aliases: Sequence[str] = ("latest",),
    metadata: dict | None = None,
    policy: str = "mutable",
) -> int:
    """Log a file as a wandb artifact to every WandbLogger among ``loggers``.

    With ``policy="mutable"`` wandb copies the file to its staging folder (``$WANDB_DATA_DIR``),
    so later changes to it do not change the artifact; ``"immutable"`` references it in place.

    Args:
        path: the file.
        name: artifact name (default ``model-<run id>``, as Lightning's ``log_model`` names it).

    Returns:
        The number of runs it was logged to.
    """
    import wandb

    path = Path(path)
    count = 0
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        run = logger.experiment
        artifact = wandb.Artifact(name=name or f"model-{run.id}", type=type, metadata=metadata or {})
        artifact.add_file(str(path), name=path.name, policy=policy)
        run.log_artifact(artifact, aliases=list(aliases))
        count += 1
    return count


class WandbCheckpointArtifact(pl.Callback):
    """At the end of fit, the last and the best checkpoint of each ModelCheckpoint as ``"model"``
    artifacts of every WandbLogger (aliases ``latest`` / ``best``; one version when they are the
    same file; the monitored metric and the best score in the metadata). Offline runs keep them
    for ``wandb sync``. Loggers with Lightning's own ``log_model`` on are left to it.

    Runs on global rank zero only; an error is logged as a warning and the run goes on.

    Args:
        name: artifact name (default ``model-<run id>``).
        log_best: also log the best checkpoint when it differs from the last.
        policy: ``"mutable"`` (wandb copies the file into its staging folder until it is uploaded)
            or ``"immutable"`` (referenced in place: no copy, but the file must not change before
            ``wandb sync``).
    """

    def __init__(self, *, name: str | None = None, log_best: bool = True, policy: str = "mutable") -> None:
        self.name = name
        self.log_best = log_best
        self.policy = policy

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        loggers = [lg for lg in wandb_loggers(trainer) if not getattr(lg, "_log_model", False)]
        if not loggers:
            return
        try:
            for path, aliases, metadata in self.checkpoints(trainer):
                log_wandb_artifact(
                    loggers, path, name=self.name, aliases=aliases, metadata=metadata, policy=self.policy
                )
        except Exception:
            log.warning("WandbCheckpointArtifact failed", exc_info=True)

    def checkpoints(self, trainer: pl.Trainer) -> list[tuple[Path, list[str], dict]]:
        """``(path, aliases, metadata)`` of the files to log."""
        files: dict[Path, tuple[Path, list[str], dict]] = {}  # keyed by the resolved path
        for callback in trainer.checkpoint_callbacks:
            last = getattr(callback, "last_model_path", "")
            best = getattr(callback, "best_model_path", "") if self.log_best else ""
            score = getattr(callback, "best_model_score", None)
            for path, alias in ((last, "latest"), (best, "best")):
                if not path or not Path(path).is_file():
                    continue
                _, aliases, metadata = files.setdefault(Path(path).resolve(), (Path(path), [], {}))
                aliases.append(alias)
                metadata.update(global_step=trainer.global_step, monitor=getattr(callback, "monitor", None))
                if alias == "best" and score is not None:
                    metadata["score"] = float(score)
        return list(files.values())
