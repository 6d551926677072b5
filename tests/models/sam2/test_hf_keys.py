"""Official SAM 2 <-> transformers Sam2Model key names (no transformers needed): the mapping is
lossless both ways, renames what Sam2Model names otherwise, and a Sam2Model directory reads back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from samtrain.models import build_sam
from samtrain.models.hf_keys import (
    SAM2_HF_POINT_TABLE,
    SAM2_HF_POSITIONAL,
    SAM2_HF_TIED_POSITIONAL,
    hf_to_official_sam2,
    official_sam2_to_hf,
    read_hf_directory,
)
from samtrain.models.sam2.checkpoint import samtrain_to_official_sam2
from tests.oracle import randomise


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomise(build_sam("sam2.1_hiera_n", image_size=64))


@pytest.fixture(scope="module")
def official(model):
    return samtrain_to_official_sam2(model.state_dict())


def test_official_to_hf_to_official_is_lossless(official):
    hf = official_sam2_to_hf(official)
    # four point embeddings become one table; the Fourier matrix gets a second holder
    assert len(hf) == len(official) - 4 + 1 + 1
    back = hf_to_official_sam2(hf)
    assert back.keys() == official.keys()
    assert all(torch.equal(back[k], official[k]) for k in official)


@pytest.mark.parametrize(
    ("official_key", "hf_key"),
    [
        (
            "image_encoder.trunk.patch_embed.proj.weight",
            "vision_encoder.backbone.patch_embed.projection.weight",
        ),
        ("image_encoder.trunk.blocks.3.norm1.bias", "vision_encoder.backbone.blocks.3.layer_norm1.bias"),
        (
            "image_encoder.trunk.blocks.1.mlp.layers.1.weight",
            "vision_encoder.backbone.blocks.1.mlp.proj_out.weight",
        ),
        ("image_encoder.trunk.blocks.1.proj.weight", "vision_encoder.backbone.blocks.1.proj.weight"),
        ("image_encoder.trunk.pos_embed_window", "vision_encoder.backbone.pos_embed_window"),
        ("image_encoder.neck.convs.2.conv.weight", "vision_encoder.neck.convs.2.weight"),
        ("no_mem_embed", "no_memory_embedding"),
        ("sam_prompt_encoder.mask_downscaling.6.bias", "prompt_encoder.mask_embed.conv3.bias"),
        ("sam_prompt_encoder.not_a_point_embed.weight", "prompt_encoder.not_a_point_embed.weight"),
        ("sam_mask_decoder.conv_s0.weight", "mask_decoder.conv_s0.weight"),
        (
            "sam_mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.weight",
            "mask_decoder.transformer.layers.1.cross_attn_image_to_token.o_proj.weight",
        ),
        (
            "sam_mask_decoder.transformer.layers.0.mlp.layers.1.bias",
            "mask_decoder.transformer.layers.0.mlp.proj_out.bias",
        ),
        (
            "sam_mask_decoder.transformer.layers.0.norm4.weight",
            "mask_decoder.transformer.layers.0.layer_norm4.weight",
        ),
        ("sam_mask_decoder.output_upscaling.1.weight", "mask_decoder.upscale_layer_norm.weight"),
        (
            "sam_mask_decoder.output_hypernetworks_mlps.3.layers.1.weight",
            "mask_decoder.output_hypernetworks_mlps.3.layers.0.weight",
        ),
        (
            "sam_mask_decoder.pred_obj_score_head.layers.2.bias",
            "mask_decoder.pred_obj_score_head.proj_out.bias",
        ),
        ("sam_mask_decoder.obj_score_token.weight", "mask_decoder.obj_score_token.weight"),
    ],
)
def test_keys_sam2model_names_otherwise_are_renamed(official, official_key, hf_key):
    hf = official_sam2_to_hf(official)
    assert official_key in official and hf_key in hf
    assert torch.equal(hf[hf_key], official[official_key])


def test_point_embeddings_are_one_table_and_the_fourier_matrix_two_holders(official):
    hf = official_sam2_to_hf(official)
    rows = [official[f"sam_prompt_encoder.point_embeddings.{i}.weight"] for i in range(4)]
    assert torch.equal(hf[SAM2_HF_POINT_TABLE], torch.cat(rows))
    matrix = official["sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    assert torch.equal(hf[SAM2_HF_POSITIONAL], matrix) and torch.equal(hf[SAM2_HF_TIED_POSITIONAL], matrix)


def test_two_different_fourier_matrices_are_refused(official):
    hf = official_sam2_to_hf(official)
    hf[SAM2_HF_TIED_POSITIONAL] = hf[SAM2_HF_TIED_POSITIONAL] + 1
    with pytest.raises(ValueError, match="one Fourier matrix"):
        hf_to_official_sam2(hf)


def _write_directory(path, state, model_type="sam2"):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    save_file({k: v.clone() for k, v in state.items()}, str(path / "model.safetensors"))  # no shared memory
    return path


def test_a_sam2model_directory_reads_back_bit_identical(model, official, tmp_path):
    directory = _write_directory(tmp_path / "hf", official_sam2_to_hf(official))
    assert read_hf_directory(directory).keys() == official.keys()
    back = build_sam("sam2.1_hiera_n", image_size=64, checkpoint=directory)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_a_directory_without_the_point_table_is_refused_by_name(official, tmp_path):
    state = official_sam2_to_hf(official)
    del state[SAM2_HF_POINT_TABLE]
    directory = _write_directory(tmp_path / "hf", state)
    with pytest.raises(ValueError, match=f"{directory}.*{SAM2_HF_POINT_TABLE}"):
        read_hf_directory(directory)


def test_another_model_type_is_refused(official, tmp_path):
    directory = _write_directory(tmp_path / "hf", official_sam2_to_hf(official), model_type="sam3")
    with pytest.raises(ValueError, match="model_type is 'sam3', neither 'sam' nor 'sam2'"):
        build_sam("sam2.1_hiera_n", image_size=64, checkpoint=directory)
