"""ONNX export: onnxruntime computes what samtrain computes (encoder; decoder for every prompt kind)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samtrain.frame import logits_at_original_size, resized_shape
from samtrain.inference.onnx import DECODER_INPUTS, DECODER_OUTPUTS, export_onnx
from samtrain.models import build_sam
from tests.oracle import randomise

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
ORIGINAL = (50, 30)  # (H, W): not the traced example's size


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    torch.manual_seed(0)
    model = randomise(build_sam("vit_t", image_size=64).eval())
    encoder, decoder = export_onnx(model, tmp_path_factory.mktemp("onnx"), opset=17)
    return model, ort.InferenceSession(str(encoder)), ort.InferenceSession(str(decoder))


def test_encoder(sessions):
    model, encoder, _ = sessions
    image = torch.rand(1, 3, 48, 64) * 255
    (embeddings,) = encoder.run(None, {"image": image.numpy()})
    with torch.no_grad():
        expected = model.image_encoder(model.preprocess(image))
    np.testing.assert_allclose(embeddings, expected.numpy(), atol=1e-4, rtol=0)


PROMPTS = {  # labels; 2 and 3 are a box's corners, -1 the padding point of a prompt without a box
    "one_point": [1.0, -1.0],
    "three_points": [1.0, 0.0, 1.0, -1.0],
    "box": [2.0, 3.0],
    "box_and_points": [1.0, 0.0, 2.0, 3.0],
}


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_decoder(sessions, prompt, with_mask):
    model, _, decoder = sessions
    assert [i.name for i in decoder.get_inputs()] == list(DECODER_INPUTS)
    assert [o.name for o in decoder.get_outputs()] == list(DECODER_OUTPUTS)
    gen = torch.Generator().manual_seed(len(prompt))
    labels = torch.tensor([PROMPTS[prompt]])
    coords = torch.rand(1, labels.shape[1], 2, generator=gen) * 64
    coords[labels == -1] = 0.0
    embeddings = torch.randn(1, 256, 4, 4, generator=gen)
    mask_input = torch.randn(1, 1, 16, 16, generator=gen)
    feed = {
        "image_embeddings": embeddings.numpy(),
        "point_coords": coords.numpy(),
        "point_labels": labels.numpy(),
        "mask_input": mask_input.numpy(),
        "has_mask_input": np.array([float(with_mask)], dtype=np.float32),
        "orig_im_size": np.array(ORIGINAL, dtype=np.float32),
    }
    masks, iou, low_res = decoder.run(None, feed)
    with torch.no_grad():
        expected_low, expected_iou = model.decode_masks(
            embeddings,
            points=(coords, labels.long()),
            mask_inputs=mask_input if with_mask else None,
            pad_points=False,
        )
        expected_masks = logits_at_original_size(expected_low, 64, resized_shape(*ORIGINAL, 64), ORIGINAL)
    assert masks.shape == (1, 4, *ORIGINAL)
    np.testing.assert_allclose(low_res, expected_low.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(iou, expected_iou.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(masks, expected_masks.numpy(), atol=1e-4, rtol=0)
