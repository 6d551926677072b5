"""ONNX export: the image encoder, and the prompt encoder + mask decoder, of SAM and of SAM 2.1.

SAM, ``encoder.onnx``: ``image`` (B, 3, h, w) float 0-255 RGB, longest side resized to S
(``frame``'s resize), normalised and padded in the graph -> ``image_embeddings`` (B, 256, S/16, S/16).

SAM, ``decoder.onnx`` (the interface of the official ``SamOnnxModel``, so its browser and C++ demos
run it unchanged):

- inputs ``image_embeddings`` (1, 256, S/16, S/16); ``point_coords`` (1, N, 2) float in the model
  input frame; ``point_labels`` (1, N) float: 1 / 0 points, 2 / 3 box corners, -1 padding (add a
  (0, 0) padding point when there is no box, as the official demos do); ``mask_input``
  (1, 1, S/4, S/4) low-res logits; ``has_mask_input`` (1,) 1 or 0; ``orig_im_size`` (2,) float (H, W);
- outputs ``masks`` (1, 4, H, W) logits at the original size, ``iou_predictions`` (1, 4),
  ``low_res_masks`` (1, 4, S/4, S/4); output 0 is the single-mask output, 1-3 the multimask ones.

SAM 2.1 (the interface of the community SAM 2 exports), ``encoder.onnx``: ``image`` (B, 3, S, S)
float 0-255 RGB already resized to S x S (``Sam2.preprocess``'s resize: bilinear, antialiased, on
0-1 values, aspect ratio not kept), normalised in the graph -> ``image_embed`` (B, 256, S/16, S/16,
``no_mem_embed`` added), ``high_res_feats_0`` (B, 32, S/4, S/4, after ``conv_s0``) and
``high_res_feats_1`` (B, 64, S/8, S/8, after ``conv_s1``): the fields of ``Sam2ImageFeatures``.

SAM 2.1, ``decoder.onnx``: inputs ``image_embed``, ``high_res_feats_0``, ``high_res_feats_1`` (batch
1), then ``point_coords``, ``point_labels``, ``mask_input``, ``has_mask_input``, ``orig_im_size`` as
for SAM, tokenised as SAM 2 does: box corners first, then the points, then always one (0, 0)
padding point labelled -1 -> ``masks`` (1, 4, H, W) logits at the original size (one bilinear
resize, ``Sam2.postprocess_masks``), ``iou_predictions`` (1, 4), ``low_res_masks`` (1, 4, S/4, S/4)
clamped to +-``Sam2.low_res_clamp`` (as the predictor returns them), ``object_score_logits``
(1, 1). The single-output stability rule (``Sam2MaskDecoder.select_outputs``) stays out of the
graph: :func:`select_single_output` applies it to the outputs (numpy only).

N, H and W are dynamic axes (and B in the encoders); the opset is an argument. Needs ``onnx``
(``pip install samtrain[onnx]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samtrain.inference.merged import merged_model
from samtrain.models.sam.mask_decoder import MaskDecoder, OutputUpscaling
from samtrain.models.sam.model import Sam
from samtrain.models.sam.prompt_encoder import PromptEncoder
from samtrain.models.sam2.model import Sam2

PROMPT_INPUTS = ("point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
DECODER_INPUTS = ("image_embeddings", *PROMPT_INPUTS)
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
SAM2_ENCODER_OUTPUTS = ("image_embed", "high_res_feats_0", "high_res_feats_1")
SAM2_DECODER_INPUTS = (*SAM2_ENCODER_OUTPUTS, *PROMPT_INPUTS)
SAM2_DECODER_OUTPUTS = (*DECODER_OUTPUTS, "object_score_logits")
DECODER_AXES = {
    "point_coords": {1: "num_points"},
    "point_labels": {1: "num_points"},
    "masks": {2: "height", 3: "width"},
}
DEFAULT_OPSET = 17


def embed_prompts(
    prompts: PromptEncoder,
    point_coords: torch.Tensor,
    point_labels: torch.Tensor,
    mask_input: torch.Tensor,
    has_mask_input: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder graphs' prompt inputs -> sparse (1, N, C) and dense (1, C, h, w) embeddings; the
    dense one is the mask's where ``has_mask_input`` is 1, ``no_mask_embed`` where it is 0."""
    sparse = prompts.embed_labelled_points(point_coords, point_labels.to(torch.int64))
    has_mask = has_mask_input.reshape(-1, 1, 1, 1)
    dense = has_mask * prompts.embed_masks(mask_input) + (1 - has_mask) * prompts.no_mask_dense(1)
    return sparse, dense


def upscale_nchw(
    upscaling: OutputUpscaling, x: torch.Tensor, skips: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """:class:`OutputUpscaling` in the plain NCHW layout: (1, C, h, w) -> (1, C/8, 4h, 4w).
    skips: SAM 2's high-resolution features (1, C/4, 2h, 2w) and (1, C/8, 4h, 4w), added after
    each transposed convolution."""
    up1, norm, act1, up2, act2 = upscaling
    x = up1(x)
    if skips is not None:
        x = x + skips[0]
    x = up2(act1(norm(x)))
    if skips is not None:
        x = x + skips[1]
    return act2(x)


def decode_nchw(
    decoder: MaskDecoder,
    output_tokens: torch.Tensor,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    skips: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask decoder's ``decode`` computed in the plain NCHW layout, which traces to ONNX (the
    channels-last sub-pixel blocks of the training path do not).

    Args:
        output_tokens: (K, C) the decoder's output tokens, its mask tokens last.
        image_embeddings, image_pe, dense: (1, C, h, w); sparse: (1, T, C).
        skips: as :func:`upscale_nchw`.

    Returns:
        the transformer's tokens (1, K + T, C) and the low-res logits (1, M, 4h, 4w).
    """
    tokens = torch.cat([output_tokens[None], sparse], dim=1)
    hs, src = decoder.transformer(image_embeddings + dense, image_pe, tokens)
    b, c, h, w = image_embeddings.shape
    upscaled = upscale_nchw(decoder.output_upscaling, src.transpose(1, 2).reshape(b, c, h, w), skips)
    first = output_tokens.shape[0] - decoder.num_mask_tokens
    hyper_in = torch.stack(
        [mlp(hs[:, first + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
    )
    masks = hyper_in @ upscaled.flatten(2)
    return hs, masks.reshape(b, -1, 4 * h, 4 * w)


def example_prompts(model: Sam | Sam2, num_points: int) -> tuple[torch.Tensor, ...]:
    """Example prompt inputs, in PROMPT_INPUTS order."""
    grid = model.prompt_encoder.image_embedding_size
    size = model.image_size
    return (
        torch.rand(1, num_points, 2) * size,
        torch.tensor([[1.0, 0.0, -1.0][i % 3] for i in range(num_points)])[None],
        torch.randn(1, 1, 4 * grid[0], 4 * grid[1]),
        torch.tensor([1.0]),
        torch.tensor([float(size * 3 // 4), float(size)]),
    )


class EncoderGraph(nn.Module):
    """SAM: (B, 3, h, w) resized 0-255 RGB -> (B, 256, S/16, S/16): normalise, pad, encode."""

    input_names = ("image",)
    output_names = ("image_embeddings",)
    dynamic_axes: ClassVar[dict[str, dict[int, str]]] = {
        "image": {0: "batch", 2: "height", 3: "width"},
        "image_embeddings": {0: "batch"},
    }

    def __init__(self, model: Sam) -> None:
        super().__init__()
        self.model = model

    def example(self) -> tuple[torch.Tensor, ...]:
        size = self.model.image_size
        return (torch.rand(1, 3, size * 3 // 4, size) * 255,)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        size = self.model.image_size
        x = (image - self.model.pixel_mean) / self.model.pixel_std
        x = F.pad(x, (0, size - x.shape[-1], 0, size - x.shape[-2]))
        return self.model.image_encoder(x)


class DecoderGraph(nn.Module):
    """SAM: the official ONNX decoder's computation with samtrain's modules (see the module docstring)."""

    input_names = DECODER_INPUTS
    output_names = DECODER_OUTPUTS
    dynamic_axes: ClassVar[dict[str, dict[int, str]]] = DECODER_AXES

    def __init__(self, model: Sam) -> None:
        super().__init__()
        self.model = model

    def example(self, num_points: int = 3) -> tuple[torch.Tensor, ...]:
        grid = self.model.prompt_encoder.image_embedding_size
        return (torch.randn(1, 256, *grid), *example_prompts(self.model, num_points))

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prompts, decoder = self.model.prompt_encoder, self.model.mask_decoder
        sparse, dense = embed_prompts(prompts, point_coords, point_labels, mask_input, has_mask_input)
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])
        hs, low_res = decode_nchw(decoder, tokens, image_embeddings, prompts.get_dense_pe(), sparse, dense)
        iou = decoder.iou_prediction_head(hs[:, 0])
        return self.upscale(low_res, orig_im_size), iou, low_res

    def upscale(self, low_res: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """(1, M, S/4, S/4) -> (1, M, H, W): the frame's postprocessing with the sizes as tensors."""
        size = self.model.image_size
        up = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
        original = orig_im_size.to(torch.float32)
        resized = torch.floor(original * (size / original.max()) + 0.5).to(torch.int64)
        up = up[..., : resized[0], : resized[1]]
        original = original.to(torch.int64)
        return F.interpolate(up, size=(original[0], original[1]), mode="bilinear", align_corners=False)


class Sam2EncoderGraph(nn.Module):
    """SAM 2.1: (B, 3, S, S) resized 0-255 RGB -> the three levels of :class:`Sam2ImageFeatures`."""

    input_names = ("image",)
    output_names = SAM2_ENCODER_OUTPUTS
    dynamic_axes: ClassVar[dict[str, dict[int, str]]] = {
        name: {0: "batch"} for name in ("image", *SAM2_ENCODER_OUTPUTS)
    }

    def __init__(self, model: Sam2) -> None:
        super().__init__()
        self.model = model

    def example(self) -> tuple[torch.Tensor, ...]:
        size = self.model.image_size
        return (torch.rand(1, 3, size, size) * 255,)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.model.image_encoder(self.model.preprocess(image))  # S x S: normalised only
        return features.image_embed, features.high_res_s0, features.high_res_s1


class Sam2DecoderGraph(nn.Module):
    """SAM 2.1: prompt encoder + SAM 2 mask decoder + postprocessing (see the module docstring)."""

    input_names = SAM2_DECODER_INPUTS
    output_names = SAM2_DECODER_OUTPUTS
    dynamic_axes: ClassVar[dict[str, dict[int, str]]] = DECODER_AXES

    def __init__(self, model: Sam2) -> None:
        super().__init__()
        self.model = model

    def example(self, num_points: int = 3) -> tuple[torch.Tensor, ...]:
        grid = self.model.prompt_encoder.image_embedding_size
        encoder = self.model.image_encoder
        return (
            torch.randn(1, encoder.no_mem_embed.shape[-1], *grid),
            torch.randn(1, encoder.conv_s0.out_channels, 4 * grid[0], 4 * grid[1]),
            torch.randn(1, encoder.conv_s1.out_channels, 2 * grid[0], 2 * grid[1]),
            *example_prompts(self.model, num_points),
        )

    def forward(
        self,
        image_embed: torch.Tensor,
        high_res_feats_0: torch.Tensor,
        high_res_feats_1: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        prompts, decoder = self.model.prompt_encoder, self.model.mask_decoder
        sparse, dense = embed_prompts(prompts, point_coords, point_labels, mask_input, has_mask_input)
        tokens = torch.cat(
            [decoder.obj_score_token.weight, decoder.iou_token.weight, decoder.mask_tokens.weight]
        )
        skips = (high_res_feats_1, high_res_feats_0)
        hs, low_res = decode_nchw(decoder, tokens, image_embed, prompts.get_dense_pe(), sparse, dense, skips)
        original = orig_im_size.to(torch.int64)
        masks = F.interpolate(low_res, size=(original[0], original[1]), mode="bilinear", align_corners=False)
        bound = self.model.low_res_clamp
        if bound is not None:
            low_res = low_res.clamp(-bound, bound)
        return masks, decoder.iou_prediction_head(hs[:, 1]), low_res, decoder.pred_obj_score_head(hs[:, 0])


def select_single_output(
    low_res_masks: np.ndarray, iou_predictions: np.ndarray, *, delta: float = 0.05, thresh: float = 0.98
) -> int:
    """SAM 2's rule for one output (``Sam2MaskDecoder.select_outputs(..., multimask_output=False)``
    outside training, dynamic multimask via stability) on the SAM 2.1 decoder graph's outputs
    ``low_res_masks`` (1, 4, S/4, S/4) and ``iou_predictions`` (1, 4): the index of the output to
    use. 0 where output 0's stability (the IoU of its logits thresholded at +delta and -delta) is at
    least thresh, else the multimask output of highest predicted IoU. delta and thresh: the
    decoder's ``stability_delta`` and ``stability_thresh`` (SAM 2.1: 0.05, 0.98). Numpy only, in
    float32 as the torch rule, so a deployment without torch can copy it."""
    logits = np.asarray(low_res_masks)[0, 0]
    outer = np.float32(np.count_nonzero(logits > -delta))
    stability = np.float32(np.count_nonzero(logits > delta)) / outer if outer else np.float32(1.0)
    if stability >= np.float32(thresh):
        return 0
    return 1 + int(np.argmax(np.asarray(iou_predictions)[0, 1:]))


def encoder_graph(model: Sam | Sam2) -> EncoderGraph | Sam2EncoderGraph:
    return Sam2EncoderGraph(model) if isinstance(model, Sam2) else EncoderGraph(model)


def decoder_graph(model: Sam | Sam2) -> DecoderGraph | Sam2DecoderGraph:
    return Sam2DecoderGraph(model) if isinstance(model, Sam2) else DecoderGraph(model)


def decoder_example(model: Sam | Sam2, num_points: int = 3) -> tuple[torch.Tensor, ...]:
    """Example inputs of the model's decoder graph, in its ``input_names`` order."""
    return decoder_graph(model).example(num_points)


def export_graph(graph: nn.Module, path: str | Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """Trace one of this module's graphs on its example inputs and write it to ``path``. The graph
    is put in eval mode first: the exporter restores the wrapper's mode afterwards, and a fresh
    wrapper's is training, which would leave the model in training mode."""
    graph.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            graph,
            graph.example(),
            str(path),
            input_names=list(graph.input_names),
            output_names=list(graph.output_names),
            dynamic_axes=graph.dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )
    return path


def export_decoder(model: Sam | Sam2, path: str | Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``decoder.onnx``: prompt encoder + mask decoder (+ postprocessing)."""
    return export_graph(decoder_graph(model.cpu().eval()), path, opset=opset)


def export_encoder(model: Sam | Sam2, path: str | Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``encoder.onnx``: normalise (SAM: and pad) and encode a resized image."""
    return export_graph(encoder_graph(model.cpu().eval()), path, opset=opset)


def export_onnx(model: Sam | Sam2, folder: str | Path, *, opset: int = DEFAULT_OPSET) -> tuple[Path, Path]:
    """``folder/encoder.onnx`` and ``folder/decoder.onnx``, each checked by ``onnx.checker``;
    LoRA layers merged into their weights."""
    import onnx  # the onnx extra

    model = merged_model(model)
    folder = Path(folder)
    encoder = export_encoder(model, folder / "encoder.onnx", opset=opset)
    decoder = export_decoder(model, folder / "decoder.onnx", opset=opset)
    for path in (encoder, decoder):
        onnx.checker.check_model(str(path))
    return encoder, decoder
