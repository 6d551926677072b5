"""ONNX export of SAM 2.1: onnxruntime computes what samtrain's Sam2 computes (the encoder's three
levels; the decoder's masks, IoU, low-res logits and object scores for every prompt kind), within
ATOL; the single-output rule on the graph's outputs is the decoder's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samtrain.inference.onnx import (
    SAM2_DECODER_INPUTS,
    SAM2_DECODER_OUTPUTS,
    SAM2_ENCODER_OUTPUTS,
    export_encoder,
    export_onnx,
    select_single_output,
)
from samtrain.inference.predictor import SamPredictor
from samtrain.models import build_sam
from samtrain.models.sam2.image_encoder import Sam2ImageFeatures
from tests.oracle import randomise

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
SIZE = 64
ORIGINAL = (50, 30)  # (H, W): not square, not the traced example's size
ATOL = 1e-4


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    torch.manual_seed(0)
    model = randomise(build_sam("sam2.1_hiera_n", image_size=SIZE).eval())
    encoder, decoder = export_onnx(model, tmp_path_factory.mktemp("onnx"), opset=17)
    return model, ort.InferenceSession(str(encoder)), ort.InferenceSession(str(decoder))


def test_encoder_levels(sessions):
    model, encoder, _ = sessions
    assert not model.training  # the export leaves the model in eval mode
    assert [o.name for o in encoder.get_outputs()] == list(SAM2_ENCODER_OUTPUTS)
    image = torch.rand(2, 3, SIZE, SIZE) * 255  # a batch of two: the batch axis is dynamic
    got = encoder.run(None, {"image": image.numpy()})
    with torch.no_grad():
        features = model.image_encoder(model.preprocess(image))
    expected = (features.image_embed, features.high_res_s0, features.high_res_s1)
    assert [g.shape for g in got] == [(2, 256, 4, 4), (2, 32, 16, 16), (2, 64, 8, 8)]
    for level, want in zip(got, expected, strict=True):
        np.testing.assert_allclose(level, want.numpy(), atol=ATOL, rtol=0)


PROMPTS = {  # (points (x, y, label), box xyxy) in the model input frame
    "one_point": ([(40.0, 20.0, 1)], None),
    "three_points": ([(40.0, 20.0, 1), (10.0, 50.0, 0), (33.0, 7.0, 1)], None),
    "box": ([], (8.0, 5.0, 50.0, 44.0)),
    "box_and_points": ([(30.0, 30.0, 1), (12.0, 40.0, 0)], (8.0, 5.0, 50.0, 44.0)),
}


def graph_prompt(points, box) -> tuple[np.ndarray, np.ndarray]:
    """docs/sam2.md's recipe: box corners (labels 2, 3) first, then the points, then a (0, 0) padding
    point labelled -1 -> point_coords (1, N, 2), point_labels (1, N) float32."""
    coords = ([box[:2], box[2:]] if box else []) + [p[:2] for p in points] + [(0.0, 0.0)]
    labels = ([2, 3] if box else []) + [p[2] for p in points] + [-1]
    return np.array([coords], np.float32), np.array([labels], np.float32)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_decoder(sessions, prompt, with_mask):
    model, _, decoder = sessions
    assert [i.name for i in decoder.get_inputs()] == list(SAM2_DECODER_INPUTS)
    assert [o.name for o in decoder.get_outputs()] == list(SAM2_DECODER_OUTPUTS)
    gen = torch.Generator().manual_seed(len(prompt))
    embed = torch.randn(1, 256, 4, 4, generator=gen)
    feats_0, feats_1 = torch.randn(1, 32, 16, 16, generator=gen), torch.randn(1, 64, 8, 8, generator=gen)
    mask_input = 5 * torch.randn(1, 1, 16, 16, generator=gen)
    points, box = PROMPTS[prompt]
    coords, labels = graph_prompt(points, box)
    feed = dict(
        zip(
            SAM2_DECODER_INPUTS,
            (embed.numpy(), feats_0.numpy(), feats_1.numpy(), coords, labels, mask_input.numpy()),
            strict=False,
        ),
        has_mask_input=np.array([float(with_mask)], np.float32),
        orig_im_size=np.array(ORIGINAL, np.float32),
    )
    masks, iou, low_res, object_scores = decoder.run(None, feed)

    features = Sam2ImageFeatures(image_embed=embed, high_res_s1=feats_1, high_res_s0=feats_0)
    with torch.no_grad():  # samtrain's own tokenisation of the same prompt (Sam2.prompt_tokens)
        expected_low, expected_iou, expected_scores = model.decode_masks(
            features,
            points=(torch.tensor([[p[:2] for p in points]]), torch.tensor([[p[2] for p in points]]))
            if points
            else None,
            boxes=torch.tensor([box]) if box else None,
            mask_inputs=mask_input if with_mask else None,
            return_object_scores=True,
        )
        expected_masks = model.postprocess_masks(expected_low, (SIZE, SIZE), ORIGINAL)
    bound = model.low_res_clamp
    assert masks.shape == (1, 4, *ORIGINAL)
    np.testing.assert_allclose(masks, expected_masks.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(iou, expected_iou.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(low_res, expected_low.clamp(-bound, bound).numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(object_scores, expected_scores.numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("stable", [True, False])
def test_single_output_selection_is_the_decoders(sessions, stable):
    """select_single_output on numpy outputs picks what Sam2MaskDecoder.select_outputs picks, in
    both branches (output 0 stable: kept; unstable: the best multimask output)."""
    model, _, _ = sessions
    gen = torch.Generator().manual_seed(1)
    low_res = torch.randn(1, 4, 16, 16, generator=gen)
    if stable:
        low_res[:, 0] = 8.0 * low_res[:, 0].sign()
    iou = torch.rand(1, 4, generator=gen)
    chosen = select_single_output(low_res.numpy(), iou.numpy())
    assert (chosen == 0) == stable
    want_masks, want_iou = model.mask_decoder.select_outputs(low_res, iou, multimask_output=False)
    assert torch.equal(low_res[:, chosen], want_masks[:, 0]) and iou[0, chosen] == want_iou[0, 0]


def test_low_res_masks_are_clamped_and_masks_are_not(sessions):
    """As SamPredictor on a Sam2: low_res_masks clamped to +-low_res_clamp, masks resized from the
    unclamped logits (large high-resolution features drive the logits past the bound)."""
    model, _, decoder = sessions
    gen = torch.Generator().manual_seed(2)
    coords, labels = graph_prompt([(40.0, 20.0, 1)], None)
    feed = {
        "image_embed": torch.randn(1, 256, 4, 4, generator=gen).numpy(),
        "high_res_feats_0": 100 * torch.randn(1, 32, 16, 16, generator=gen).numpy(),
        "high_res_feats_1": torch.randn(1, 64, 8, 8, generator=gen).numpy(),
        "point_coords": coords,
        "point_labels": labels,
        "mask_input": np.zeros((1, 1, 16, 16), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.array([SIZE, SIZE], np.float32),
    }
    masks, _, low_res, _ = decoder.run(None, feed)
    bound = model.low_res_clamp
    assert np.abs(low_res).max() == np.float32(bound) and np.abs(masks).max() > bound


def test_lora_is_exported_merged(tmp_path):
    torch.manual_seed(0)
    lora = build_sam("sam2.1_hiera_n", image_size=SIZE, lora=dict(rank=2, alpha=4)).eval()
    image = torch.rand(1, 3, SIZE, SIZE) * 255
    with torch.no_grad():
        without = lora.image_encoder(lora.preprocess(image)).image_embed  # lora_B = 0: no change yet
        for name, p in lora.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
        expected = lora.image_encoder(lora.preprocess(image)).image_embed
    encoder, _ = export_onnx(lora, tmp_path, opset=17)
    (got, _, _) = ort.InferenceSession(str(encoder)).run(None, {"image": image.numpy()})
    np.testing.assert_allclose(got, expected.numpy(), atol=ATOL, rtol=0)
    assert not np.allclose(got, without.numpy(), atol=1e-3)
    plain = export_encoder(build_sam("sam2.1_hiera_n", image_size=SIZE), tmp_path / "plain.onnx")
    graph, plain_graph = onnx.load(str(encoder)).graph, onnx.load(str(plain)).graph
    assert not [i.name for i in graph.initializer if "lora" in i.name]  # merged: no LoRA weights left,
    assert [n.op_type for n in graph.node] == [n.op_type for n in plain_graph.node]  # nor LoRA matmuls


@pytest.mark.parametrize("multimask_output", [False, True])
def test_onnx_pipeline_is_the_predictor(sessions, multimask_output):
    """docs/sam2.md's recipe end to end (resize to S x S, encoder, prompt in the model frame,
    decoder, then select_single_output or outputs 1-3) gives SamPredictor's logits, scores and
    low-res logits at the original size."""
    model, encoder, decoder = sessions
    image = np.random.default_rng(3).integers(0, 256, size=(*ORIGINAL, 3), dtype=np.uint8)
    point, box = np.array([[12.0, 30.0]]), None if multimask_output else np.array([3.0, 8.0, 25.0, 44.0])
    predictor = SamPredictor(model)
    predictor.set_image(image)
    want = predictor.predict(point, np.array([1]), box, multimask_output=multimask_output, return_logits=True)

    x = torch.as_tensor(image).permute(2, 0, 1)[None].float() / 255
    resized = F.interpolate(x, (SIZE, SIZE), mode="bilinear", antialias=True) * 255
    embed, feats_0, feats_1 = encoder.run(None, {"image": resized.numpy()})
    corners = [] if box is None else list(model.transform_coords(box.reshape(2, 2), ORIGINAL))
    coords = np.array([[*corners, *model.transform_coords(point, ORIGINAL), (0.0, 0.0)]], np.float32)
    labels = np.array([([] if box is None else [2, 3]) + [1, -1]], np.float32)
    masks, iou, low_res, _ = decoder.run(
        None,
        {
            "image_embed": embed,
            "high_res_feats_0": feats_0,
            "high_res_feats_1": feats_1,
            "point_coords": coords,
            "point_labels": labels,
            "mask_input": np.zeros((1, 1, SIZE // 4, SIZE // 4), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array(ORIGINAL, np.float32),
        },
    )
    chosen = [1, 2, 3] if multimask_output else [select_single_output(low_res, iou)]
    for got, expected in zip((masks, iou, low_res), want, strict=True):
        np.testing.assert_allclose(got[0, chosen], expected, atol=ATOL, rtol=0)
