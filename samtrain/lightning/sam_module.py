"""SamModule: the Lightning runner of SAM's interactive training recipe (SAM paper, appendix A).

One step: the encoder runs once per image (or the batch brings cached embeddings); then
:func:`samtrain.interactive.simulate.simulate_interaction` runs the 1 + 8 + 2 decoder passes over
every mask of the batch at once, through :meth:`SamModule.decoder`, each mask reading its own
image's embedding. This module adds what a run needs around it: freezing, activation
checkpointing, per-pass backward, the loss normaliser across ranks, validation, optimisation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import FSDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.checkpoint import checkpoint
from torch.utils.data import IterableDataset

from samtrain.distributed import is_sharded, refuse_empty_batch_if_sharded, world_size
from samtrain.frame import valid_regions
from samtrain.interactive.metrics import InteractiveMetrics
from samtrain.interactive.per_pass_backward import PerPassBackward
from samtrain.interactive.prompts import mask_keys
from samtrain.interactive.protocols import cached_features, evaluate_batch
from samtrain.interactive.simulate import Decode, LossWeights, PromptRecipe, Prompts, simulate_interaction
from samtrain.lightning.fault_tolerance import load_pending_loader_state, zero_loss
from samtrain.lightning.optim import sam_param_groups
from samtrain.lightning.sharding import fully_shard_sam
from samtrain.models.lora import has_lora
from samtrain.models.sam.image_encoder import set_encoder_checkpointing
from samtrain.models.sam.mask_decoder import DecoderImage
from samtrain.models.sam.model import Sam

SAM_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


def supports_object_scores(net) -> bool:
    """Whether the model's ``decode_masks`` can return object-score logits (SAM 2's head)."""
    decode = getattr(net, "decode_masks", None)
    return decode is not None and "return_object_scores" in inspect.signature(decode).parameters


VAL_RUNS_KEY = "samtrain_val_runs"  # checkpoint entry: the validation runs of the fit so far
# Validation scores the resized model-input frame (logits > 0, the eval transform's masks), not the
# published protocol at the original resolution (`samtrain eval`): its metric names say so.
VAL_METRIC_PREFIX = "resized_"


HALF_WEIGHTS = ("bf16-true", "16-true")  # Lightning's precisions that cast the weights to half


class SamModule(pl.LightningModule):
    """Trains a Sam with simulated interactive prompts.

    Args:
        net: the SAM model (``samtrain.models.build_sam``).
        optimizer: a partial optimizer taking the parameter groups (e.g. AdamW).
        scheduler: a partial lr schedule, called as ``scheduler(optimizer, total_steps=...)`` with the
            run's optimizer steps and stepped every optimizer step (e.g.
            ``samtrain.lightning.optim.step_schedule``); None: the lr stays constant.
        prompts: the prompt simulation recipe.
        loss: loss weights; ``loss.object_score > 0`` (SAM 2's recipe) asks the model for
            object-score logits (``decode_masks(..., return_object_scores=True)``).
        freeze: parts of the model that do not train ("image_encoder", ...).
        lr, weight_decay, layer_decay, encoder_lr, layer_decay_module, layer_decay_overrides: see
            ``samtrain.lightning.optim.sam_param_groups`` (SAM 2.1's finetune: encoder_lr 0.6 lr,
            layer decay 0.9 on ``image_encoder.trunk``, ``{"*pos_embed*": 1.0}``).
        seed: seeds the per-step prompt draws (with the global step and each mask's identity).
        val_max_clicks: clicks of the validation click curve (1 for the cheap metrics only).
        val_full_curve_every: in a fit, run the full click curve at every n-th validation run (the
            first, then every n-th, counted across resumes; the sanity check does not count) and at
            the fit's last validation, the first click only at the others; ``trainer.validate``
            outside a fit runs the full curve. 0: the first click only, always.
        encoder_checkpointing: recompute the encoder blocks' activations in the backward pass
            (timm's set_grad_checkpointing) instead of keeping them.
        decoder_checkpointing: the same for each decoder pass (prompt encoder + mask decoder).
        compile: torch.compile the image encoder and the mask decoder's transformer and upscaling
            in place (``Sam.compile_parts``) in ``configure_model``; True or torch.compile kwargs.
        decoder_backward_per_pass: backpropagate each decoder pass right after it
            (:class:`PerPassBackward`): the same gradients, with one pass's activations alive at
            a time instead of all of them, and nothing recomputed.
        frame: the input frame the data transforms make the samples in (``model.frame``: sam |
            square); None takes the net's own (``input_frame``); one the net does not take is refused.
    """

    def __init__(
        self,
        *,
        net: Sam,
        optimizer: Callable,
        scheduler: Callable[..., LRScheduler] | None = None,
        prompts: PromptRecipe | None = None,
        loss: LossWeights | None = None,
        freeze: Sequence[str] = (),
        lr: float = 8e-4,
        weight_decay: float = 0.1,
        layer_decay: float | None = None,
        encoder_lr: float | None = None,
        layer_decay_module: str = "image_encoder",
        layer_decay_overrides: dict[str, float] | None = None,
        seed: int = 0,
        val_max_clicks: int = 20,
        val_full_curve_every: int = 1,
        encoder_checkpointing: bool = False,
        decoder_checkpointing: bool = False,
        compile: bool | dict = False,
        decoder_backward_per_pass: bool = False,
        frame: str | None = None,
    ) -> None:
        super().__init__()
        # Plain values only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "prompts", "loss"], logger=False)
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.prompts = prompts or PromptRecipe()
        self.loss_weights = loss or LossWeights()
        self.hparams.update(prompts=asdict(self.prompts), loss=asdict(self.loss_weights))
        self.seed = seed
        self.freeze = tuple(freeze)
        unknown = set(self.freeze) - set(SAM_PARTS)
        if unknown:
            raise ValueError(f"freeze: unknown parts {sorted(unknown)}; choose from {SAM_PARTS}")
        if "image_encoder" in self.freeze and has_lora(self.net.image_encoder):
            raise ValueError("freeze: image_encoder would freeze its LoRA layers too; LoRA freezes the rest")
        for part in self.freeze:
            getattr(self.net, part).requires_grad_(False)
        net_frame = getattr(self.net, "input_frame", "sam")  # a stand-in net without one: SAM's
        if frame is not None and frame != net_frame:
            raise ValueError(
                f"model.frame={frame!r}, but {type(self.net).__name__} takes its input in the "
                f"{net_frame!r} frame: set model.frame={net_frame} (the data transforms read it; "
                "model=sam2_* sets square)"
            )
        self.frame = net_frame
        self.object_scores = self.loss_weights.wants_object_scores
        if self.object_scores and not supports_object_scores(self.net):
            raise ValueError(
                f"model.loss.object_score={self.loss_weights.object_score} needs a model with an object-score "
                f"head (SAM 2), but {type(self.net).__name__}.decode_masks has no return_object_scores; "
                "set model.loss.object_score=0 (e.g. model/loss=sam) for a SAM 1 model"
            )
        if encoder_checkpointing:
            set_encoder_checkpointing(self.net.image_encoder)
        self.decoder_checkpointing = decoder_checkpointing
        self.decoder_backward_per_pass = decoder_backward_per_pass
        self.compile_options = ({} if compile is True else dict(compile)) if compile else None
        self.val_max_clicks = val_max_clicks
        self.val_full_curve_every = val_full_curve_every
        self.val_runs = 0  # validation runs of the fit so far (sanity check excluded); checkpointed
        self.val_metrics = InteractiveMetrics(clicks=[k for k in (1, 3, 5, 9) if k <= val_max_clicks])
        self.named_val_metrics: dict[str, InteractiveMetrics] = {}

    # ------------------------------------------------------------------ training

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised -> (B, 256, S/16, S/16); without graph when the encoder is frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and "image_encoder" not in self.freeze):
            return self.net.image_encoder(images)

    def image_embeddings(self, batch: dict) -> Any:
        """The image features (SAM: (B, 256, S/16, S/16)): the batch's cached ones when it carries
        them, else the encoder's."""
        if "image_embedding" in batch:
            if "image_encoder" not in self.freeze:
                raise ValueError("cached image embeddings need image_encoder in model.freeze")
            return cached_features(self.net, batch)
        return self.encode(batch["image"])

    def decoder_image(self, embeddings: torch.Tensor) -> DecoderImage:
        """The image embeddings as every decoder pass of the step reads them (``Sam.prepare_image``)."""
        return self.net.prepare_image(embeddings)

    @staticmethod
    def batch_mask_keys(batch: dict) -> torch.Tensor:
        """int64 (N,) identities of the batch's masks (image id, ordinal): each mask's prompts are
        drawn from its identity, so they do not depend on the rank or the rest of the batch."""
        image_index = batch["mask_image_index"]
        image_ids = batch.get("image_id")
        if image_ids is None:
            image_ids = torch.arange(len(batch["input_size"]))
        return mask_keys(image_ids.to(image_index.device), image_index)

    def num_masks_across_ranks(self, n: int) -> torch.Tensor:
        """The mean number of masks per rank: dividing each rank's loss sum by it makes DDP's
        gradient average equal the mean over every mask of the global batch."""
        count = torch.tensor(float(n), device=self.device)
        if world_size() > 1:
            dist.all_reduce(count)
            count /= world_size()
        return count.clamp(min=1.0)

    def decoder(self, image: DecoderImage, image_indices: torch.Tensor) -> Decode:
        """The decode callable of the simulated interaction: every mask's prompts through the prompt
        encoder and the mask decoder at once, each mask reading its own image (``image_indices``)."""
        decode = self.net.decode_masks
        if self.decoder_checkpointing and torch.is_grad_enabled():
            decode = partial(checkpoint, decode, use_reentrant=False)

        extra = {"return_object_scores": True} if self.object_scores else {}

        def run(prompts: Prompts) -> tuple[torch.Tensor, ...]:
            # The prompts carry their own padding (a point is [point, pad], a box its two corners, or
            # [corners, pad] with prompts.pad_boxes), so each mask's tokens are exactly those the
            # official predictor builds for the same prompt.
            return decode(
                image,
                points=(prompts.coords, prompts.labels),
                mask_inputs=prompts.mask_input,
                image_indices=image_indices,
                pad_points=False,
                **extra,
            )

        return run

    def interactive_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The whole simulated interaction of one batch (``simulate_interaction``) -> (loss, logs)."""
        gt = batch["masks"]
        image_indices = batch["mask_image_index"]
        image = self.decoder_image(self.image_embeddings(batch))
        per_pass = None
        if self.decoder_backward_per_pass and torch.is_grad_enabled():
            decoder_side = [*self.net.prompt_encoder.parameters(), *self.net.mask_decoder.parameters()]
            per_pass = PerPassBackward(decoder_side, image, weight=self.pass_weight)
            image = per_pass.image
        result = simulate_interaction(
            self.decoder(image, image_indices),
            gt,
            valid=valid_regions(batch["input_size"], self.net.image_size)[image_indices],
            mask_keys=self.batch_mask_keys(batch),
            seed=self.seed,
            step=self.global_step,
            recipe=self.prompts,
            loss_weights=self.loss_weights,
            num_masks=self.num_masks_across_ranks(gt.shape[0]),
            backward_pass=None if per_pass is None else per_pass.backward,
        )
        return (result.loss if per_pass is None else per_pass.surrogate()), result.logs

    @property
    def passes_per_step(self) -> int:
        return 1 + self.prompts.num_click_passes + self.prompts.num_mask_only_passes

    @property
    def pass_weight(self) -> float:
        """The weight of each pass's loss in the step's: 1 / passes (their mean) or 1 (their sum)."""
        return 1.0 if self.loss_weights.pass_reduction == "sum" else 1.0 / self.passes_per_step

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if "masks" not in batch:  # every sample of the batch was unreadable (counted by SkippedSamplesBudget)
            return self.empty_batch_step()
        loss, logs = self.interactive_loss(batch)
        batch_size = batch["input_size"].shape[0]
        self.log_loss(logs.pop("loss"), batch_size)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=batch_size)
        self.log("train/num_masks", float(batch["masks"].shape[0]), batch_size=batch_size)
        return loss

    def log_loss(self, value: torch.Tensor, batch_size: int) -> None:
        # The mean over ranks is the loss of the global batch (each rank's loss is normalised by the
        # mean mask count per rank), so a DDP run logs what one process with its global batch would.
        self.log("train/loss", value, prog_bar=True, batch_size=batch_size, sync_dist=True)

    def empty_batch_step(self) -> torch.Tensor | None:
        """The step of a batch with no readable sample: skipped (None) in a single process. Under DDP
        this rank still takes part in every collective of a step (the mask count, the synced loss log,
        the gradient all-reduce), else the other ranks would wait for it forever: its loss is zero
        with a zero gradient for every trainable parameter, so it adds nothing to the global batch."""
        refuse_empty_batch_if_sharded(self.trainer, "training")
        if world_size() == 1:
            return None
        self.num_masks_across_ranks(0)
        loss = zero_loss(self)
        self.log_loss(loss.detach(), batch_size=1)
        return loss

    def on_train_start(self) -> None:
        load_pending_loader_state(self.trainer)

    def on_train_epoch_start(self) -> None:
        """Tells a streaming train dataset the epoch (Lightning does this for samplers only): the
        stream's shard order and augmentation seeds follow it."""
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if isinstance(dataset, IterableDataset) and hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)

    # ------------------------------------------------------------------ validation

    def val_clicks(self) -> int:
        """The clicks of this validation run: the first click only when ``val_full_curve_every`` is 0;
        else the full curve outside fitting, and in a fit at every ``val_full_curve_every``-th run
        (the first included) and at its last run, the first click only at the others."""
        every = self.val_full_curve_every
        if every <= 0:
            return 1
        if self.trainer.state.fn != TrainerFn.FITTING:
            return self.val_max_clicks
        return self.val_max_clicks if self.val_runs % every == 0 or self.is_last_fit_validation() else 1

    def is_last_fit_validation(self) -> bool:
        """Whether this validation comes in the fit's last epoch or after its last step (a limit of -1
        or None is no limit: step-based runs have max_epochs=-1)."""
        max_epochs, max_steps = self.trainer.max_epochs, self.trainer.max_steps
        last_epoch = max_epochs is not None and max_epochs >= 0 and self.current_epoch >= max_epochs - 1
        last_step = max_steps is not None and max_steps >= 0 and self.global_step >= max_steps
        return last_epoch or last_step

    def val_names(self) -> list[str] | None:
        """The names of the val loaders when the data module has several (``val_datasets``)."""
        return getattr(getattr(self.trainer, "datamodule", None), "val_names", None)

    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()
        # Several val datasets: each scored on its own as well as together (val/<name>/<metric>).
        self.named_val_metrics = {name: self.val_metrics.clone() for name in self.val_names() or ()}
        self._clicks_this_epoch = self.val_clicks()
        if self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking:
            self.val_runs += 1

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[VAL_RUNS_KEY] = self.val_runs

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.val_runs = int(checkpoint.get(VAL_RUNS_KEY, 0))

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if "masks" not in batch:  # every sample was unreadable
            refuse_empty_batch_if_sharded(self.trainer, "validation")
            return
        out = evaluate_batch(self.net, batch, max_clicks=self._clicks_this_epoch)
        scored = [self.val_metrics]
        if self.named_val_metrics:
            scored.append(self.named_val_metrics[self.val_names()[dataloader_idx]])
        for metrics in scored:
            metrics.update(out["ious"], box_ious=out["box_ious"], pred_ious=out["pred_ious"])

    def on_validation_epoch_end(self) -> None:
        self._log_val_metrics("val", self.val_metrics)
        for name, metrics in self.named_val_metrics.items():
            self._log_val_metrics(f"val/{name}", metrics)

    def _log_val_metrics(self, prefix: str, val_metrics: InteractiveMetrics) -> None:
        metrics = val_metrics.compute()  # gathers every rank's objects
        if self._clicks_this_epoch < self.val_max_clicks:  # NoC and NoF need the whole curve
            metrics = {k: v for k, v in metrics.items() if not k.startswith(("NoC", "NoF"))}
        # Identical on every rank already; sync_dist averages identical values (and keeps Lightning quiet).
        self.log_dict(
            {f"{prefix}/{VAL_METRIC_PREFIX}{k}": v.float() for k, v in metrics.items()}, sync_dist=True
        )

    # ------------------------------------------------------------------ optimisation

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Norm clipping as configured; under FSDP through the sharded root module, whose
        ``clip_grad_norm_`` computes the norm over every rank's shard."""
        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def setup(self, stage: str) -> None:
        precision = str(getattr(self.trainer, "precision", "32-true"))
        if precision in HALF_WEIGHTS:
            raise ValueError(
                f"trainer.precision={precision}: samtrain trains float32 weights, in 32-true or mixed "
                "precision (bf16-mixed, 16-mixed); half-precision weights would need the sampled "
                "prompts and the losses in half precision too"
            )
        if not self.decoder_backward_per_pass:
            return
        if is_sharded(self.trainer):
            raise ValueError(
                "model.decoder_backward_per_pass does not work with a sharded strategy "
                f"({type(self.trainer.strategy).__name__}: a backward pass inside the forward would run "
                "its gradient hooks early); use model.decoder_checkpointing=true"
            )
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"model.decoder_backward_per_pass does not work with fp16 mixed precision "
                f"(trainer.precision={self.trainer.precision}): its per-pass gradients would bypass the "
                "gradient scaler; use trainer.precision=bf16-mixed or model.decoder_checkpointing=true"
            )

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (``trainer=fsdp2``) shard the net with FSDP2
        (:func:`samtrain.lightning.sharding.fully_shard_sam`); then compile the encoder and decoder in
        place when ``compile`` is set (state-dict keys unchanged). Lightning calls this before fitting,
        validating and testing, and a second call does nothing."""
        if self.device_mesh is not None:
            fully_shard_sam(self.net, self.device_mesh["data_parallel"])
        if self.compile_options is not None and not self.net.compiled:
            self.net.compile_parts(**self.compile_options)

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups (``sam_param_groups`` with this module's settings)."""
        return sam_param_groups(
            self.net,
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
            layer_decay=self.hparams.layer_decay,
            encoder_lr=self.hparams.encoder_lr,
            layer_decay_module=self.hparams.layer_decay_module,
            layer_decay_overrides=self.hparams.layer_decay_overrides,
        )

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.param_groups())
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
