"""model.decoder_backward_per_pass refuses what it cannot serve (FSDP: tests/test_modes.py): fp16 mixed
precision, whose gradient scaler its per-pass ``torch.autograd.grad`` on the unscaled loss would bypass."""

from __future__ import annotations

from types import SimpleNamespace

import hydra
import pytest
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.strategies import SingleDeviceStrategy


def module_under(tiny_cfg, precision: str, *overrides: str):
    module = hydra.utils.instantiate(tiny_cfg(*overrides).model)
    module._trainer = SimpleNamespace(
        strategy=SingleDeviceStrategy("cpu"),
        precision_plugin=MixedPrecision(precision, device="cpu"),
        precision=precision,
    )
    return module


def test_per_pass_backward_is_refused_under_fp16_mixed_precision(tiny_cfg):
    module = module_under(tiny_cfg, "16-mixed", "model.decoder_backward_per_pass=true")
    with pytest.raises(ValueError, match=r"fp16 mixed precision .* bypass the gradient scaler"):
        module.setup("fit")


@pytest.mark.parametrize(
    "precision, overrides",
    [("bf16-mixed", ("model.decoder_backward_per_pass=true",)), ("16-mixed", ())],
    ids=["per_pass_bf16", "plain_fp16"],
)
def test_bf16_and_the_plain_backward_are_accepted(tiny_cfg, precision, overrides):
    module_under(tiny_cfg, precision, *overrides).setup("fit")
