"""Hugging Face export of SAM 2.1: transformers' Sam2Model loads it strictly and computes samtrain's
outputs; samtrain -> HF -> samtrain is bit-identical; every real variant's config builds the
Sam2Model whose keys and shapes are samtrain's; what Sam2Model cannot express is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from samtrain.inference.hf import hf_sam2_config, save_hf_directory
from samtrain.models import build_sam
from samtrain.models.hf_keys import official_sam2_to_hf
from samtrain.models.sam2.build import HIERA_SPECS
from samtrain.models.sam2.checkpoint import samtrain_to_official_sam2
from tests.oracle import randomise

transformers = pytest.importorskip("transformers")

VARIANT, SIZE = "sam2.1_hiera_n", 64
ATOL = 1e-4  # measured: features bit-identical, low-res logits within 4e-6, scores within 1e-7


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = randomise(build_sam(VARIANT, image_size=SIZE).eval())
    directory = save_hf_directory(model, tmp_path_factory.mktemp("hf") / "sam2")
    hf, info = transformers.Sam2Model.from_pretrained(str(directory), output_loading_info=True)
    return model, directory, hf.eval(), info


def test_sam2model_loads_the_directory_strictly(exported):
    _, directory, hf, info = exported
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.model_type == "sam2"
    assert hf.config.vision_config.backbone_config.image_size == [SIZE, SIZE]
    assert hf.config.prompt_encoder_config.image_size == SIZE
    assert {p.name for p in directory.iterdir()} >= {"config.json", "model.safetensors"}


def _prompts():
    """Two point prompts, two boxes, and the image indices of both (one image)."""
    points = torch.tensor([[[10.0, 20.0], [30.0, 40.0]], [[50.0, 5.0], [3.0, 60.0]]])
    labels = torch.tensor([[1, 0], [1, 1]])
    boxes = torch.tensor([[8.0, 4.0, 50.0, 60.0], [20.0, 20.0, 40.0, 36.0]])
    return points, labels, boxes, torch.zeros(2, dtype=torch.long)


def _assert_same_outputs(out, ours):
    """Sam2Model's multimask outputs (1, N, 3, ...) against samtrain's outputs 1: of N prompts."""
    low_res, iou, object_scores = ours
    torch.testing.assert_close(out.pred_masks[0], low_res[:, 1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.iou_scores[0], iou[:, 1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.object_score_logits[0], object_scores, atol=ATOL, rtol=0)


def test_sam2model_gives_samtrain_features_masks_and_scores(exported):
    model, _, hf, _ = exported
    image = torch.randn(1, 3, SIZE, SIZE)  # samtrain's frame: normalised S x S pixel values
    points, labels, boxes, indices = _prompts()
    with torch.no_grad():
        features = model.image_encoder(image)
        levels = hf.get_image_embeddings(image)
        ours = [features.high_res_s0, features.high_res_s1, features.image_embed]
        for theirs, mine in zip(levels, ours, strict=True):
            torch.testing.assert_close(theirs, mine, atol=ATOL, rtol=0)
        cases = [
            (dict(input_points=points[None], input_labels=labels[None]), dict(points=(points, labels))),
            (dict(input_boxes=boxes[None]), dict(boxes=boxes)),
            (
                dict(input_points=points[None], input_labels=labels[None], input_boxes=boxes[None]),
                dict(points=(points, labels), boxes=boxes),
            ),
        ]
        for theirs, mine in cases:
            out = hf(pixel_values=image, multimask_output=True, **theirs)
            _assert_same_outputs(
                out, model.decode_masks(features, image_indices=indices, return_object_scores=True, **mine)
            )


def test_single_output_follows_the_stability_rule_as_samtrain(exported, tmp_path):
    """multimask_output=False for 8 single points: with these weights every single output is unstable
    (both fall back to the best multimask output); with stability_thresh 0 (carried by the config)
    every one is kept."""
    model, _, hf, _ = exported
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, SIZE, SIZE, generator=generator)
    points, labels = torch.rand(8, 1, 2, generator=generator) * SIZE, torch.ones(8, 1, dtype=torch.long)
    always_stable = build_sam(VARIANT, image_size=SIZE, checkpoint=save_hf_directory(model, tmp_path / "m"))
    always_stable.mask_decoder.stability_thresh = 0.0
    lenient = transformers.Sam2Model.from_pretrained(str(save_hf_directory(always_stable, tmp_path / "s")))
    assert lenient.config.mask_decoder_config.dynamic_multimask_stability_thresh == 0.0
    for ours, theirs, kept in ((model, hf, 0), (always_stable, lenient.eval(), 8)):
        with torch.no_grad():
            features = ours.image_encoder(image)
            low_res, iou = ours.decode_masks(
                features, points=(points, labels), image_indices=torch.zeros(8, dtype=torch.long)
            )
            single, single_iou = ours.mask_decoder.select_outputs(low_res, iou, multimask_output=False)
            out = theirs(
                pixel_values=image,
                input_points=points[None],
                input_labels=labels[None],
                multimask_output=False,
            )
        assert sum(torch.equal(single[i], low_res[i, :1]) for i in range(8)) == kept
        torch.testing.assert_close(out.pred_masks[0], single, atol=ATOL, rtol=0)
        torch.testing.assert_close(out.iou_scores[0], single_iou, atol=ATOL, rtol=0)


def test_a_mask_input_gives_the_same_outputs(exported):
    model, _, hf, _ = exported
    image = torch.randn(1, 3, SIZE, SIZE)
    points, labels = torch.tensor([[[33.0, 17.0]]]), torch.tensor([[1]])
    mask = torch.randn(1, 1, SIZE // 4, SIZE // 4) * 4
    with torch.no_grad():
        out = hf(
            pixel_values=image,
            input_points=points[None],
            input_labels=labels[None],
            input_masks=mask,
            multimask_output=True,
        )
        ours = model.decode_masks(
            model.image_encoder(image), points=(points, labels), mask_inputs=mask, return_object_scores=True
        )
    _assert_same_outputs(out, ours)


def test_samtrain_to_hf_to_samtrain_is_bit_identical(exported, tmp_path):
    model, directory, _, _ = exported
    back = build_sam(VARIANT, image_size=SIZE, checkpoint=directory)
    assert back.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    again = save_hf_directory(back, tmp_path / "again")
    first, second = (load_file(str(d / "model.safetensors")) for d in (directory, again))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_lora_is_exported_merged(exported, tmp_path):
    model, directory, _, _ = exported
    lora = build_sam(VARIANT, image_size=SIZE, checkpoint=directory, lora=dict(rank=2, alpha=4)).eval()
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    hf = transformers.Sam2Model.from_pretrained(str(save_hf_directory(lora, tmp_path / "lora"))).eval()
    image = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(
            hf.get_image_embeddings(image)[-1], lora.image_encoder(image).image_embed, atol=ATOL, rtol=0
        )
        assert not torch.allclose(
            lora.image_encoder(image).image_embed, model.image_encoder(image).image_embed
        )


def test_the_processor_is_made_for_the_model_size(exported):
    """Sam2Processor.from_pretrained(directory) resizes to S x S and scales prompts as samtrain does."""
    model, directory, _, _ = exported
    processor = transformers.Sam2Processor.from_pretrained(str(directory))
    image = np.random.default_rng(0).integers(0, 256, (90, 150, 3), dtype=np.uint8)
    inputs = processor(
        images=image, input_points=[[[[30.0, 40.0]]]], input_labels=[[[1]]], return_tensors="pt"
    )
    assert tuple(inputs["pixel_values"].shape) == (1, 3, SIZE, SIZE)
    expected = model.transform_coords(np.array([[30.0, 40.0]]), (90, 150))
    np.testing.assert_allclose(inputs["input_points"][0, 0].numpy(), expected, atol=1e-4)


@pytest.mark.parametrize(
    ("variant", "size"),
    [("sam2.1_hiera_t", 1024), ("sam2.1_hiera_s", 512), ("sam2.1_hiera_b+", 1024), ("sam2.1_hiera_l", 768)],
)
def test_every_variant_builds_a_sam2model_with_samtrains_keys_and_shapes(variant, size):
    with torch.device("meta"):
        model = build_sam(variant, image_size=size)
        hf = transformers.Sam2Model(hf_sam2_config(model))
    ours = official_sam2_to_hf(samtrain_to_official_sam2(model.state_dict()))
    theirs = hf.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert hf.config.vision_config.backbone_feature_sizes == [
        [size // 4] * 2,
        [size // 8] * 2,
        [size // 16] * 2,
    ]
    assert hf.config.vision_config.backbone_config.global_attention_blocks == list(
        HIERA_SPECS[variant].global_att_blocks
    )


def test_what_sam2model_cannot_express_is_refused(tmp_path):
    linear_head = build_sam(VARIANT, image_size=SIZE)
    linear_head.mask_decoder.pred_obj_score_head = nn.Linear(256, 1)
    no_sigmoid = build_sam(VARIANT, image_size=SIZE)
    no_sigmoid.mask_decoder.iou_prediction_head.sigmoid_output = False
    for refused, reason in (
        (linear_head, r"object-score head is linear \(pred_obj_scores_mlp=False\)"),
        (no_sigmoid, r"IoU head has no sigmoid \(iou_prediction_use_sigmoid=False\)"),
    ):
        with pytest.raises(
            ValueError, match="transformers' Sam2Model cannot express this model: .*" + reason
        ):
            save_hf_directory(refused, tmp_path / "refused")
        assert not (tmp_path / "refused").exists()
