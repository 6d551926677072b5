"""The training run behind train.py: instantiate from the Hydra config, validate, fit, export."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from samtrain.callbacks import log_wandb_artifact
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
    output_dir = Path(cfg.paths.output_dir)
    results: dict[str, dict[str, float]] = {}

    if cfg.get("validate_before") and cfg.get("ckpt_path") is None:
        log.info("Validating the model before training")
        results["before"] = validation_metrics(trainer, module, datamodule)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if trainer.fast_dev_run:
        return scalar_metrics(trainer.callback_metrics)

    results["after"] = validation_metrics(trainer, module, datamodule)
    if trainer.is_global_zero:
        write_outputs(cfg, module, trainer, results, output_dir)
    finish_wandb(trainer)
    return results["after"]


def finish_wandb(trainer: pl.Trainer) -> None:
    """Close the run's wandb runs: an offline run's file is complete only then, and a later run in
    the same process (multirun, tests) would otherwise log into this one."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def write_outputs(cfg: DictConfig, module, trainer: pl.Trainer, results: dict, output_dir: Path) -> None:
    """metrics.json, the official-format export, and a summary of where everything is."""
    (output_dir / "metrics.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    lines = [f"Run directory: {output_dir}", f"Metrics: {output_dir / 'metrics.json'}"]
    if cfg.get("export"):
        path = export_sam_checkpoint(module.net, output_dir / "official.pth")
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
