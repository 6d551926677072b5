"""Fault tolerance: non-finite steps skipped and counted, checkpoints never non-finite, the resume
workaround, empty batches under sharded strategies."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import hydra
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy

from samtrain.commands.train import build_run
from samtrain.distributed import refuse_empty_batch_if_sharded
from samtrain.lightning.fault_tolerance import (
    NonFiniteGuard,
    gradients_are_finite,
    load_pending_loader_state,
    non_finite_tensors,
)
from samtrain.lightning.mae_module import MaeModule
from samtrain.models.mae import build_mae

STEPS = ("trainer.max_steps=4", "trainer.limit_train_batches=4", "trainer.limit_val_batches=0")


def poison_steps(module: pl.LightningModule, steps: set[int]) -> None:
    """Makes the loss NaN at the given global steps."""
    original = module.interactive_loss

    def interactive_loss(batch):
        loss, logs = original(batch)
        return (loss * float("nan") if module.global_step in steps else loss), logs

    module.interactive_loss = interactive_loss


class WeightsAroundStep(pl.Callback):
    """Keeps a copy of the weights before and after one training step."""

    def __init__(self, step: int) -> None:
        self.step, self.before, self.after = step, None, None

    def _copy(self, module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.net.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.before = self._copy(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step + 1:
            self.after = self._copy(pl_module)


def guard_of(trainer: pl.Trainer) -> NonFiniteGuard:
    return next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))


def test_a_nan_step_is_skipped_counted_and_training_goes_on(tiny_cfg):
    datamodule, module, trainer = build_run(tiny_cfg(*STEPS))
    poison_steps(module, {1})
    around = WeightsAroundStep(1)
    trainer.callbacks.append(around)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 4
    assert guard_of(trainer).skipped == 1
    assert trainer.callback_metrics["train/nonfinite_steps"] == 1
    for name, value in around.before.items():
        assert torch.equal(value, around.after[name]), name  # the skipped step changed nothing
    assert not non_finite_tensors(module.state_dict())
    # The skipped step advances the learning-rate schedule (it follows global_step) but not AdamW's
    # own step count, so bias correction counts only the steps that changed the weights.
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == trainer.global_step == 4
    adam_steps = {int(state["step"]) for state in trainer.optimizers[0].state.values()}
    assert adam_steps == {3}
    last = torch.load(trainer.checkpoint_callback.last_model_path, weights_only=True)
    assert last["callbacks"][next(k for k in last["callbacks"] if "NonFiniteGuard" in k)] == {"skipped": 1}


def test_past_the_budget_the_run_stops_with_a_clear_error(tiny_cfg):
    datamodule, module, trainer = build_run(tiny_cfg(*STEPS, "callbacks.nonfinite_guard.max_skipped=1"))
    poison_steps(module, {0, 1, 2, 3})
    with pytest.raises(RuntimeError, match=r"2 training steps had non-finite gradients.*budget of 1"):
        trainer.fit(module, datamodule=datamodule)


def test_gradients_are_finite():
    layer = torch.nn.Linear(3, 2)
    assert gradients_are_finite(layer)  # no gradients yet
    layer(torch.ones(1, 3)).sum().backward()
    assert gradients_are_finite(layer)
    layer.bias.grad[0] = float("inf")
    assert not gradients_are_finite(layer)


def test_a_checkpoint_of_non_finite_weights_is_refused():
    guard = NonFiniteGuard()
    state = {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")]), "step": torch.tensor(3)}
    assert non_finite_tensors(state) == ["b"]
    trainer = type("T", (), {"global_step": 7})()
    with pytest.raises(RuntimeError, match=r"step 7: non-finite weights in \['b'\]"):
        guard.on_save_checkpoint(trainer, None, {"state_dict": state})
    guard.on_save_checkpoint(trainer, None, {"state_dict": {"a": torch.ones(2)}})


def test_fp16_loss_scaling_handles_its_own_overflows():
    layer = torch.nn.Linear(2, 1)
    layer(torch.ones(1, 2)).sum().backward()
    layer.bias.grad[0] = float("inf")
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaled = type("T", (), {"precision_plugin": type("P", (), {"scaler": object()})()})()
    guard = NonFiniteGuard()
    guard.on_before_optimizer_step(scaled, layer, optimizer)
    assert guard.skipped == 0 and layer.bias.grad is not None  # left to the scaler


def test_loader_state_workaround_warns_when_lightning_internals_change(caplog):
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(restarting=True))
    with caplog.at_level(logging.WARNING):
        load_pending_loader_state(trainer)
    assert "may restart the epoch" in caplog.text


def test_an_empty_batch_under_a_sharded_strategy_is_a_clear_error():
    """FSDP ranks gather weights from each other in every forward pass: a rank without data cannot
    skip its step (the others would wait forever), so it stops with a message saying what to do."""
    fsdp = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(RuntimeError, match=r"rank 0 holds no readable sample.*FSDPStrategy.*check-data"):
        refuse_empty_batch_if_sharded(fsdp, "training")
    refuse_empty_batch_if_sharded(SimpleNamespace(strategy=DDPStrategy()), "training")
    refuse_empty_batch_if_sharded(None, "validation")


def test_modules_refuse_empty_batches_under_fsdp(tiny_cfg):
    sam = hydra.utils.instantiate(tiny_cfg().model)
    mae = MaeModule(
        net=build_mae("vit_t", image_size=32, decoder_depth=1, decoder_dim=32, decoder_num_heads=4)
    )
    for module in (sam, mae):
        module._trainer = SimpleNamespace(strategy=FSDPStrategy(), global_rank=0)
        for step in (module.training_step, module.validation_step):
            with pytest.raises(RuntimeError, match="no readable sample"):
                step({"num_skipped": 2}, 0)
