"""MaeModule: MAE pretraining (arXiv 2111.06377) of a SAM-shaped ViT encoder as a LightningModule.

Optimisation follows the paper: AdamW (0.9, 0.95), weight decay 0.05 (none for norms, biases,
position embeddings and tokens), lr = base_lr * effective batch / 256 with base_lr 1.5e-4, linear
warmup then half-cycle cosine (``samtrain.lightning.optim.cosine_schedule``), stepped every
optimiser step; the optimiser and the schedule are factories (Hydra ``_partial_``), as in SamModule.
Each validation saves a grid of original / masked / reconstructed images to
``<default_root_dir>/mae_reconstructions/``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from samtrain.data.image_folder import IMAGENET_MEAN, IMAGENET_STD
from samtrain.distributed import refuse_empty_batch_if_sharded, world_size
from samtrain.lightning.fault_tolerance import load_pending_loader_state, zero_loss
from samtrain.lightning.optim import cosine_schedule, decay_groups
from samtrain.models.mae import MaskedAutoencoder

log = logging.getLogger(__name__)

# The paper's optimiser and schedule (conf/mae_model/mae.yaml spells the same in Hydra).
MAE_OPTIMIZER = partial(torch.optim.AdamW, betas=(0.9, 0.95))
MAE_SCHEDULE = partial(cosine_schedule, warmup_steps=None, warmup_fraction=0.05)


def mae_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay / no-decay groups: no decay for 1-d tensors (norms, biases), positions and tokens.
    Parameters that do not train (the fixed sin-cos positions) are left out."""
    return decay_groups(model.named_parameters(), weight_decay=weight_decay)


def to_uint8(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Normalised images (N, 3, H, W) -> uint8 (N, H, W, 3)."""
    mean_t = images.new_tensor(mean)[:, None, None]
    std_t = images.new_tensor(std)[:, None, None]
    pixels = (images.detach().float() * std_t + mean_t).clamp(0, 1) * 255
    return pixels.round().byte().permute(0, 2, 3, 1).cpu().numpy()


def reconstruction_grid(
    original: torch.Tensor, masked: torch.Tensor, recon: torch.Tensor, pad: int = 2
) -> np.ndarray:
    """One row per image: original | masked | reconstruction, uint8 (H', W', 3) on white."""
    columns = [to_uint8(original), to_uint8(masked), to_uint8(recon)]
    n, h, w, _ = columns[0].shape
    grid = np.full((n * (h + pad) + pad, 3 * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for col, images in enumerate(columns):
        for row in range(n):
            y, x = pad + row * (h + pad), pad + col * (w + pad)
            grid[y : y + h, x : x + w] = images[row]
    return grid


class MaeModule(pl.LightningModule):
    """Trains a ``MaskedAutoencoder``.

    Args:
        net: the MAE (``samtrain.models.mae.build_mae``).
        optimizer: a partial optimizer, called with the parameter groups and ``lr=`` (default:
            AdamW with MAE's betas (0.9, 0.95)).
        scheduler: a partial lr schedule, called as ``scheduler(optimizer, total_steps=...)`` and
            stepped every optimiser step (default: linear warmup over 5% of the run, MAE's 40 of
            800 epochs, then half-cycle cosine to zero); None: the lr stays constant.
        base_lr: lr per 256 images of effective batch (batch size x accumulation x world size).
        lr: an absolute lr that overrides base_lr scaling (None: scale base_lr).
        weight_decay: AdamW's, on all but the no-decay parameters (``mae_param_groups``).
        batch_size: the per-device batch for the lr scaling (None: the datamodule's or loader's).
        num_vis: images in the reconstruction grid.
        seed: seeds the validation masks (the same masks every validation).
    """

    def __init__(
        self,
        *,
        net: MaskedAutoencoder,
        optimizer: Callable[..., Optimizer] = MAE_OPTIMIZER,
        scheduler: Callable[..., LRScheduler] | None = MAE_SCHEDULE,
        base_lr: float = 1.5e-4,
        lr: float | None = None,
        weight_decay: float = 0.05,
        batch_size: int | None = None,
        num_vis: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.num_vis = num_vis
        self.seed = seed
        self._vis: torch.Tensor | None = None
        self.last_grid_path: Path | None = None

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None):
        return self.net(images, generator=generator)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        """batch: ``{"image": (B, 3, S, S), "num_skipped": int}`` (``collate_image_batch``)."""
        if "image" not in batch:  # no readable image (counted by SkippedSamplesBudget)
            refuse_empty_batch_if_sharded(self.trainer, "training")
            return None if world_size() == 1 else zero_loss(self)
        images = batch["image"]
        loss = self.net(images).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def _val_generator(self, batch_idx: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + batch_idx)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if "image" not in batch:
            refuse_empty_batch_if_sharded(self.trainer, "validation")
            return
        images = batch["image"]
        out = self.net(images, generator=self._val_generator(batch_idx))
        self.log("val/loss", out.loss, prog_bar=True, batch_size=images.shape[0], sync_dist=True)
        if self._vis is None:
            self._vis = images[: self.num_vis]

    def on_validation_epoch_start(self) -> None:
        self._vis = None  # the first readable batch of this run is drawn

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self._vis is None or not self.trainer.is_global_zero:
            return
        path = self.save_reconstructions(self._vis)
        self._vis = None
        self.log_grid(path)

    @torch.no_grad()
    def save_reconstructions(self, images: torch.Tensor) -> Path:
        """Write the original / masked / reconstruction grid of ``images`` as a PNG; returns its path."""
        from PIL import Image

        out = self.net(images, generator=self._val_generator(0))
        masked, recon = self.net.reconstruct(images, out.pred, out.mask)
        grid = reconstruction_grid(images, masked, recon)
        path = (
            Path(self.trainer.default_root_dir) / "mae_reconstructions" / f"epoch{self.current_epoch:03d}.png"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
        self.last_grid_path = path
        return path

    def log_grid(self, path: Path) -> None:
        from pytorch_lightning.loggers import WandbLogger

        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log(
                    {"val/reconstructions": wandb.Image(str(path)), "trainer/global_step": self.global_step}
                )

    def on_train_start(self) -> None:
        load_pending_loader_state(self.trainer)

    # ------------------------------------------------------------------ optimisation

    def effective_batch_size(self) -> int:
        trainer = self.trainer
        batch = self.hparams.batch_size
        if batch is None:
            batch = (
                getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
            )
        if batch is None:
            if trainer.train_dataloader is None:
                trainer.fit_loop.setup_data()  # what estimated_stepping_batches does, when it needs to
            batch = getattr(trainer.train_dataloader, "batch_size", None)
        if batch is None:
            raise ValueError("MaeModule cannot find the batch size for the lr scaling; pass batch_size=")
        return int(batch) * int(trainer.accumulate_grad_batches) * int(trainer.world_size)

    def configure_optimizers(self):
        hp = self.hparams
        total = max(1, int(self.trainer.estimated_stepping_batches))
        effective = self.effective_batch_size()
        lr = hp.lr if hp.lr is not None else hp.base_lr * effective / 256
        log.info("MAE lr %.3g (base %.3g x effective batch %d / 256)", lr, hp.base_lr, effective)
        optimizer = self.optimizer_factory(mae_param_groups(self.net, hp.weight_decay), lr=lr)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
