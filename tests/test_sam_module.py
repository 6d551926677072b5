"""The training step: prompt roles, gradients by part, multimask candidates, reproducible losses."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import pytest
import torch

from samtrain.sam_module import PassState, output_candidates

EXPECTED_LOSSES = Path(__file__).parent / "data" / "expected_losses.json"


def first_batch(cfg):
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


def test_output_candidates():
    labels = torch.tensor([[1, -1, -1], [2, 3, -1], [1, -1, 0], [2, 3, 1], [0, -1, -1]])
    expected = torch.tensor(
        [
            [False, True, True, True],  # one positive point: the multimask outputs
            [True, False, False, False],  # a box
            [True, False, False, False],  # two points
            [True, False, False, False],  # box and a click
            [False, True, True, True],  # one negative point is still a single point
        ]
    )
    assert torch.equal(output_candidates(labels, 4), expected)


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
    (python -m tests.test_sam_module)."""
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
    from samtrain.train import train

    cfg = tiny_cfg("trainer.max_epochs=3", "model.val_full_curve_every=0", "validate_before=false")
    metrics = train(cfg)
    assert "val/mIoU@1" in metrics and "val/box_mIoU" in metrics
    assert not any(k.startswith(("val/NoC", "val/NoF")) for k in metrics)


def test_training_prompts_get_the_tokens_the_official_predictor_builds(tiny_cfg):
    """A point-first prompt is [point, pad, clicks], a box-first one [corners, clicks]: decoded
    without extra padding, they equal the official encoding (points padded when there is no box)."""
    module = hydra.utils.instantiate(tiny_cfg().model)
    net = module.net.eval()
    embeddings = torch.randn(1, 256, 4, 4)
    click, point = torch.tensor([[[20.0, 30.0]]]), torch.tensor([[[5.0, 9.0]]])
    box = torch.tensor([[3.0, 4.0, 40.0, 50.0]])
    state = PassState(
        coords=torch.cat(
            [torch.cat([point, torch.zeros(1, 1, 2), click], 1), torch.cat([box.view(1, 2, 2), click], 1)]
        ),
        labels=torch.tensor([[1, -1, 0], [2, 3, 0]]),
        mask_input=None,
        pred_masks=None,
    )
    with torch.no_grad():
        logits, iou, _ = module.decoder_pass(embeddings, torch.zeros(2, dtype=torch.long), state)
        point_first = net.decode_masks(
            embeddings, points=(torch.cat([point, click], 1), torch.tensor([[1, 0]]))
        )
        box_first = net.decode_masks(embeddings, points=(click, torch.tensor([[0]])), boxes=box)
    torch.testing.assert_close(logits[:1], point_first[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1:], box_first[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(iou, torch.cat([point_first[1], box_first[1]]), atol=1e-5, rtol=1e-5)
