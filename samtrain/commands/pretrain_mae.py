"""The MAE pretraining run behind pretrain_mae.py: instantiate from the Hydra config, fit, and write
the encoder weights (``<run dir>/mae_encoder.safetensors``) for SAM's image encoder."""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import save_file

from samtrain import distributed
from samtrain.commands.train import build_run, fit, scalar_metrics, wandb_finished

log = logging.getLogger(__name__)

ENCODER_FILE = "mae_encoder.safetensors"


def save_mae_encoder(net, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """The MAE encoder's weights in timm ViT layout (``blocks.N...``, ``pos_embed``, ``cls_token``,
    ``patch_embed.proj``, ``norm``) as safetensors; ``init_encoder_from_mae`` reads them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.encoder.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def pretrain(cfg) -> dict[str, float]:
    """Fit the MAE as configured (conf/mae.yaml); returns the last logged metrics."""
    datamodule, module, trainer = build_run(cfg)
    with wandb_finished(trainer):
        return run_pretraining(cfg, datamodule, module, trainer)


def run_pretraining(cfg, datamodule, module, trainer) -> dict[str, float]:
    fit(trainer, module, datamodule, cfg.get("ckpt_path"))
    metrics = scalar_metrics(trainer.callback_metrics)
    if trainer.is_global_zero:
        output_dir = Path(cfg.paths.output_dir)
        net_cfg = cfg.model.net
        metadata = {"variant": str(net_cfg.get("variant")), "image_size": str(net_cfg.get("image_size"))}
        path = save_mae_encoder(module.net, output_dir / ENCODER_FILE, metadata)
        lines = [f"Run directory: {output_dir}", f"MAE encoder weights: {path}"]
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.last_model_path:
            lines.append(
                f"Lightning checkpoints: last {checkpoint.last_model_path}, best {checkpoint.best_model_path}"
            )
        if getattr(module, "last_grid_path", None):
            lines.append(f"Reconstructions: {module.last_grid_path.parent}")
        lines.append(f"Use in SAM: model.net.encoder_init={path}")
        print("\n".join(["", *lines]), flush=True)
    distributed.barrier()
    return metrics
