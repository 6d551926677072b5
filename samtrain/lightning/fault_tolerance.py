"""Callbacks that keep a long run alive: bad steps are skipped, preemption leaves a checkpoint.

- :class:`NonFiniteGuard`: a step whose gradients are not finite changes no weight; it is counted
  and logged, and past a budget the run stops with a clear error. A checkpoint is never written
  from non-finite weights.
- :class:`PreemptionCheckpoint`: SIGTERM (and SIGUSR1 outside SLURM, where Lightning's own SLURM
  handler saves and requeues) finishes the current step, writes ``last.ckpt`` and exits cleanly.
- :func:`zero_loss`: what a rank whose batch held no readable sample returns under DDP, so that it
  still takes part in the gradient all-reduce instead of leaving the other ranks waiting. Under a
  sharded strategy (FSDP) such a batch cannot be skipped:
  :func:`samtrain.distributed.refuse_empty_batch_if_sharded`.

Checkpoint files are written atomically by :class:`samtrain.lightning.checkpoint_io.AtomicCheckpointIO`
(a temporary file in the checkpoint's own folder, renamed into place), which the runner installs.
Lightning's own writer is not atomic when the temporary folder is on another file system: it
stages the file in ``TMPDIR`` and moves it, and such a move is a copy, which a kill leaves half
done (``tests/lightning/test_checkpoint_io.py`` shows both).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


def zero_loss(module: torch.nn.Module) -> torch.Tensor:
    """A scalar 0 whose gradient is zero for every trainable parameter of ``module``: the loss of a
    distributed step that has no data on this rank (every parameter then gets a zero gradient to
    all-reduce, as DDP expects)."""
    sums = [p.sum() for p in module.parameters() if p.requires_grad]
    if not sums:
        return torch.zeros(())
    return torch.stack(sums).sum() * 0.0


def _gradients(module: torch.nn.Module) -> list[torch.Tensor]:
    """This rank's gradients: a sharded (FSDP2 DTensor) gradient's local shard, empty shards left out."""
    grads = (p.grad for p in module.parameters() if p.grad is not None)
    local = (g.to_local() if hasattr(g, "to_local") else g for g in grads)
    return [g for g in local if g.numel()]


def gradients_are_finite(module: torch.nn.Module) -> torch.Tensor:
    """bool (): whether every gradient of ``module`` held by this rank is finite (one reduction, no
    per-tensor sync; under a sharded strategy the guard then reduces the ranks' answers)."""
    grads = _gradients(module)
    if not grads:
        return torch.tensor(True)
    norms = torch._foreach_norm(grads, float("inf"))
    return torch.isfinite(torch.stack(norms)).all()


def non_finite_tensors(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` that hold a NaN or an infinity."""
    return [
        name
        for name, value in state_dict.items()
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()
    ]


class NonFiniteGuard(pl.Callback):
    """Skips optimizer steps whose gradients hold a NaN or an infinity.

    After the backward pass (gradients already all-reduced under DDP; under sharded strategies the
    ranks agree through one boolean reduction) every gradient is dropped when any is not finite, so
    the optimizer leaves every weight and its moments as they were. Under fp16 mixed precision the
    gradient scaler already skips overflowing steps (a few are part of finding the loss scale), so
    the guard leaves those to it. Each skipped step is counted,
    logged as ``train/nonfinite_steps`` with a warning, and saved in checkpoints; more than
    ``max_skipped`` stops the run with an error. Saving a checkpoint whose weights are not finite
    raises instead of writing it.

    A skipped step still counts as a step: ``global_step`` advances and so does the learning-rate
    schedule (Lightning steps the scheduler after every optimizer step, and the optimizer step runs,
    finding no gradient). The schedule thus stays a function of the global step, as the step-keyed
    prompt draws, ``max_steps`` and a resume are; a skipped step uses up its share of the warmup
    and decay instead of shifting the rest of the schedule by one. AdamW's own step count (its bias
    correction) advances only on the steps that changed the weights, since parameters without a
    gradient are left out of the update.
    """

    def __init__(self, *, max_skipped: int = 10) -> None:
        self.max_skipped = int(max_skipped)
        self.skipped = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16 loss scaling skips overflowing steps itself, and expects some
        finite = bool(gradients_are_finite(pl_module))
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            self.skip_step(trainer, pl_module, optimizer)
        pl_module.log("train/nonfinite_steps", float(self.skipped), reduce_fx="max", rank_zero_only=True)

    def skip_step(self, trainer, pl_module, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)  # parameters without gradient are left untouched
        self.skipped += 1
        log.warning(
            "step %d: non-finite gradients, the step is skipped (%d so far, budget %d)",
            trainer.global_step,
            self.skipped,
            self.max_skipped,
        )
        if self.skipped > self.max_skipped:
            raise RuntimeError(
                f"{self.skipped} training steps had non-finite gradients, more than the budget of "
                f"{self.max_skipped} (callbacks.nonfinite_guard.max_skipped); lower the learning rate, "
                "check the data, or train in fp32"
            )

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        bad = non_finite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise RuntimeError(
                f"refusing to write a checkpoint at step {trainer.global_step}: non-finite weights in "
                f"{bad[:5]}{' ...' if len(bad) > 5 else ''}"
            )

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM, saves ``<dirpath>/last.ckpt`` after the current step and lets the run exit cleanly.

    Lightning stops its loops on SIGTERM (all ranks agree) by raising ``SIGTERMException``; this
    callback writes the checkpoint as that exception passes, so ``ckpt_path=<dirpath>/last.ckpt``
    resumes mid-epoch. Outside SLURM, SIGUSR1 is treated as SIGTERM; under SLURM it stays
    Lightning's (checkpoint and requeue, with ``#SBATCH --signal=SIGUSR1@90``).
    """

    def __init__(self, *, dirpath: str | Path, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self._previous_handler = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if not SLURMEnvironment.detect() and hasattr(signal, "SIGUSR1"):
            self._previous_handler = signal.signal(signal.SIGUSR1, _as_sigterm)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGUSR1, self._previous_handler)
            self._previous_handler = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        trainer.save_checkpoint(self.path)
        log.warning("preempted at step %d: saved %s", trainer.global_step, self.path)


def _as_sigterm(signum, frame) -> None:
    signal.raise_signal(signal.SIGTERM)


def load_pending_loader_state(trainer: pl.Trainer) -> None:
    """Makes a resumed run continue from the checkpoint's train-loader state (call in ``on_train_start``).

    A module whose ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` makes
    Lightning build the train loader and its iterator before the checkpoint is restored; the saved
    loader state then never reaches that iterator (Lightning issue 20550) and a mid-epoch resume
    would restart the epoch. Dropping the early loader makes Lightning build it again at the start
    of the epoch, this time with the saved state loaded, before any batch is drawn.
    """
    fit_loop = trainer.fit_loop
    if not hasattr(fit_loop, "_combined_loader_states_to_load") or not hasattr(fit_loop, "_combined_loader"):
        # The Lightning internals this relies on (read in 2.6) have changed.
        log.warning(
            "this Lightning version's fit loop has no pending loader state to restore: a mid-epoch "
            "resume may restart the epoch (samtrain.lightning.fault_tolerance.load_pending_loader_state)"
        )
        return
    if fit_loop.restarting and fit_loop._combined_loader_states_to_load:
        fit_loop._combined_loader = None
