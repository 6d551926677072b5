"""The training run behind train.py: instantiate from the Hydra config, validate, fit, export."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_only

from samtrain.lightning.callbacks import log_wandb_artifact, wandb_run_id
from samtrain.lightning.checkpoint_io import AtomicCheckpointIO, remove_partial_checkpoints
from samtrain.lightning.fault_tolerance import PreemptionCheckpoint
from samtrain.lightning.sharding import gathered_state
from samtrain.models import export_sam_checkpoint

log = logging.getLogger(__name__)


def instantiate_dict(cfg: DictConfig | None) -> list:
    """Instantiate every entry of a {name: {_target_: ...}} config (callbacks, loggers)."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(value) for value in cfg.values() if value and "_target_" in value]


def instantiate_loggers(cfg: DictConfig) -> list:
    """The run's loggers. A WandbLogger without an explicit ``id`` gets the run directory's kept id
    (:func:`wandb_run_id`; that of the resumed checkpoint's run directory when this one has none)
    and ``resume="allow"``, so a resumed run continues the same wandb run."""
    loggers = []
    for value in (cfg.get("logger") or {}).values():
        if not value or "_target_" not in value:
            continue
        if is_wandb_logger(value) and value.get("id") is None and rank_zero_only.rank == 0:
            run_id = wandb_run_id(value.save_dir, run_directory_of(cfg.get("ckpt_path")))
            loggers.append(hydra.utils.instantiate(value, id=run_id, resume="allow"))
        else:
            loggers.append(hydra.utils.instantiate(value))
    return loggers


def is_wandb_logger(cfg: DictConfig) -> bool:
    target = hydra.utils.get_class(cfg._target_)
    return isinstance(target, type) and issubclass(target, WandbLogger)


def run_directory_of(ckpt_path: str | None) -> Path | None:
    """The run directory of a checkpoint in the usual place, ``<run>/checkpoints/<file>``."""
    if ckpt_path in (None, "last", "hpc", "best"):
        return None
    return Path(str(ckpt_path)).resolve().parent.parent


def build_run(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """The datamodule, module and trainer of a run config."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.model)
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=instantiate_dict(cfg.get("callbacks")),
        logger=instantiate_loggers(cfg) or False,
        plugins=[AtomicCheckpointIO()],
    )
    if rank_zero_only.rank == 0:  # before Lightning looks for a checkpoint to resume from
        remove_partial_checkpoints(checkpoint_directories(trainer, cfg.get("ckpt_path")))
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved_config(cfg))
    return datamodule, module, trainer


def checkpoint_directories(trainer: pl.Trainer, ckpt_path: str | None) -> list[str]:
    """Every folder the run writes checkpoints to (ModelCheckpoint, PreemptionCheckpoint, SLURM's
    in ``default_root_dir``), and the folder of the checkpoint it resumes from."""
    folders = [str(trainer.default_root_dir)]
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            folders.append(str(callback.dirpath))
        elif isinstance(callback, PreemptionCheckpoint):
            folders.append(str(callback.path.parent))
    if ckpt_path not in (None, "last", "hpc", "best"):
        folders.append(os.path.dirname(os.path.abspath(str(ckpt_path))))
    return folders


HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


def resume_checkpoint(cfg: DictConfig, trainer: pl.Trainer) -> str | None:
    """The checkpoint ``trainer.fit`` will resume from: ``ckpt_path``, else under SLURM the newest
    ``hpc_ckpt_N.ckpt`` that Lightning saved in ``default_root_dir`` before a requeue (and resumes
    from by itself); None for a fresh run."""
    if cfg.get("ckpt_path") is not None:
        return str(cfg.ckpt_path)
    return slurm_checkpoint(trainer) if SLURMEnvironment.detect() else None


def slurm_checkpoint(trainer: pl.Trainer) -> str | None:
    """The newest ``hpc_ckpt_N.ckpt`` in ``trainer.default_root_dir`` (where Lightning saves it)."""
    root = Path(trainer.default_root_dir)
    versions = [
        (int(match.group(1)), path)
        for path in (root.iterdir() if root.is_dir() else ())
        if (match := HPC_CHECKPOINT.fullmatch(path.name))
    ]
    return str(max(versions)[1]) if versions else None


def resolved_config(cfg: DictConfig) -> dict:
    """The run's config as plain data, without Hydra's own node (present when composed in tests)."""
    return {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in cfg
        if key != "hydra"
    }


def scalar_metrics(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor))}


def validation_metrics(trainer: pl.Trainer, module, datamodule) -> dict[str, float]:
    """The validation metrics of ``module`` now (none when validation is off: limit_val_batches=0).

    Under SLURM, ``trainer.validate(ckpt_path=None)`` loads the newest ``hpc_ckpt_N.ckpt`` of the
    run directory when there is one, not the weights in hand; then the weights in hand are saved to
    ``last.ckpt`` (the run's own) and validated from there."""
    ckpt_path = None
    if SLURMEnvironment.detect() and slurm_checkpoint(trainer) is not None:
        folder = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        ckpt_path = str(Path(folder) / "last.ckpt")
        trainer.save_checkpoint(ckpt_path)
    results = trainer.validate(
        module, datamodule=datamodule, verbose=False, ckpt_path=ckpt_path, weights_only=True
    )
    return scalar_metrics(results[0]) if results else {}


def train(cfg: DictConfig) -> dict[str, float]:
    """Run training as configured; returns the final validation metrics."""
    datamodule, module, trainer = build_run(cfg)
    with wandb_finished(trainer):
        return run_training(cfg, datamodule, module, trainer)


def fit(trainer: pl.Trainer, module, datamodule, ckpt_path: str | None) -> None:
    """``trainer.fit``, resuming from ``ckpt_path`` with ``torch.load(weights_only=True)``: a checkpoint
    holds tensors and plain values only, and a tampered one cannot run code when it is loaded."""
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)


def run_training(cfg: DictConfig, datamodule, module, trainer: pl.Trainer) -> dict[str, float]:
    output_dir = Path(cfg.paths.output_dir)
    resume = resume_checkpoint(cfg, trainer)
    results: dict = {}
    if resume is not None:
        log.info("Resuming from %s: no validation before training", resume)
        results = {**earlier_before_metrics(output_dir), "resumed_from": resume}
    elif cfg.get("validate_before"):
        log.info("Validating the model before training")
        results["before"] = validation_metrics(trainer, module, datamodule)
        if trainer.is_global_zero:
            write_metrics_json(output_dir, results)  # kept by a resume in this run directory

    fit(trainer, module, datamodule, cfg.get("ckpt_path"))
    if trainer.fast_dev_run:
        return scalar_metrics(trainer.callback_metrics)

    results["after"] = validation_metrics(trainer, module, datamodule)
    state = gathered_state(module.net) if cfg.get("export") else None  # every rank: a collective
    if trainer.is_global_zero:
        write_outputs(cfg, module, trainer, results, output_dir, state=state)
    return results["after"]


def finish_wandb(trainer: pl.Trainer, exit_code: int | None = None) -> None:
    """Close the run's wandb runs: an offline run's file is complete only then, and a later run in
    the same process (multirun, tests) would otherwise log into this one."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish(exit_code=exit_code)


@contextmanager
def wandb_finished(trainer: pl.Trainer) -> Iterator[None]:
    """Finishes the trainer's wandb runs however the block exits; an exception marks them failed
    (a ``SystemExit``, such as Lightning's clean exit on SIGTERM, keeps its own exit code)."""
    try:
        yield
    except BaseException as error:
        finish_wandb(trainer, exit_code=exit_code_of(error))
        raise
    finish_wandb(trainer)


def exit_code_of(error: BaseException) -> int:
    code = error.code if isinstance(error, SystemExit) else 1
    return code if isinstance(code, int) else int(code is not None)


def earlier_before_metrics(output_dir: Path) -> dict:
    """``{"before": ...}`` from ``<output_dir>/metrics.json`` when an earlier attempt of this run
    directory validated the untrained model; else empty."""
    path = output_dir / "metrics.json"
    try:
        before = json.loads(path.read_text()).get("before")
    except (OSError, ValueError, AttributeError):
        return {}
    return {"before": before} if isinstance(before, dict) else {}


def write_metrics_json(output_dir: Path, results: dict) -> Path:
    """``metrics.json``: ``before`` (the untrained model's validation, when this run directory ran
    one), ``after`` (the trained model's), ``resumed_from`` (the checkpoint, for a resumed run)."""
    path = output_dir / "metrics.json"
    output_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(results, indent=2, sort_keys=True))
    os.replace(partial, path)
    return path


def write_outputs(
    cfg: DictConfig,
    module,
    trainer: pl.Trainer,
    results: dict,
    output_dir: Path,
    *,
    state: dict | None = None,
) -> None:
    """metrics.json, the official-format export (of ``state``, the gathered weights of a sharded
    net, when given), and a summary of where everything is."""
    write_metrics_json(output_dir, results)
    lines = [f"Run directory: {output_dir}", f"Metrics: {output_dir / 'metrics.json'}"]
    if cfg.get("export"):
        path = export_sam_checkpoint(
            module.net, output_dir / "official.pth", image_size=cfg.get("export_image_size"), state=state
        )
        log_wandb_artifact(trainer.loggers, path, name="sam-official", aliases=["official"])
        lines.append(f"Official-format SAM checkpoint: {path}")
    for name, label in (("gallery", "Prediction pictures"), ("curves.png", "Loss and metric curves")):
        if (output_dir / name).exists():
            lines.append(f"{label}: {output_dir / name}")
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None:
        lines.append(
            f"Lightning checkpoints: last {checkpoint.last_model_path}, best {checkpoint.best_model_path}"
        )
    keys = sorted(set(results.get("after", {})) | set(results.get("before", {})))
    table = [f"{'metric':<22}{'before':>10}{'after':>10}"]
    for key in keys:
        before = results.get("before", {}).get(key)
        after = results.get("after", {}).get(key)
        table.append(f"{key:<22}{_fmt(before):>10}{_fmt(after):>10}")
    print("\n".join(["", *table, "", *lines]), flush=True)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
