"""``samtrain export CKPT --format hf`` for a SAM 2.1 checkpoint: a Sam2Model directory that
transformers loads strictly and samtrain reads back bit for bit, the commands reading its variant."""

from __future__ import annotations

import json

import pytest
import torch

from samtrain.commands import cli
from samtrain.models import build_sam, export_sam_checkpoint
from tests.oracle import randomise

TINY = ["--image-size", "64", "--device", "cpu"]


def test_export_hf_writes_a_sam2model_directory_the_commands_read_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = randomise(build_sam("sam2.1_hiera_n", image_size=64))
    checkpoint = export_sam_checkpoint(model, tmp_path / "sam2.pt")
    out = tmp_path / "hf"
    assert cli.main(["export", str(checkpoint), "--format", "hf", "--out", str(out), *TINY]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "sam2"
    _, info = transformers.Sam2Model.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    back = build_sam("sam2.1_hiera_n", image_size=64, checkpoint=out).state_dict()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    # the directory is a checkpoint the commands take, its variant read from the Hiera trunk
    again = tmp_path / "again.safetensors"
    assert cli.main(["export", str(out), "--format", "safetensors", "--out", str(again), *TINY]) == 0
    back = build_sam("sam2.1_hiera_n", image_size=64, checkpoint=again).state_dict()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
