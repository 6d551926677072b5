"""FSDP on the CPU: 2 gloo processes through Lightning's ModelParallelStrategy (``trainer=fsdp2``,
``SamModule.configure_model`` shards with FSDP2's ``fully_shard``) train what 1 process trains.

Lightning's FSDPStrategy (FSDP1, conf/trainer/fsdp.yaml) refuses the CPU ("The strategy `fsdp`
requires a GPU accelerator"), so it is not run here; see docs/distributed.md.
"""

from __future__ import annotations

import pytest
import torch

from samtrain.models import build_sam
from tests.lightning.test_distributed import (
    SAM2,
    assert_same_weights,
    save_weights,
    train,
    train_losses,
    weights,
)

pytestmark = pytest.mark.slow

FSDP2 = (
    "trainer=fsdp2",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
    "+trainer.strategy.process_group_backend=gloo",
)


@pytest.mark.parametrize(
    ("model", "options"),
    [((), ()), (SAM2, ("trainer.gradient_clip_val=0.1",))],
    ids=["sam", "sam2_clipped"],
)
def test_two_process_fsdp2_equals_one_process_with_the_same_global_batch(tmp_path, model, options):
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    train(single, *model, *options, "trainer.max_steps=3", *save_weights(single))
    train(sharded, *model, *options, *FSDP2, "trainer.max_steps=3")
    single_losses, sharded_losses = train_losses(single), train_losses(sharded)
    assert len(single_losses) == len(sharded_losses) == 3
    assert sharded_losses == pytest.approx(single_losses, abs=1e-5)
    # The full (gathered) checkpoint holds the weights the single process trained.
    checkpoint = torch.load(sharded / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert_same_weights(checkpoint["state_dict"], weights(single), atol=1e-4)


def test_the_fsdp2_run_exports_its_gathered_weights(tmp_path):
    """official.pth is written from the full state every rank gathers, not rank zero's shards:
    build_sam loads it strictly and it holds the trained weights."""
    sharded = tmp_path / "fsdp"
    train(sharded, *FSDP2, "trainer.max_steps=2", "export=true")
    checkpoint = torch.load(sharded / "checkpoints" / "last.ckpt", weights_only=True)
    trained = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items()}
    exported = build_sam("vit_t", image_size=64, checkpoint=sharded / "official.pth").state_dict()
    assert_same_weights(exported, {k: trained[k] for k in exported})
