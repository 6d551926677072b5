"""Datasets, SAM transforms, batching and the DataModule.

Names are imported on first use, so ``import samtrain.data`` stays cheap (albumentations and
Lightning load only when their classes are needed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "SamDataset": "samtrain.data.base",
    "CocoInstanceDataset": "samtrain.data.coco",
    "decode_segmentations": "samtrain.data.coco",
    "read_rgb_image": "samtrain.data.image_io",
    "RleMasks": "samtrain.data.rle",
    "Sa1bDataset": "samtrain.data.sa1b",
    "Sa1bTarStream": "samtrain.data.sa1b",
    "InstanceMaskFolder": "samtrain.data.mask_folder",
    "BinaryMaskFolder": "samtrain.data.mask_folder",
    "SemanticMaskFolder": "samtrain.data.mask_folder",
    "SampleError": "samtrain.data.errors",
    "SkipBadSamples": "samtrain.data.errors",
    "SamTransform": "samtrain.data.transforms",
    "SamResizeCrop": "samtrain.data.transforms",
    "collate_sam_batch": "samtrain.data.collate",
    "SamDataModule": "samtrain.data.datamodule",
    "YoloSegmentationDataset": "samtrain.data.yolo",
    "LabelmeDataset": "samtrain.data.labelme",
    "CvatImagesDataset": "samtrain.data.cvat",
    "VocInstanceDataset": "samtrain.data.voc",
    "VolumeSliceDataset": "samtrain.data.volume",
    "ObjectCropDataset": "samtrain.data.crops",
}

__all__ = [
    "BinaryMaskFolder",
    "CocoInstanceDataset",
    "CvatImagesDataset",
    "InstanceMaskFolder",
    "LabelmeDataset",
    "ObjectCropDataset",
    "RleMasks",
    "Sa1bDataset",
    "Sa1bTarStream",
    "SamDataModule",
    "SamDataset",
    "SamResizeCrop",
    "SamTransform",
    "SampleError",
    "SemanticMaskFolder",
    "SkipBadSamples",
    "VocInstanceDataset",
    "VolumeSliceDataset",
    "YoloSegmentationDataset",
    "collate_sam_batch",
    "decode_segmentations",
    "read_rgb_image",
]

if TYPE_CHECKING:
    from samtrain.data.base import SamDataset
    from samtrain.data.coco import CocoInstanceDataset, decode_segmentations
    from samtrain.data.collate import collate_sam_batch
    from samtrain.data.crops import ObjectCropDataset
    from samtrain.data.cvat import CvatImagesDataset
    from samtrain.data.datamodule import SamDataModule
    from samtrain.data.errors import SampleError, SkipBadSamples
    from samtrain.data.image_io import read_rgb_image
    from samtrain.data.labelme import LabelmeDataset
    from samtrain.data.mask_folder import BinaryMaskFolder, InstanceMaskFolder, SemanticMaskFolder
    from samtrain.data.rle import RleMasks
    from samtrain.data.sa1b import Sa1bDataset, Sa1bTarStream
    from samtrain.data.transforms import SamResizeCrop, SamTransform
    from samtrain.data.voc import VocInstanceDataset
    from samtrain.data.volume import VolumeSliceDataset
    from samtrain.data.yolo import YoloSegmentationDataset


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
