"""The budget of unreadable samples: :class:`SkippedSamplesBudget` counts the samples the loaders
skipped (over all ranks) and stops the run once too many training samples failed."""

from __future__ import annotations

import pytorch_lightning as pl
import torch


class SkippedSamplesBudget(pl.Callback):
    """Counts the samples the loaders could not read and stops the run past a budget.

    ``collate_sam_batch`` reports each batch's unreadable samples in ``batch["num_skipped"]``
    (the log names each file and the reason). Each rank reads its own share of the data, so the
    counts are summed over ranks (one scalar reduction per training batch, and one per
    validation run, when ``world_size > 1``): every rank holds the same run-wide count, and once
    more than ``max_skipped`` training samples failed every rank raises at the same step, rather
    than one rank raising while the others wait for it in the next collective.

    Logged: ``data/skipped_train``, the training samples skipped so far in the run (saved in
    checkpoints, so a resumed run goes on counting), and ``data/skipped_val``, the samples each
    validation run skipped. Runs on every rank.

    Args:
        max_skipped: unreadable training samples tolerated, over all ranks.
    """

    def __init__(self, *, max_skipped: int = 100) -> None:
        self.max_skipped = max_skipped
        self.skipped_train = 0  # over all ranks: the same on every rank
        self._skipped_val = 0  # this rank, this validation run

    @staticmethod
    def _sum_over_ranks(trainer: pl.Trainer, count: int) -> int:
        if trainer.world_size == 1:
            return count
        total = trainer.strategy.reduce(
            torch.tensor(count, device=trainer.strategy.root_device), reduce_op="sum"
        )
        return int(total.item())

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict, batch_idx: int
    ) -> None:
        # Every rank reduces at every batch, skipped samples or not: the ranks decide together.
        skipped = self._sum_over_ranks(trainer, int(batch.get("num_skipped", 0)))
        if not skipped:
            return
        self.skipped_train += skipped
        pl_module.log("data/skipped_train", float(self.skipped_train), reduce_fx="max")
        if self.skipped_train > self.max_skipped:
            raise RuntimeError(
                f"{self.skipped_train} training samples could not be read, more than the budget of "
                f"{self.max_skipped} (callbacks.skipped_samples.max_skipped); the log names each file and reason"
            )

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._skipped_val = 0

    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # Reduced once per validation run, not per batch: the ranks need not have as many val batches.
        self._skipped_val += int(batch.get("num_skipped", 0))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        skipped = self._sum_over_ranks(trainer, self._skipped_val)
        if skipped:
            # The same value on every rank already; sync_dist only keeps Lightning from warning.
            pl_module.log("data/skipped_val", float(skipped), reduce_fx="max", sync_dist=True)

    def state_dict(self) -> dict:
        return {"train": self.skipped_train}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_train = int(state_dict.get("train", 0))
