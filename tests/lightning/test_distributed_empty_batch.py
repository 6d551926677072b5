"""A DDP rank whose batch held no readable sample keeps step with the others (real processes on CPU)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl

from tests.lightning.test_distributed import assert_same_weights, save_weights, train, train_losses, weights

pytestmark = pytest.mark.slow


class EmptyBatchOnRank(pl.Callback):
    """Empties this rank's batch at the given steps, as ``collate_sam_batch`` does when none of its
    samples could be read (``{"num_skipped": n}``)."""

    def __init__(self, *, rank: int, steps: list[int]) -> None:
        self.rank = int(rank)
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step in self.steps:
            skipped = len(batch["input_size"])
            batch.clear()
            batch["num_skipped"] = skipped


def test_a_rank_with_an_empty_batch_keeps_step_with_the_others(tmp_path):
    empty = (
        f"+callbacks.empty._target_={__name__}.EmptyBatchOnRank",
        "+callbacks.empty.rank=1",
        "+callbacks.empty.steps=[1]",
    )
    # Without the empty rank's part in the step's collectives, rank 0 would wait forever (the timeout).
    train(tmp_path, "trainer=ddp_cpu", "trainer.max_steps=3", *empty, *save_weights(tmp_path), timeout=180)
    assert_same_weights(weights(tmp_path, 0), weights(tmp_path, 1))  # one update, the same on both ranks
    assert len(train_losses(tmp_path)) == 3
