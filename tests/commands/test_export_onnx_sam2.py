"""``samtrain export --format onnx`` on a SAM 2.1 checkpoint: both graphs, the SAM 2.1 interface,
the variant read from the checkpoint."""

from __future__ import annotations

import pytest
import torch

from samtrain.commands import cli
from samtrain.inference.onnx import SAM2_DECODER_INPUTS, SAM2_DECODER_OUTPUTS, SAM2_ENCODER_OUTPUTS
from samtrain.models import build_sam, export_sam_checkpoint

onnx = pytest.importorskip("onnx")


def test_export_onnx_writes_both_sam2_graphs(tmp_path):
    torch.manual_seed(0)
    checkpoint = export_sam_checkpoint(build_sam("sam2.1_hiera_n", image_size=64), tmp_path / "tiny.pt")
    out = tmp_path / "onnx"
    argv = ["export", str(checkpoint), "--format", "onnx", "--out", str(out), "--image-size", "64"]
    assert cli.main([*argv, "--device", "cpu"]) == 0
    encoder, decoder = (onnx.load(str(out / name)).graph for name in ("encoder.onnx", "decoder.onnx"))
    assert [o.name for o in encoder.output] == list(SAM2_ENCODER_OUTPUTS)
    assert [i.name for i in decoder.input] == list(SAM2_DECODER_INPUTS)
    assert [o.name for o in decoder.output] == list(SAM2_DECODER_OUTPUTS)
