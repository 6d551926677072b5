"""ONNX export: the image encoder, and the prompt encoder + mask decoder with the official ONNX interface.

``encoder.onnx``: ``image`` (B, 3, h, w) float 0-255 RGB, longest side resized to S (``frame``'s
resize), normalised and padded in the graph -> ``image_embeddings`` (B, 256, S/16, S/16).

``decoder.onnx`` (the interface of the official ``SamOnnxModel``, so its browser and C++ demos run
it unchanged):

- inputs ``image_embeddings`` (1, 256, S/16, S/16); ``point_coords`` (1, N, 2) float in the model
  input frame; ``point_labels`` (1, N) float: 1 / 0 points, 2 / 3 box corners, -1 padding (add a
  (0, 0) padding point when there is no box, as the official demos do); ``mask_input``
  (1, 1, S/4, S/4) low-res logits; ``has_mask_input`` (1,) 1 or 0; ``orig_im_size`` (2,) float (H, W);
- outputs ``masks`` (1, 4, H, W) logits at the original size, ``iou_predictions`` (1, 4),
  ``low_res_masks`` (1, 4, S/4, S/4); output 0 is the single-mask output, 1-3 the multimask ones.

N, H and W are dynamic axes; the opset is an argument. Needs ``onnx`` (``pip install samtrain[onnx]``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samtrain.inference.merged import merged_model
from samtrain.models.sam.model import Sam

DECODER_INPUTS = (
    "image_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
)
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
DEFAULT_OPSET = 17


class EncoderGraph(nn.Module):
    """(B, 3, h, w) resized 0-255 RGB -> (B, 256, S/16, S/16): normalise, pad, encode."""

    def __init__(self, model: Sam) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        size = self.model.image_size
        x = (image - self.model.pixel_mean) / self.model.pixel_std
        x = F.pad(x, (0, size - x.shape[-1], 0, size - x.shape[-2]))
        return self.model.image_encoder(x)


class DecoderGraph(nn.Module):
    """The official ONNX decoder's computation with samtrain's modules (see the module docstring)."""

    def __init__(self, model: Sam) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prompts = self.model.prompt_encoder
        sparse = prompts.embed_labelled_points(point_coords, point_labels.to(torch.int64))
        has_mask = has_mask_input.reshape(-1, 1, 1, 1)
        dense = has_mask * prompts.embed_masks(mask_input) + (1 - has_mask) * prompts.no_mask_dense(1)
        low_res, iou = self.decode(image_embeddings, sparse, dense)
        return self.upscale(low_res, orig_im_size), iou, low_res

    def decode(
        self, image_embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`MaskDecoder.decode` computed in the plain NCHW layout, which traces to ONNX
        (the channels-last sub-pixel blocks of the training path do not):
        (1, C, h, w), (1, T, C), (1, C, h, w) -> low-res logits (1, M, 4h, 4w), IoU (1, M)."""
        decoder = self.model.mask_decoder
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)[None]
        tokens = torch.cat([tokens, sparse], dim=1)
        src = image_embeddings + dense
        hs, src = decoder.transformer(src, self.model.prompt_encoder.get_dense_pe(), tokens)
        b, c, h, w = image_embeddings.shape
        up1, norm, act1, up2, act2 = decoder.output_upscaling
        upscaled = act2(up2(act1(norm(up1(src.transpose(1, 2).reshape(b, c, h, w))))))
        mask_tokens = hs[:, 1 : 1 + decoder.num_mask_tokens]
        hyper_in = torch.stack(
            [mlp(mask_tokens[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
        )
        masks = hyper_in @ upscaled.flatten(2)
        return masks.reshape(b, -1, 4 * h, 4 * w), decoder.iou_prediction_head(hs[:, 0])

    def upscale(self, low_res: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """(1, M, S/4, S/4) -> (1, M, H, W): the frame's postprocessing with the sizes as tensors."""
        size = self.model.image_size
        up = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
        original = orig_im_size.to(torch.float32)
        resized = torch.floor(original * (size / original.max()) + 0.5).to(torch.int64)
        up = up[..., : resized[0], : resized[1]]
        original = original.to(torch.int64)
        return F.interpolate(up, size=(original[0], original[1]), mode="bilinear", align_corners=False)


def decoder_example(model: Sam, num_points: int = 3) -> tuple[torch.Tensor, ...]:
    """Example inputs of the decoder graph, in DECODER_INPUTS order."""
    grid = model.prompt_encoder.image_embedding_size
    size = model.image_size
    return (
        torch.randn(1, 256, *grid),
        torch.rand(1, num_points, 2) * size,
        torch.tensor([[1.0, 0.0, -1.0][i % 3] for i in range(num_points)])[None],
        torch.randn(1, 1, 4 * grid[0], 4 * grid[1]),
        torch.tensor([1.0]),
        torch.tensor([float(size * 3 // 4), float(size)]),
    )


def export_decoder(model: Sam, path: str | Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``decoder.onnx``: prompt encoder + mask decoder, the official interface."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = DecoderGraph(model.cpu().eval())
    with torch.no_grad():
        torch.onnx.export(
            graph,
            decoder_example(model),
            str(path),
            input_names=list(DECODER_INPUTS),
            output_names=list(DECODER_OUTPUTS),
            dynamic_axes={
                "point_coords": {1: "num_points"},
                "point_labels": {1: "num_points"},
                "masks": {2: "height", 3: "width"},
            },
            opset_version=opset,
            dynamo=False,
        )
    return path


def export_encoder(model: Sam, path: str | Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``encoder.onnx``: normalise, pad and encode a resized image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = model.image_size
    example = torch.rand(1, 3, size * 3 // 4, size) * 255
    with torch.no_grad():
        torch.onnx.export(
            EncoderGraph(model.cpu().eval()),
            (example,),
            str(path),
            input_names=["image"],
            output_names=["image_embeddings"],
            dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "image_embeddings": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return path


def export_onnx(model: Sam, folder: str | Path, *, opset: int = DEFAULT_OPSET) -> tuple[Path, Path]:
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
