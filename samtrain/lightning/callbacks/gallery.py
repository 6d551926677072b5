"""The prediction gallery: pictures of a few fixed validation objects at each validation during fit.

Each object is drawn with its ground truth, the box-prompt prediction and the predictions of the
click protocol (:func:`samtrain.interactive.protocols.trace_interaction`), saved as a PNG grid and logged to
every WandbLogger as ``wandb.Image`` with ground-truth and prediction masks.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn

from samtrain import visualize as vis
from samtrain.distributed import is_sharded
from samtrain.interactive.protocols import trace_interaction
from samtrain.lightning.callbacks.wandb_artifacts import wandb_loggers

log = logging.getLogger(__name__)

MASK_CLASSES = {0: "background", 1: "object"}

# Strategies that shard the model over ranks: rank zero cannot run it alone.


class PredictionGallery(pl.Callback):
    """Pictures of a fixed set of validation objects at each validation during fit.

    The set: the first ``num_images`` images that have masks in the first validation run (not
    the sanity check), at most ``max_masks`` masks each, kept on the CPU. Each object is a row:
    image | ground truth | box prediction (box drawn) | prediction after 1 click | after
    ``num_clicks`` clicks (clicks drawn: green positive, red negative); predictions are filled
    blue with the ground-truth contour in gold; labels give the IoU. The grid is saved as
    ``<dirpath>/<filename>.png`` and, for every WandbLogger, logged under ``log_key`` (one
    ``wandb.Image`` per object with ``ground_truth`` and ``prediction`` masks, the prediction
    after ``num_clicks`` clicks) and ``<log_key>_grid`` (the grid).

    Runs on global rank zero only and not under sharded strategies (FSDP, DeepSpeed, model
    parallel), where rank zero cannot run the model alone; an error is logged as a warning and
    the run goes on. Batches without images (cached embeddings) give no picture: it warns once.

    Args:
        num_images: images in the set.
        max_masks: objects per image.
        num_clicks: clicks of the click protocol (panels after 1 and after ``num_clicks``).
        panel_size: the longer side of each panel in pixels (images are scaled to it).
        dirpath: where the PNGs go (default ``<trainer.default_root_dir>/gallery``).
        filename: format string with ``epoch`` and ``step``.
        log_key: wandb key.
    """

    def __init__(
        self,
        *,
        num_images: int = 4,
        max_masks: int = 2,
        num_clicks: int = 3,
        panel_size: int = 256,
        dirpath: str | Path | None = None,
        filename: str = "epoch{epoch:03d}-step{step:06d}",
        log_key: str = "val/gallery",
    ) -> None:
        if num_images < 1 or max_masks < 1 or num_clicks < 1:
            raise ValueError("num_images, max_masks and num_clicks must be >= 1")
        self.num_images = num_images
        self.max_masks = max_masks
        self.num_clicks = num_clicks
        self.panel_size = panel_size
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.filename = filename
        self.log_key = log_key
        self.samples: list[dict[str, Any]] = []
        self._collecting = True
        self._warned_no_images = False

    # -------------------------------------------------------------- hooks

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if (
            self._collecting
            and not trainer.sanity_checking
            and dataloader_idx == 0
            and trainer.is_global_zero
        ):
            self.collect(batch)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._collecting = False  # the set is fixed after the first real validation run
        if trainer.state.fn != TrainerFn.FITTING or not trainer.is_global_zero or not self.samples:
            return
        if is_sharded(trainer):
            log.warning("PredictionGallery: skipped under %s", type(trainer.strategy).__name__)
            return
        try:
            self.write(trainer, pl_module)
        except Exception:
            log.warning("PredictionGallery failed; training goes on", exc_info=True)

    # -------------------------------------------------------------- work

    def collect(self, batch: dict) -> None:
        """Keep the images of ``batch`` that have masks, on the CPU, until there are ``num_images``."""
        if "image" not in batch:
            if "masks" in batch and not self._warned_no_images:  # objects, but no image to draw them on
                rank_zero_warn(
                    "PredictionGallery: the validation batches carry no images (cached embeddings?), so "
                    "there is nothing to draw; turn it off with `callbacks.prediction_gallery=null`."
                )
                self._warned_no_images = True
            return  # else every sample of the batch was unreadable
        for b in range(batch["image"].shape[0]):
            if len(self.samples) >= self.num_images:
                return
            masks = batch["masks"][batch["mask_image_index"] == b][: self.max_masks]
            if len(masks) == 0:
                continue
            image_id = batch["image_id"][b] if "image_id" in batch else len(self.samples)
            self.samples.append(
                {
                    # Copies: a view would keep the whole batch alive.
                    "image": batch["image"][b].detach().to("cpu", torch.float32, copy=True),
                    "masks": masks.detach().to("cpu", torch.bool, copy=True),
                    "input_size": batch["input_size"][b].detach().to("cpu", copy=True),
                    "image_id": int(image_id),
                }
            )

    def predict(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """Both protocols on the kept objects (model in eval mode, no grad), results on the CPU."""
        net = getattr(pl_module, "net", pl_module)
        was_training = net.training
        net.eval()
        try:
            param = next(net.image_encoder.parameters())
            images = torch.stack([s["image"] for s in self.samples]).to(param.device, param.dtype)
            masks = torch.cat([s["masks"] for s in self.samples]).to(param.device)
            counts = torch.tensor([len(s["masks"]) for s in self.samples])
            indices = torch.repeat_interleave(torch.arange(len(self.samples)), counts).to(param.device)
            sizes = torch.stack([s["input_size"] for s in self.samples]).to(param.device)
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                embeddings = net.image_encoder(images)
                out = trace_interaction(
                    net,
                    embeddings,
                    masks,
                    image_indices=indices,
                    input_sizes=sizes,
                    num_clicks=self.num_clicks,
                )
        finally:
            net.train(was_training)
        out = {k: v.cpu() for k, v in out.items()}
        out["gt_masks"] = masks.cpu()
        out["image_indices"] = indices.cpu()
        return out

    def render(self, out: dict[str, torch.Tensor]) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """The grid ``(H, W, 3) uint8`` and, per object, what wandb gets (image, masks, caption)."""
        clicks_shown = sorted({1, self.num_clicks})
        rows, objects = [], []
        seen: dict[int, int] = defaultdict(int)
        for i, b in enumerate(out["image_indices"].tolist()):
            sample = self.samples[b]
            h, w = (int(v) for v in sample["input_size"])
            scale = self.panel_size / max(h, w)
            base = vis.rescale_image(vis.unnormalize_image(sample["image"].numpy(), (h, w)), scale)

            def crop(mask: torch.Tensor, h=h, w=w, scale=scale) -> np.ndarray:
                return vis.resize_mask(mask[:h, :w].numpy(), scale)

            def to_panel(xy: np.ndarray, scale=scale) -> np.ndarray:
                return (xy + 0.5) * scale - 0.5  # pixel centres of the model frame -> of the panel

            gt = crop(out["gt_masks"][i])
            obj = seen[b]
            seen[b] += 1
            x1, y1, x2, y2 = out["boxes"][i].tolist()
            box = (x1 * scale, y1 * scale, (x2 + 1) * scale - 1, (y2 + 1) * scale - 1)
            row = [
                vis.label_panel(base, f"image {sample['image_id']} obj {obj}"),
                vis.label_panel(vis.overlay_mask(base, gt, vis.GT_COLOR), "ground truth"),
                vis.label_panel(
                    vis.draw_box(vis.overlay_masks(base, gt=gt, pred=crop(out["box_masks"][i])), box),
                    f"box IoU {float(out['box_ious'][i]):.2f}",
                ),
            ]
            coords = to_panel(out["click_coords"][i].numpy())
            labels = out["click_labels"][i].numpy()
            for k in clicks_shown:
                panel = vis.overlay_masks(base, gt=gt, pred=crop(out["click_masks"][i, k - 1]))
                panel = vis.draw_clicks(panel, coords[:k], labels[:k])
                noun = "click" if k == 1 else "clicks"
                row.append(vis.label_panel(panel, f"{k} {noun} IoU {float(out['click_ious'][i, k - 1]):.2f}"))
            rows.append(row)
            k = self.num_clicks
            size = (self.panel_size, self.panel_size)  # one size for all: wandb shows a list of images alike
            objects.append(
                {
                    "image": vis.pad_to(
                        vis.draw_clicks(base, coords[:k], labels[:k]), *size, vis.BACKGROUND_COLOR
                    ),
                    "masks": {
                        "ground_truth": {
                            "mask_data": vis.pad_to(gt.astype(np.uint8), *size),
                            "class_labels": MASK_CLASSES,
                        },
                        "prediction": {
                            "mask_data": vis.pad_to(
                                crop(out["click_masks"][i, k - 1]).astype(np.uint8), *size
                            ),
                            "class_labels": MASK_CLASSES,
                        },
                    },
                    "caption": (
                        f"image {sample['image_id']} obj {obj}: {k} clicks IoU "
                        f"{float(out['click_ious'][i, k - 1]):.2f}, box IoU {float(out['box_ious'][i]):.2f}"
                    ),
                }
            )
        return vis.make_grid(rows), objects

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        """Predict, render, save the PNG and log to wandb; returns the PNG's path."""
        grid, objects = self.render(self.predict(trainer, pl_module))
        dirpath = self.dirpath or Path(trainer.default_root_dir) / "gallery"
        name = self.filename.format(epoch=trainer.current_epoch, step=trainer.global_step)
        path = dirpath / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
        for logger in wandb_loggers(trainer):
            logger.log_image(
                key=self.log_key,
                images=[o["image"] for o in objects],
                step=trainer.global_step,
                masks=[o["masks"] for o in objects],
                caption=[o["caption"] for o in objects],
            )
            logger.log_image(
                key=f"{self.log_key}_grid", images=[grid], step=trainer.global_step, caption=[name]
            )
        return path
