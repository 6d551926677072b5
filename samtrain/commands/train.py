"""The training run behind train.py: instantiate from the Hydra config, validate, fit, export."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from samtrain.lightning.callbacks import log_wandb_artifact
from samtrain.models import export_sam_checkpoint

log = logging.getLogger(__name__)


def instantiate_dict(cfg: DictConfig | None) -> list:
    """Instantiate every entry of a {name: {_target_: ...}} config (callbacks, loggers)."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(value) for value in cfg.values() if value and "_target_" in value]


def build_run(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """The datamodule, module and trainer of a run config."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.model)
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=instantiate_dict(cfg.get("callbacks")),
        logger=instantiate_dict(cfg.get("logger")) or False,
    )
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved_config(cfg))
    return datamodule, module, trainer


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
    """The validation metrics of ``module`` now (none when validation is off: limit_val_batches=0)."""
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
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
    results: dict[str, dict[str, float]] = {}

    if cfg.get("validate_before") and cfg.get("ckpt_path") is None:
        log.info("Validating the model before training")
        results["before"] = validation_metrics(trainer, module, datamodule)

    fit(trainer, module, datamodule, cfg.get("ckpt_path"))
    if trainer.fast_dev_run:
        return scalar_metrics(trainer.callback_metrics)

    results["after"] = validation_metrics(trainer, module, datamodule)
    if trainer.is_global_zero:
        write_outputs(cfg, module, trainer, results, output_dir)
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


def write_outputs(cfg: DictConfig, module, trainer: pl.Trainer, results: dict, output_dir: Path) -> None:
    """metrics.json, the official-format export, and a summary of where everything is."""
    (output_dir / "metrics.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    lines = [f"Run directory: {output_dir}", f"Metrics: {output_dir / 'metrics.json'}"]
    if cfg.get("export"):
        path = export_sam_checkpoint(
            module.net, output_dir / "official.pth", image_size=cfg.get("export_image_size")
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
