"""The training step: prompt roles, gradients by part, multimask candidates, reproducible losses."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch.utils.data import IterableDataset

import samtrain.interactive.simulate as simulate
from samtrain.frame import valid_regions
from samtrain.interactive.simulate import Prompts
from samtrain.lightning.sam_module import SamModule
from samtrain.models import build_sam

EXPECTED_LOSSES = Path(__file__).resolve().parents[1] / "fixtures" / "expected_losses.json"


def first_batch(cfg):
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


@pytest.mark.parametrize("freeze", [[], ["image_encoder"], ["image_encoder", "prompt_encoder"]])
def test_gradients_reach_trainable_parts_only(tiny_cfg, freeze):
    cfg = tiny_cfg(f"model.freeze=[{','.join(freeze)}]")
    module = hydra.utils.instantiate(cfg.model)
    loss, _ = module.interactive_loss(first_batch(cfg))
    assert torch.isfinite(loss)
    loss.backward()
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        params = list(getattr(module.net, part).named_parameters())
        if part in freeze:
            assert all(p.grad is None for _, p in params), part
        else:
            missing = [n for n, p in params if p.grad is None]
            assert not missing, f"{part}: no gradient for {missing}"
            assert any(p.grad.abs().sum() > 0 for _, p in params), part


def test_frozen_parameters_are_not_optimised(tiny_cfg):
    module = hydra.utils.instantiate(tiny_cfg("model.freeze=[image_encoder]", "model.scheduler=null").model)
    optimiser = module.configure_optimizers()
    optimised = {id(p) for group in optimiser.param_groups for p in group["params"]}
    assert not any(id(p) in optimised for p in module.net.image_encoder.parameters())
    assert all(id(p) in optimised for p in module.net.mask_decoder.parameters())


def test_same_step_same_prompts(tiny_cfg):
    """The prompts depend on (seed, step, rank) only: a resumed run draws what the original drew."""
    cfg = tiny_cfg()
    module = hydra.utils.instantiate(cfg.model)
    batch = first_batch(cfg)
    with torch.no_grad():
        first, _ = module.interactive_loss(batch)
        again, _ = module.interactive_loss(batch)
    assert torch.equal(first, again)


def test_training_clicks_on_a_perfect_prediction_stay_inside_the_image(tiny_cfg, monkeypatch):
    """A mask already predicted perfectly gets a negative click on its image's background, never in
    the padding right of or below an image smaller than S."""
    module = hydra.utils.instantiate(tiny_cfg().model)
    masks = torch.zeros(4, 64, 64, dtype=torch.bool)
    for i, (top, bottom, left, right) in enumerate(
        [(5, 20, 5, 30), (20, 35, 10, 40), (5, 20, 5, 30), (30, 50, 2, 20)]
    ):
        masks[i, top:bottom, left:right] = True
    batch = {
        "image": torch.randn(2, 3, 64, 64),
        "masks": masks,
        "mask_image_index": torch.tensor([0, 0, 1, 1]),
        "input_size": torch.tensor([[40, 48], [64, 32]]),  # (h, w): padding right and below
    }
    # Every pass's prediction is the ground truth: each click is the "no error" fallback.
    monkeypatch.setattr(simulate, "masks_in_frame", lambda logits, valid: masks)
    clicks, sample = [], simulate.sample_error_points

    def recording_sampler(*args, **kwargs):
        clicks.append(sample(*args, **kwargs))
        return clicks[-1]

    monkeypatch.setattr(simulate, "sample_error_points", recording_sampler)
    with torch.no_grad():
        module.interactive_loss(batch)
    inside = valid_regions(batch["input_size"], 64)[batch["mask_image_index"]]
    assert len(clicks) == module.prompts.num_click_passes
    for points, labels in clicks:
        x, y = points[:, 0].long().unbind(-1)
        assert (labels == 0).all()
        assert inside[torch.arange(4), y, x].all(), points[:, 0].tolist()
        assert not masks[torch.arange(4), y, x].any()


# ----------------------------------------------------------------------------------------------------------
# a batch with no readable sample


def fake_two_ranks(monkeypatch) -> list[torch.Tensor]:
    """torch.distributed as one rank of two sees it; returns the tensors this rank all-reduces."""
    reduced = []
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(
        torch.distributed, "all_reduce", lambda tensor, *a, **k: reduced.append(tensor.clone())
    )
    return reduced


def test_an_empty_batch_is_skipped_in_a_single_process(tiny_cfg):
    module = hydra.utils.instantiate(tiny_cfg().model)
    module._trainer = SimpleNamespace(strategy=None)
    assert module.training_step({"num_skipped": 2}, 0) is None


def test_an_empty_batch_takes_part_in_every_collective_of_a_ddp_step(tiny_cfg, monkeypatch):
    """A rank whose batch is empty must still all-reduce the mask count, sync the loss log and reduce
    gradients, else the other ranks wait for it forever; it contributes nothing to the update."""
    module = hydra.utils.instantiate(tiny_cfg("model.freeze=[image_encoder]").model)
    module._trainer = SimpleNamespace(strategy=None)
    reduced = fake_two_ranks(monkeypatch)
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kwargs: logged.update({name: (value, kwargs)}))
    loss = module.training_step({"num_skipped": 2}, 0)
    assert [t.item() for t in reduced] == [0.0]  # the mask count, as the other ranks' steps reduce it
    value, kwargs = logged["train/loss"]
    assert value.item() == 0.0 and kwargs["sync_dist"]
    assert loss.item() == 0.0
    loss.backward()
    for name, param in module.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and not param.grad.any(), name
        else:
            assert param.grad is None, name


# ----------------------------------------------------------------------------------------------------------
# how many clicks each validation run measures


def fitting_trainer(**overrides) -> SimpleNamespace:
    """What SamModule reads of a Trainer during fit's validation runs."""
    values = dict(max_epochs=-1, max_steps=1000, current_epoch=0, global_step=0, sanity_checking=False)
    return SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING), **{**values, **overrides})


def validation_clicks(module, trainer, runs: int, *, epochs_between: int = 0) -> list[int]:
    """The clicks of ``runs`` successive validation runs, 100 steps (and ``epochs_between`` epochs) apart."""
    module._trainer = trainer
    clicks = []
    for _ in range(runs):
        module.on_validation_epoch_start()
        clicks.append(module._clicks_this_epoch)
        trainer.global_step += 100
        trainer.current_epoch += epochs_between
    return clicks


def test_step_based_runs_measure_the_full_curve_every_n_validations(tiny_cfg):
    """max_steps with max_epochs=-1 (Lightning's "no epoch limit"): every third run and the last."""
    module = hydra.utils.instantiate(tiny_cfg("model.val_full_curve_every=3").model)
    trainer = fitting_trainer(max_steps=1000)
    assert validation_clicks(module, trainer, 7) == [3, 1, 1, 3, 1, 1, 3]
    trainer.global_step = 1000  # after the last step
    assert validation_clicks(module, trainer, 1) == [3]


def test_the_full_curve_counts_validation_runs_not_epochs(tiny_cfg):
    """check_val_every_n_epoch=2 validates after epochs 1, 3, 5, ...: every second run is full."""
    module = hydra.utils.instantiate(tiny_cfg("model.val_full_curve_every=2").model)
    trainer = fitting_trainer(max_epochs=100, max_steps=-1, current_epoch=1)
    assert validation_clicks(module, trainer, 4, epochs_between=2) == [3, 1, 3, 1]
    trainer.current_epoch = 99  # the last epoch
    assert validation_clicks(module, trainer, 1) == [3]


def test_the_validation_count_survives_a_resume_and_skips_the_sanity_check(tiny_cfg):
    cfg = tiny_cfg("model.val_full_curve_every=2")
    module = hydra.utils.instantiate(cfg.model)
    assert validation_clicks(module, fitting_trainer(sanity_checking=True), 2) == [3, 3]
    assert validation_clicks(module, fitting_trainer(), 3) == [3, 1, 3]
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    resumed = hydra.utils.instantiate(cfg.model)
    resumed.on_load_checkpoint(checkpoint)
    assert validation_clicks(resumed, fitting_trainer(), 3) == [1, 3, 1]  # runs 3, 4, 5


def test_validation_outside_fit_measures_the_full_curve_and_is_not_counted(tiny_cfg):
    module = hydra.utils.instantiate(tiny_cfg("model.val_full_curve_every=5").model)
    trainer = fitting_trainer(max_steps=-1, max_epochs=10)
    trainer.state.fn = TrainerFn.VALIDATING
    assert validation_clicks(module, trainer, 2) == [3, 3]
    assert module.val_runs == 0
    module.val_full_curve_every = 0  # never
    assert validation_clicks(module, trainer, 1) == [1]


def tiny_losses(cfg, steps: int) -> list[float]:
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model)
    batch = first_batch(cfg)
    optimiser = torch.optim.AdamW(module.parameters(), lr=1e-4)
    losses = []
    for _ in range(steps):
        loss, _ = module.interactive_loss(batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses


def test_fixed_seed_run_reproduces_stored_losses(tiny_cfg):
    """Guards the recipe against silent changes: regenerate the file only for an intended change
    (python -m tests.lightning.test_sam_module)."""
    expected = json.loads(EXPECTED_LOSSES.read_text())
    losses = tiny_losses(tiny_cfg(), steps=len(expected))
    assert losses == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert losses[-1] < losses[0]


if __name__ == "__main__":
    import tempfile

    from tests.conftest import TINY, compose_config

    with tempfile.TemporaryDirectory() as tmp:
        values = tiny_losses(compose_config(Path(tmp), *TINY), steps=4)
    EXPECTED_LOSSES.parent.mkdir(exist_ok=True)
    EXPECTED_LOSSES.write_text(json.dumps(values, indent=1) + "\n")
    print(values)


class DecoderCallRecorder:
    """Wraps Sam.decode_masks to record the prompts of every decoder pass."""

    def __init__(self, net):
        self.calls = []
        self._decode = net.decode_masks
        net.decode_masks = self

    def __call__(self, embeddings, **kwargs):
        self.calls.append(
            {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items() if k != "points"}
        )
        self.calls[-1]["labels"] = kwargs["points"][1].clone()
        return self._decode(embeddings, **kwargs)


@pytest.mark.parametrize(
    ("overrides", "first_labels"),
    [(["prompts=point_only"], [1, -1]), (["prompts=box_only"], [2, 3])],
)
def test_prompt_mix_options(tiny_cfg, overrides, first_labels):
    cfg = tiny_cfg(*overrides)
    module = hydra.utils.instantiate(cfg.model)
    recorder = DecoderCallRecorder(module.net)
    with torch.no_grad():
        module.interactive_loss(first_batch(cfg))
    first = recorder.calls[0]["labels"]
    assert (first == torch.tensor(first_labels)).all()
    recipe = module.prompts
    assert len(recorder.calls) == 1 + recipe.num_click_passes + recipe.num_mask_only_passes
    assert recorder.calls[0]["mask_inputs"] is None
    assert all(call["mask_inputs"] is not None for call in recorder.calls[1:])
    clicks = [call["labels"].shape[1] for call in recorder.calls]
    assert clicks[-1] == 2 + recipe.num_click_passes  # every click pass added one point


@pytest.mark.parametrize("gt_mask_prob", [0.0, 1.0])
def test_ground_truth_mask_prompt(tiny_cfg, gt_mask_prob):
    cfg = tiny_cfg(f"prompts.gt_mask_prob={gt_mask_prob}")
    module = hydra.utils.instantiate(cfg.model)
    recorder = DecoderCallRecorder(module.net)
    batch = first_batch(cfg)
    with torch.no_grad():
        module.interactive_loss(batch)
    first = recorder.calls[0]["mask_inputs"]
    if gt_mask_prob == 0:
        assert first is None
        return
    assert first.shape == (len(batch["masks"]), 1, 16, 16)
    # Positive logits exactly where the ground truth covers most of a low-res cell.
    coarse = torch.nn.functional.avg_pool2d(batch["masks"][:, None].float(), 4) > 0.5
    assert torch.equal(first > 0, coarse)
    assert first.abs().max() <= 10


def test_full_resolution_loss(tiny_cfg):
    cfg = tiny_cfg()
    batch = first_batch(cfg)
    low = hydra.utils.instantiate(cfg.model)
    full = hydra.utils.instantiate(tiny_cfg("model.loss.full_resolution=true").model)
    full.load_state_dict(low.state_dict())
    low_loss, _ = low.interactive_loss(batch)
    full_loss, _ = full.interactive_loss(batch)
    full_loss.backward()
    assert torch.isfinite(full_loss)
    assert not torch.isclose(low_loss, full_loss)  # computed on another grid
    assert full.net.mask_decoder.iou_token.weight.grad is not None


def test_cheap_validation_epochs_report_no_click_counts(tiny_cfg):
    """Epochs that validate the first click only must not report NoC/NoF from a 1-click curve."""
    from samtrain.commands.train import train

    cfg = tiny_cfg("trainer.max_epochs=3", "model.val_full_curve_every=0", "validate_before=false")
    metrics = train(cfg)
    assert "val/resized_mIoU@1" in metrics and "val/resized_box_mIoU" in metrics
    assert not any(k.startswith(("val/resized_NoC", "val/resized_NoF")) for k in metrics)


def test_training_prompts_get_the_tokens_the_official_predictor_builds(tiny_cfg):
    """A point-first prompt is [point, pad, clicks], a box-first one [corners, clicks]: decoded
    without extra padding, they equal the official encoding (points padded when there is no box)."""
    module = hydra.utils.instantiate(tiny_cfg().model)
    net = module.net.eval()
    embeddings = torch.randn(1, 256, 4, 4)
    click, point = torch.tensor([[[20.0, 30.0]]]), torch.tensor([[[5.0, 9.0]]])
    box = torch.tensor([[3.0, 4.0, 40.0, 50.0]])
    prompts = Prompts(
        coords=torch.cat(
            [torch.cat([point, torch.zeros(1, 1, 2), click], 1), torch.cat([box.view(1, 2, 2), click], 1)]
        ),
        labels=torch.tensor([[1, -1, 0], [2, 3, 0]]),
        mask_input=None,
    )
    with torch.no_grad():
        logits, iou = module.decoder(net.prepare_image(embeddings), torch.zeros(2, dtype=torch.long))(prompts)
        point_first = net.decode_masks(
            embeddings, points=(torch.cat([point, click], 1), torch.tensor([[1, 0]]))
        )
        box_first = net.decode_masks(embeddings, points=(click, torch.tensor([[0]])), boxes=box)
    torch.testing.assert_close(logits[:1], point_first[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1:], box_first[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(iou, torch.cat([point_first[1], box_first[1]]), atol=1e-5, rtol=1e-5)


class Stream(IterableDataset):
    epoch = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(())


def test_streams_are_told_the_epoch():
    stream = Stream()
    module = SamModule(net=build_sam("vit_t", image_size=64), optimizer=torch.optim.AdamW)
    module._trainer = SimpleNamespace(train_dataloader=SimpleNamespace(dataset=stream), current_epoch=3)
    module.on_train_epoch_start()
    assert stream.epoch == 3
