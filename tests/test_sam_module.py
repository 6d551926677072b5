"""The training step: prompt roles, gradients by part, multimask candidates, reproducible losses."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import pytest
import torch

from samtrain.sam_module import output_candidates

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
