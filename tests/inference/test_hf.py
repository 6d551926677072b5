"""Hugging Face export: SamModel loads it and computes samtrain's outputs; HF -> samtrain -> HF is lossless."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from samtrain.inference.hf import save_hf_directory
from samtrain.models import build_sam
from samtrain.models.hf_keys import hf_to_official, official_to_hf
from tests.oracle import randomise

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = randomise(build_sam("vit_t", image_size=64).eval())
    directory = save_hf_directory(model, tmp_path_factory.mktemp("hf") / "sam")
    return model, directory


def test_sam_model_gives_samtrain_outputs(exported):
    model, directory = exported
    hf = transformers.SamModel.from_pretrained(str(directory)).eval()
    image = torch.rand(1, 3, 64, 64) * 3
    points = torch.tensor([[[10.0, 20.0], [30.0, 40.0], [50.0, 5.0]]])
    labels = torch.tensor([[1, 0, 1]])
    box = torch.tensor([[8.0, 4.0, 50.0, 60.0]])
    with torch.no_grad():
        embeddings = model.image_encoder(image)
        torch.testing.assert_close(hf.get_image_embeddings(image), embeddings, atol=1e-4, rtol=0)
        for kwargs, ours in (
            (dict(input_points=points[:, None], input_labels=labels[:, None]), dict(points=(points, labels))),
            (dict(input_boxes=box[:, None]), dict(boxes=box)),
        ):
            out = hf(image_embeddings=embeddings, multimask_output=True, **kwargs)
            low_res, iou = model.decode_masks(embeddings, **ours)
            torch.testing.assert_close(out.pred_masks[:, 0], low_res[:, 1:], atol=1e-4, rtol=0)
            torch.testing.assert_close(out.iou_scores[:, 0], iou[:, 1:], atol=1e-4, rtol=0)


def test_hf_to_samtrain_to_hf_is_lossless(exported, tmp_path):
    model, directory = exported
    back = build_sam("vit_t", image_size=64, checkpoint=directory)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    again = save_hf_directory(back, tmp_path / "again")
    first, second = (
        load_file(str(directory / "model.safetensors")),
        load_file(str(again / "model.safetensors")),
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_key_mapping_round_trips(exported):
    model, _ = exported
    official = {k.replace(".mlp.fc", ".mlp.lin"): v for k, v in model.state_dict().items()}
    assert hf_to_official(official_to_hf(official)).keys() == official.keys()


def test_lora_is_exported_merged(exported, tmp_path):
    model, directory = exported
    lora = build_sam("vit_t", image_size=64, checkpoint=directory, lora=dict(rank=2, alpha=4)).eval()
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    hf = transformers.SamModel.from_pretrained(str(save_hf_directory(lora, tmp_path / "lora"))).eval()
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            hf.get_image_embeddings(image), lora.image_encoder(image), atol=1e-4, rtol=0
        )
        assert not torch.allclose(lora.image_encoder(image), model.image_encoder(image), atol=1e-3)


def test_a_folder_that_is_not_a_sam_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json"):
        build_sam("vit_t", image_size=64, checkpoint=tmp_path)
